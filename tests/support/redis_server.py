"""A throwaway redis-server for tests that kill, pause or restart Redis (never the shared one)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis


class PrivateRedis:
    """A throwaway redis-server on a free port: started, killed, paused by the test."""

    def __init__(self, aof_dir: Path | None = None) -> None:
        """`aof_dir`: persist with an append-only file there (fsync every second, as manifests/
        configures Redis), so a restart comes back with what was written; None: nothing on disk."""
        self.aof_dir = aof_dir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        if self.aof_dir is None:  # nothing on disk: a restart comes back empty
            args += ["--save", "", "--appendonly", "no"]
        else:
            self.aof_dir.mkdir(parents=True, exist_ok=True)
            args += ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
            args += ["--dir", str(self.aof_dir)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server must be able to die
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


SHARED_REDIS = "redis://127.0.0.1:6379/0"


@contextlib.asynccontextmanager
async def fresh_prefix(namespace: str) -> AsyncIterator[str]:
    """A key prefix of its own on the shared Redis (which must be up: CI starts it); the keys
    under it are deleted afterwards."""
    prefix = f"{namespace}:{uuid.uuid4().hex}:"
    admin = Redis.from_url(SHARED_REDIS)
    try:
        await admin.ping()
    except OSError as e:  # redis-py's ConnectionError is an OSError too
        await admin.aclose()
        pytest.fail(f"no Redis at {SHARED_REDIS} (.ci/run starts one): {e}")
    try:
        yield prefix
    finally:
        keys = [key async for key in admin.scan_iter(match=f"{prefix}*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()
