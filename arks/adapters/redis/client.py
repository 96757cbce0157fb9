"""What every Redis store of the rate-limit package shares: how to connect, how to run a Lua
script in one round trip, and what counts as the store being unavailable."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoScriptError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from arks.limits.model import BackendUnavailable


class Script(NamedTuple):
    text: str
    sha: str

    @classmethod
    def of(cls, text: str) -> Script:
        return cls(text, hashlib.sha1(text.encode()).hexdigest())


class RedisAuthFailed(Exception):
    """Redis refused the password (or asked for one we do not have): a setting to fix, not an
    outage to ride out, so the services stop instead of failing open or closed for ever."""


def connect(url: str, timeout_s: float, max_connections: int, password: str | None = None) -> Redis:
    """A client for `url`; `password` (AUTH) unless the URL carries one."""
    pool = BlockingConnectionPool.from_url(
        url,
        password=password,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # One immediate retry on a dropped connection (e.g. a pooled one Redis closed while
        # restarting): the command almost surely never ran. Never on timeouts: the script may
        # have run, and a retry would charge twice.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    return Redis.from_pool(pool)


def read_password(path: Path) -> str:
    """The password in `path` (a mounted Secret key), without the trailing newline an editor or
    `echo` leaves."""
    return path.read_text().rstrip("\r\n")


def where(url: str) -> str:
    """host:port/db of a Redis URL, for messages: never the credentials it may hold."""
    parsed = urlsplit(url)
    return f"{parsed.hostname}:{parsed.port or 6379}{parsed.path}"


def startup_failure(err: BaseException, password_file: Path | None) -> str | None:
    """Why a service cannot start on its Redis credentials, in one line for its exit (never the
    password): refused by Redis, or a password file it cannot read; None for another error."""
    if isinstance(err, RedisAuthFailed):
        return f"{err} (see --redis-password-file)"
    if isinstance(err, OSError) and password_file and err.filename == str(password_file):
        return f"--redis-password-file: {err}"
    return None


async def check_auth(url: str, password: str | None, timeout_s: float) -> None:
    """Raise RedisAuthFailed when Redis at `url` refuses these credentials. An unreachable
    Redis passes: the stores' availability policies (fail open / closed) handle outages."""
    redis = connect(url, timeout_s, max_connections=1, password=password)
    try:
        async with asyncio.timeout(timeout_s):
            await redis.ping()
    except AuthenticationError as e:
        detail = "no password given" if password is None else "wrong password"
        raise RedisAuthFailed(f"redis {where(url)} refused to authenticate ({detail}): {e}") from e
    except (RedisError, OSError, TimeoutError):
        pass
    finally:
        await redis.aclose()


async def run(redis: Redis, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
    try:
        return await redis.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        # First call against this server (or it restarted): EVAL also caches the script.
        return await redis.eval(script.text, len(keys), *keys, *args)


async def run_many(
    redis: Redis, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[str | int]]]
) -> list[Any]:
    """The script once per (keys, args), pipelined: one round trip. A server that does not have
    the script yet is given it, and the calls are sent again (a script that must count once,
    as the budgets' do, remembers what it applied)."""
    for attempt in (1, 2):
        async with redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
        missing = any(isinstance(reply, NoScriptError) for reply in replies)
        if not missing or attempt == 2:
            break
        await redis.script_load(script.text)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return list(replies)


@asynccontextmanager
async def answer_within(timeout_s: float, what: str) -> AsyncIterator[None]:
    """Bound the block by the timeout; any failure to get an answer is unavailability."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except (RedisError, OSError, TimeoutError) as e:
        detail = str(e) or f"no answer within {timeout_s} s"
        raise BackendUnavailable(f"redis {what}: {type(e).__name__}: {detail}") from e
