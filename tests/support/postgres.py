"""The shared PostgreSQL server (127.0.0.1:5432) for tests: a database of the session's own,
a schema of each test's own inside it, and a TCP proxy that cuts the connections to it.

Tests never stop the shared server (other worktrees' tests use it); an outage is the proxy's
`cut()`: every connection through it closed, and new ones refused until `restore()`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest

SERVER = os.environ.get("ARKS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
HOST, PORT = "127.0.0.1", 5432


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(f"{SERVER}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:
        pytest.fail(
            f"PostgreSQL is not reachable at {SERVER} ({err}); start it (`pg_ctlcluster 15 main "
            "start`, Debian's postgresql package) — .ci/run does"
        )


@contextlib.contextmanager
def private_database() -> Iterator[str]:
    """A fresh database with a unique name (tests run in parallel worktrees), dropped after;
    yields its URL."""
    name = f"arks_test_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{SERVER}/{name}"
    finally:
        with _admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def new_schema(database_url: str) -> str:
    """A fresh schema in the database; the URL whose connections use it (search_path)."""
    name = f"s_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    return with_schema(database_url, name)


def with_schema(url: str, schema: str) -> str:
    return f"{url}?options=-csearch_path%3D{schema}"


class CutProxy:
    """A TCP proxy to PostgreSQL that can cut every connection through it and refuse new ones
    (accepted, then closed at once, as a server gone away looks to libpq), then let them in."""

    def __init__(self, upstream: tuple[str, int] = (HOST, PORT)) -> None:
        self.upstream = upstream
        self._cut = False
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database_url: str) -> str:
        """`database_url` (on the shared server) rewritten to go through the proxy."""
        return database_url.replace(f"{HOST}:{PORT}", f"127.0.0.1:{self.port}", 1)

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                if self._cut:
                    client.close()
                    continue
                server = socket.create_connection(self.upstream)
                self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closing.set()
        self._server.close()
        self.cut()


@contextlib.contextmanager
def cut_proxy() -> Iterator[CutProxy]:
    proxy = CutProxy()
    try:
        yield proxy
    finally:
        proxy.close()
