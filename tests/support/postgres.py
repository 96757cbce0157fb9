"""The shared PostgreSQL server (127.0.0.1:5432) for tests: a database of the session's own,
a schema of each test's own inside it, and a TCP proxy that cuts the connections to it.

Tests never stop the shared server (other worktrees' tests use it); an outage is the proxy's
`cut()`: every connection through it closed, and new ones refused until `restore()`.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import psycopg

from tests.support.cut_proxy import CutProxy
from tests.support.cut_proxy import cut_proxy as proxy_to

SERVER = os.environ.get("ARKS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
HOST, PORT = "127.0.0.1", 5432


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(f"{SERVER}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:
        raise RuntimeError(
            f"PostgreSQL is not reachable at {SERVER} ({err}); start it (`pg_ctlcluster 15 main "
            "start`, Debian's postgresql package) — .ci/run does"
        ) from err


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


@contextlib.contextmanager
def cut_proxy() -> Iterator[CutProxy]:
    """A CutProxy in front of the shared PostgreSQL server."""
    with proxy_to(HOST, PORT) as proxy:
        yield proxy


def through(proxy: CutProxy, database_url: str) -> str:
    """`database_url` (on the shared server) rewritten to go through `proxy`."""
    return database_url.replace(f"{HOST}:{PORT}", f"127.0.0.1:{proxy.port}", 1)
