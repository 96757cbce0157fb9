"""What every Redis store of the rate-limit package shares: how to connect, how to run a Lua
script in one round trip, and what counts as the store being unavailable."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from arks.limits.model import BackendUnavailable


class Script(NamedTuple):
    text: str
    sha: str

    @classmethod
    def of(cls, text: str) -> Script:
        return cls(text, hashlib.sha1(text.encode()).hexdigest())


def connect(url: str, timeout_s: float, max_connections: int) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url,
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


async def run(redis: Redis, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
    try:
        return await redis.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        # First call against this server (or it restarted): EVAL also caches the script.
        return await redis.eval(script.text, len(keys), *keys, *args)


@asynccontextmanager
async def answer_within(timeout_s: float, what: str) -> AsyncIterator[None]:
    """Bound the block by the timeout; any failure to get an answer is unavailability."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except (RedisError, OSError, TimeoutError) as e:
        detail = str(e) or f"no answer within {timeout_s} s"
        raise BackendUnavailable(f"redis {what}: {type(e).__name__}: {detail}") from e
