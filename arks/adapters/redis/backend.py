"""Counters in Redis: every hit of one `apply` in one atomic Lua script, one round trip.

The script only moves state (INCRBY a window's counter, push a GCRA TAT forward) and returns the
numbers the outcome needs; `arks.limits.window` turns them into Outcomes, exactly as the memory
backend does.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import RedisError

from arks.adapters.redis.client import Script, answer_within, connect, ping, run, target
from arks.adapters.redis.resp import pipelined
from arks.limits.model import Algorithm, BackendUnavailable, Hit, Outcome
from arks.limits.window import (
    Instant,
    counter_key,
    fixed_window_outcome,
    gcra_outcome,
    validate,
)

# KEYS[i]: hit i's counter. ARGV[1], ARGV[2]: now as whole seconds and fraction (window.Instant).
# ARGV[3]: "1" for all or nothing (charge nothing if any hit would be over its limit), else "0".
# ARGV[4 + 4(i-1) ...]: hit i's algorithm ("fixed" | "gcra"), hits, limit, window_s (a fixed
# window's: how long its new key lives, the window plus any expiration jitter).
# Reply: a flag (1: charged, 0: nothing charged), then per hit: fixed window: the count after the
# hit (an integer); GCRA: how far the TAT is ahead of now after the hit, as "%.17g" (a Lua number
# in a reply would be cut to an integer). When nothing is charged, the values are what charging
# would have given. The GCRA lines mirror window.Instant, gcra_ahead, gcra_charge and
# gcra_outcome's over-limit rule operation for operation, so the float results are bit-identical
# to the memory backend's. A TAT is stored as "<whole seconds> <fraction>" to keep
# sub-microsecond precision at epoch magnitudes. Counts and window lengths go to Redis as the
# caller's strings: Lua would print 1e15 as "1e+15".
SCRIPT = """
local now_s = tonumber(ARGV[1])
local now_f = tonumber(ARGV[2])
local all_or_nothing = ARGV[3] == "1"

local function tat_ahead(key)
  local tat = redis.call("GET", key)
  if not tat then
    return 0
  end
  local sep = string.find(tat, " ", 1, true)
  local ahead = (tonumber(string.sub(tat, 1, sep - 1)) - now_s)
    + (tonumber(string.sub(tat, sep + 1)) - now_f)
  if ahead < 0 then
    ahead = 0
  end
  return ahead
end

local function gcra_charge(ahead, n, l, window_s)
  if n > 0 and l > 0 then
    return ahead + n * (tonumber(window_s) / l)
  end
  return ahead
end

if all_or_nothing then
  local counts, aheads, values, over = {}, {}, {}, false
  for i, key in ipairs(KEYS) do
    local at = 4 + (i - 1) * 4
    local algorithm, hits, limit, window_s = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
    local n, l = tonumber(hits), tonumber(limit)
    if algorithm == "fixed" then
      if counts[key] == nil then
        counts[key] = tonumber(redis.call("GET", key) or "0")
      end
      counts[key] = counts[key] + n
      values[i] = counts[key]
      if counts[key] > l then
        over = true
      end
    else
      if aheads[key] == nil then
        aheads[key] = tat_ahead(key)
      end
      aheads[key] = gcra_charge(aheads[key], n, l, window_s)
      values[i] = string.format("%.17g", aheads[key])
      local window = tonumber(window_s)
      if l == 0 then
        over = true
      else
        local interval = window / l
        local slack = interval * 1e-6
        if n == 0 then
          if aheads[key] + interval > window + slack then
            over = true
          end
        elseif aheads[key] > window + slack then
          over = true
        end
      end
    end
  end
  if over then
    table.insert(values, 1, 0)
    return values
  end
end

local replies = {1}
for i, key in ipairs(KEYS) do
  local at = 4 + (i - 1) * 4
  local algorithm, hits, limit, window_s = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  if algorithm == "fixed" then
    if tonumber(hits) > 0 then
      local used = redis.call("INCRBY", key, hits)
      if used == tonumber(hits) then
        redis.call("EXPIRE", key, window_s)
      end
      replies[i + 1] = used
    else
      replies[i + 1] = tonumber(redis.call("GET", key) or "0")
    end
  else
    local n, l = tonumber(hits), tonumber(limit)
    local ahead = gcra_charge(tat_ahead(key), n, l, window_s)
    if n > 0 and l > 0 then
      local t = now_f + ahead
      local whole = math.floor(t)
      redis.call("SET", key, string.format("%d %.17g", now_s + whole, t - whole),
        "PX", string.format("%d", (math.ceil(ahead) + 1) * 1000))
    end
    replies[i + 1] = string.format("%.17g", ahead)
  end
