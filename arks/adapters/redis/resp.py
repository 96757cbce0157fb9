"""A lean Redis client for the hot scripts: one connection, every call pipelined, replies parsed
by hiredis, commands written as RESP directly.

redis-py costs ~75 µs of CPU per `evalsha` under load (its pool, its connection objects, a
write and a read per command); this costs ~7 µs (`/work/notes`-style tight loop: 16 callers,
one server). Calls made in one turn of the event loop leave in one write; replies come back in
order and settle the calls in order (Redis answers a connection's commands in the order sent).

Only for one plain server (`redis://`, `unix://`); a cluster, Sentinel or TLS goes through
redis-py. Failures as our redis-py clients are set up: a connection the server closed (a
restart between two calls leaves one behind, noticed only when written to) is opened again and
the call sent once more, at once; a call that timed out is never sent again (the script may
have run: a retry would charge twice). A server that stops answering: a watchdog (every quarter
of `timeout_s`, not a timer per call: those cost more than the call) closes the connection once
a call has waited longer than `timeout_s`, so every call waiting on it fails within 1.25 x
`timeout_s` and the next one reconnects; no more than `MAX_WAITING` calls ever wait on one
connection, and connecting is bounded by `timeout_s` too.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    NoScriptError,
    ResponseError,
)

MAX_WAITING = 10_000  # calls waiting for replies on one connection


class ConnectionLost(ConnectionError):
    """The server closed the connection (or it broke): the calls on it may be sent again."""


def encode(args: Sequence[str | int | bytes]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Wire(asyncio.Protocol):
    """The connection: writes coalesced per loop turn, replies matched to calls in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.outgoing: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._flush_due = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not self.waiting:  # a reply nobody asked for: the stream is out of step
                self._fail(ConnectionError("redis: a reply without a call"))
                return
            future, _ = self.waiting.popleft()
            if not future.done():  # a caller that gave up (timed out) left its future
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionLost(f"redis: connection lost: {exc or 'closed by the server'}"))

    def send(self, command: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.waiting.append((future, time.monotonic()))
        self.outgoing.append(command)
        if not self._flush_due:
            self._flush_due = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_due = False
        if self.outgoing and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

    def oldest_wait(self) -> float:
        return time.monotonic() - self.waiting[0][1] if self.waiting else 0.0

    def close(self, why: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._fail(ConnectionError(f"redis: {why}"))

    def _fail(self, err: Exception) -> None:
        self.closed = True
        self.outgoing.clear()
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(err)


class Pipelined:
    """Commands and Lua scripts on one pipelined connection to `url` (redis:// or unix://)."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        *,
        password: str | None = None,
        username: str | None = None,
    ) -> None:
        parsed = urlsplit(url)
        self._unix = parsed.scheme == "unix"
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        self._path = parsed.path
        self._db = 0 if self._unix else int(parsed.path.lstrip("/") or 0)
        if self._unix and parsed.query.startswith("db="):
            self._db = int(parsed.query[3:])
        self._password = unquote(parsed.password) if parsed.password else password
        self._username = unquote(parsed.username) if parsed.username else username
        self._timeout_s = timeout_s
        self._wire: _Wire | None = None
        self._connecting: asyncio.Task[_Wire] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    @staticmethod
    def serves(url: str) -> bool:
        """Whether this client can talk to `url` (one plain server)."""
        scheme = url.partition("://")[0]
        return scheme in ("redis", "unix")

    async def call(self, *args: str | int | bytes) -> Any:
        """One command's reply; an error reply raised as redis-py raises it."""
        command = encode(args)
        for attempt in (1, 2):
            wire = await self._ready()
            if len(wire.waiting) >= MAX_WAITING:
                raise ConnectionError(f"redis: {MAX_WAITING} calls already wait for replies")
            try:
                reply = await wire.send(command)
                break
            except ConnectionLost:
                if attempt == 2:
                    raise
        if isinstance(reply, hiredis.ReplyError):
            raise _error(str(reply))
        return reply

    async def script(
        self, text: str, sha: str, keys: Sequence[str], args: Sequence[str | int]
    ) -> Any:
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            # First call against this server (or it restarted): EVAL also caches the script.
            return await self.call("EVAL", text, len(keys), *keys, *args)

    async def close(self) -> None:
        for task in (self._connecting, self._watchdog):
            if task is not None:
                task.cancel()
        if self._wire is not None:
            self._wire.close("client closed")
            self._wire = None

    async def _ready(self) -> _Wire:
        wire = self._wire
        if wire is not None and not wire.closed:
            if wire.oldest_wait() <= self._timeout_s:
                return wire
            # The server has not answered a call for longer than a call may wait: start over.
            wire.close(f"no reply within {self._timeout_s} s")
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        self._wire = await asyncio.shield(self._connecting)
        return self._wire

    async def _connect(self) -> _Wire:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout_s):
            if self._unix:
                _, wire = await loop.create_unix_connection(_Wire, self._path)
            else:
                _, wire = await loop.create_connection(_Wire, self._host, self._port)
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = loop.create_task(self._watch(wire))
        hello: list[asyncio.Future[Any]] = []
        if self._password is not None:
            auth = [self._username, self._password] if self._username else [self._password]
            hello.append(wire.send(encode(["AUTH", *auth])))
        if self._db:
            hello.append(wire.send(encode(["SELECT", self._db])))
        for reply in await asyncio.gather(*hello):
            if isinstance(reply, hiredis.ReplyError):
                wire.close("refused the connection's set-up")
                raise _error(str(reply))
        return wire

    async def _watch(self, wire: _Wire) -> None:
        """Close `wire` once a call has waited on it longer than the timeout."""
        while not wire.closed:
            await asyncio.sleep(self._timeout_s / 4)
            if wire.oldest_wait() > self._timeout_s:
                wire.close(f"no reply within {self._timeout_s} s")


def pipelined(url: str, timeout_s: float, password: str | None, **options: Any) -> Pipelined | None:
    """The lean client for `url` when it is one plain server, else None (redis-py's then)."""
    if not Pipelined.serves(url):
        return None
    return Pipelined(url, timeout_s, password=password, username=options.get("username"))


def _error(message: str) -> Exception:
    """An error reply as redis-py's exception for it."""
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith(("WRONGPASS", "NOAUTH")) or "invalid password" in message:
        return AuthenticationError(message)
    return ResponseError(message)
