"""Which requests had their usage reported to another gateway replica.

With several gateway replicas, Envoy opens each request's ext_proc stream to any of them, and
sends the request's access-log entry over a long-lived stream to one of them — often not the
one that admitted it. The admitting replica keeps waiting for that entry (`InFlight`) and,
when it never comes, charges the request's estimate: a second charge for a request another
replica already charged.

So a replica that receives an entry for a request it did not admit says so in Redis, which
all replicas share, and a replica about to charge an unreported request first asks whether
it was reported elsewhere. The hot path pays nothing: marks are written once per access-log
batch, after the requests have ended, and the lookup happens only for requests that look lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from redis.exceptions import RedisClusterException, RedisError

from arks.adapters.redis.client import connect, mget
from arks.limits.model import BackendUnavailable


class ReportedElsewhere(Protocol):
    async def mark(self, request_ids: Sequence[str]) -> None:
        """Record that these requests' access-log entries arrived here, not at their admitter."""

    async def seen(self, request_ids: Sequence[str]) -> set[str]:
        """Which of these requests some replica has marked."""


class SingleReplica:
    """Without a shared store there is no other replica to have seen anything."""

    async def mark(self, request_ids: Sequence[str]) -> None:
        return None

    async def seen(self, request_ids: Sequence[str]) -> set[str]:
        return set()


class RedisReported:
    """Marks as Redis keys that outlive the longest wait for an entry (`ttl_s`)."""

    def __init__(
        self,
        url: str,
        ttl_s: float,
        prefix: str = "arks:reported:",
        timeout_s: float = 0.5,
        *,
        password: str | None = None,
    ) -> None:
        self._redis = connect(url, timeout_s, max_connections=4, password=password)
        self._ttl_ms = int(ttl_s * 1000)
        self._prefix = prefix

    async def mark(self, request_ids: Sequence[str]) -> None:
        if not request_ids:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for request_id in request_ids:
                    pipe.set(self._prefix + request_id, b"1", px=self._ttl_ms)
                await pipe.execute()
        except (RedisError, RedisClusterException, OSError) as err:
            raise BackendUnavailable(f"marking reported requests: {err}") from err

    async def seen(self, request_ids: Sequence[str]) -> set[str]:
        if not request_ids:
            return set()
        try:
            values = await mget(self._redis, [self._prefix + r for r in request_ids])
        except (RedisError, RedisClusterException, OSError) as err:
            raise BackendUnavailable(f"looking up reported requests: {err}") from err
        return {r for r, value in zip(request_ids, values, strict=True) if value is not None}

    async def close(self) -> None:
        await self._redis.aclose()
