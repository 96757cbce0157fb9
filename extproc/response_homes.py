"""Which engine holds a stored response (the Responses API): its id -> (namespace, model, engine).

An engine keeps the responses it made in its own memory (vLLM's response store), and only it can
answer `GET /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`, or continue one with
`previous_response_id`. The engine makes the id, so the gateway cannot encode the engine in it:
it remembers where each response was made. usage.lua puts the answer's `id` in the access log,
settlement records it with the engine Envoy sent the request to, and the decision on a later
request routes to that engine (the destination header endpoint picking uses).

Bounded: an entry lives `ttl_s` (and in memory, the `capacity` most recent). With Redis as the
counter store the map is in Redis, so every gateway replica finds the responses any replica saw
answered; without it each replica knows only the responses whose access-log entry reached it, and
another replica answers 404 for the rest.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson
from redis.exceptions import RedisClusterException, RedisError

from arks.adapters.redis.client import connect
from arks.limits.model import BackendUnavailable


@dataclass(frozen=True)
class ResponseHome:
    """Where a stored response lives and whose it is."""

    namespace: str
    model: str
    engine: str  # host:port, as the destination header names it


class ResponseHomes(Protocol):
    async def remember(self, response_id: str, home: ResponseHome) -> None:
        """Record where a response was made."""

    async def find(self, response_id: str) -> ResponseHome | None:
        """Where it was made; None when unknown (never seen, or forgotten)."""


class MemoryHomes:
    """One replica's map: least recently recorded entries go first, and any after `ttl_s`."""

    def __init__(
        self,
        capacity: int = 100_000,
        ttl_s: float = 86_400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: OrderedDict[str, tuple[float, ResponseHome]] = OrderedDict()
        self._capacity = capacity
        self._ttl_s = ttl_s
        self._clock = clock

    async def remember(self, response_id: str, home: ResponseHome) -> None:
        self._entries[response_id] = (self._clock() + self._ttl_s, home)
        self._entries.move_to_end(response_id)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    async def find(self, response_id: str) -> ResponseHome | None:
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        expires, home = entry
        if self._clock() >= expires:
            del self._entries[response_id]
            return None
        return home


class RedisHomes:
    """The map shared by all replicas: one Redis key per response, expiring after `ttl_s`."""

    def __init__(
        self,
        url: str,
        ttl_s: float = 86_400.0,
        prefix: str = "arks:response:",
        timeout_s: float = 0.5,
        *,
        password: str | None = None,
    ) -> None:
        self._redis = connect(url, timeout_s, max_connections=4, password=password)
        self._ttl_ms = int(ttl_s * 1000)
        self._prefix = prefix

    async def remember(self, response_id: str, home: ResponseHome) -> None:
        value = orjson.dumps([home.namespace, home.model, home.engine])
        try:
            await self._redis.set(self._prefix + response_id, value, px=self._ttl_ms)
        except (RedisError, RedisClusterException, OSError) as err:
            raise BackendUnavailable(f"recording a response's engine: {err}") from err

    async def find(self, response_id: str) -> ResponseHome | None:
        try:
            value = await self._redis.get(self._prefix + response_id)
        except (RedisError, RedisClusterException, OSError) as err:
            raise BackendUnavailable(f"looking up a response's engine: {err}") from err
        if value is None:
            return None
        namespace, model, engine = orjson.loads(value)
        return ResponseHome(str(namespace), str(model), str(engine))

    async def close(self) -> None:
        await self._redis.aclose()