end
return replies
"""

_SCRIPT = Script.of(SCRIPT)

# Takes back what SCRIPT charged: a Redis Cluster runs one script per slot, and when one slot's
# hits are refused (all or nothing) the slots that charged give it back. Same KEYS and ARGV as
# SCRIPT (ARGV[3] unused). A fixed window's count goes down by the hits (the key deleted at zero,
# as if never charged); a GCRA TAT goes back by the hits' emission intervals.
UNDO = """
local now_s = tonumber(ARGV[1])
local now_f = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local at = 4 + (i - 1) * 4
  local algorithm, hits, limit, window_s = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local n, l = tonumber(hits), tonumber(limit)
  if n > 0 and algorithm == "fixed" then
    if redis.call("EXISTS", key) == 1 and redis.call("DECRBY", key, hits) <= 0 then
      redis.call("DEL", key)
    end
  elseif n > 0 and l > 0 then
    local tat = redis.call("GET", key)
    if tat then
      local sep = string.find(tat, " ", 1, true)
      local ahead = (tonumber(string.sub(tat, 1, sep - 1)) - now_s)
        + (tonumber(string.sub(tat, sep + 1)) - now_f) - n * (tonumber(window_s) / l)
      if ahead <= 0 then
        redis.call("DEL", key)
      else
        local t = now_f + ahead
        local whole = math.floor(t)
        redis.call("SET", key, string.format("%d %.17g", now_s + whole, t - whole),
          "PX", string.format("%d", (math.ceil(ahead) + 1) * 1000))
      end
    end
  end
end
return 1
"""

_UNDO = Script.of(UNDO)

_ALGORITHM_ARG = {Algorithm.FIXED_WINDOW: "fixed", Algorithm.GCRA: "gcra"}


class RedisBackend:
    """Shared counters in Redis; every key is `prefix + hit.key + suffix`.

    On a Redis Cluster the hits are grouped by their keys' slots, one script per slot, the slots
    at once: all or nothing still holds (a slot refused, the others give back what they took;
    a slot failed, the others give back theirs in any mode, as one failed script charges none),
    but only in the end, not at every instant: a request racing the give-back may see the
    counts a moment higher. Any failure to get an answer within `timeout_s` (connect, pool wait, script) raises
    BackendUnavailable. Broken connections are dropped and reopened on the next call, so the
    backend recovers by itself when Redis comes back.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "arks:rl:",
        timeout_s: float = 0.5,
        *,
        max_connections: int = 64,
        password: str | None = None,
        expiry_jitter_s: int = 0,
        **options: Any,
    ) -> None:
        """`expiry_jitter_s`: a fixed window's new key lives up to this much longer than its
        window, a random amount per key (envoyproxy/ratelimit's EXPIRATION_JITTER_MAX_SECONDS:
        keys made together do not all expire in the same second). `options`: the rest of
        `connect`'s (username, sentinel_username, sentinel_password, tls)."""
        if expiry_jitter_s < 0:
            raise ValueError("the expiration jitter is not negative")
        self._jitter = expiry_jitter_s
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._cluster = target(url).kind == "cluster"
        self._redis: Redis = connect(url, timeout_s, max_connections, password, **options)
        # One plain server: the scripts go over the lean pipelined client (resp.py).
        self._fast = pipelined(url, timeout_s, password, **options)

    async def apply(
        self, hits: Sequence[Hit], now: float, *, all_or_nothing: bool = False
    ) -> list[Outcome]:
        if not hits:
            return []
        for hit in hits:
            validate(hit)
        at = Instant.of(now)
        keys = [self._prefix + counter_key(hit, now) for hit in hits]
        head: list[str | int] = [at.seconds, repr(at.fraction), "1" if all_or_nothing else "0"]
        slots = _by_slot(keys) if self._cluster else [list(range(len(hits)))]
        calls = [
            (
                [keys[i] for i in group],
                head + [a for i in group for a in _hit_args(hits[i], self._jitter)],
            )
            for group in slots
        ]
        if len(calls) == 1:  # one server or one slot: one script, nothing to give back
            if self._fast is not None:  # the hot path: bounded by its watchdog, no timer here
                try:
                    reply = await self._run(*calls[0])
                except (RedisError, OSError) as err:
                    raise BackendUnavailable(
                        f"redis counters: {type(err).__name__}: {err}"
                    ) from err
            else:
                async with answer_within(self._timeout_s, "counters"):
                    reply = await self._run(*calls[0])
            return [_outcome(hit, value, now) for hit, value in zip(hits, reply[1:], strict=True)]
        async with answer_within(self._timeout_s, "counters"):
            # Every slot's script settles before any error is raised: a slot still running would
            # charge behind the caller's back.
            replies = await asyncio.gather(
                *(self._run(*call) for call in calls), return_exceptions=True
            )
            failed = next((r for r in replies if isinstance(r, BaseException)), None)
            # replies[g][0] says whether slot g's hits were charged. A slot that failed charged
            # nothing (or, timed out, cannot be told): the others give theirs back too, as one
            # script that failed would have charged nothing.
            refused = all_or_nothing and any(r[0] == 0 for r in replies if isinstance(r, list))
            if len(calls) > 1 and (failed is not None or refused):
                taken = [
                    call
                    for call, r in zip(calls, replies, strict=True)
                    if isinstance(r, list) and r[0] == 1
                ]
                await asyncio.gather(
                    *(run(self._redis, _UNDO, *call, fast=self._fast) for call in taken)
                )
            if failed is not None:
                raise failed
        values: list[Any] = [None] * len(hits)
        answers = [r for r in replies if isinstance(r, list)]
        for group, reply in zip(slots, answers, strict=True):
            for i, value in zip(group, reply[1:], strict=True):
                values[i] = value
        return [_outcome(hit, value, now) for hit, value in zip(hits, values, strict=True)]

    async def refund(self, hits: Sequence[Hit], now: float) -> None:
        """UNDO for `hits`, a script per slot (BackendUnavailable when Redis does not answer)."""
        if not hits:
            return
        at = Instant.of(now)
        keys = [self._prefix + counter_key(hit, now) for hit in hits]
        head: list[str | int] = [at.seconds, repr(at.fraction), "0"]
        slots = _by_slot(keys) if self._cluster else [list(range(len(hits)))]
        undo = [
            ([keys[i] for i in group], head + [a for i in group for a in _hit_args(hits[i], 0)])
            for group in slots
        ]
        async with answer_within(self._timeout_s, "counters"):
            await asyncio.gather(
                *(run(self._redis, _UNDO, *call, fast=self._fast) for call in undo)
            )

    async def ping(self) -> None:
        async with answer_within(self._timeout_s, "counters"):
            if self._fast is not None:
                await self._fast.call("PING")
            else:
                await ping(self._redis)

    async def close(self) -> None:
        if self._fast is not None:
            await self._fast.close()
        await self._redis.aclose()

    async def _run(self, keys: list[str], args: list[str | int]) -> list[Any]:
        replies = await run(self._redis, _SCRIPT, keys, args, fast=self._fast)
        if not isinstance(replies, list) or len(replies) != len(keys) + 1:
            raise RedisError(f"unexpected script reply: {replies!r}")
        return replies


def _hit_args(hit: Hit, jitter_s: int) -> list[str | int]:
    lives = hit.window_s
    if jitter_s and hit.algorithm is Algorithm.FIXED_WINDOW:  # a GCRA cell's TTL is its own
        lives += random.randrange(jitter_s)  # as upstream: [0, max)
    return [_ALGORITHM_ARG[hit.algorithm], hit.hits, hit.limit, lives]


def _by_slot(keys: Sequence[str]) -> list[list[int]]:
    """The keys' indexes grouped by Redis Cluster slot, in first-seen order."""
    groups: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key_slot(key.encode()), []).append(i)
    return list(groups.values())


def _outcome(hit: Hit, reply: Any, now: float) -> Outcome:
    if hit.algorithm is Algorithm.GCRA:
        return gcra_outcome(float(reply), hit)
    return fixed_window_outcome(int(reply), hit, now)
