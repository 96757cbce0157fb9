"""Budgets in Redis: `admit` and `settle` are each one atomic Lua script, one round trip.

Per budget `K` (under the prefix) four keys:
  K:used    the used total (an integer; missing until settled or restored)
  K:leased  the sum of the live leases' amounts, so a check need not add them up
  K:leases  hash: request id -> lease amount
  K:expiry  sorted set: request id -> lease expiry (epoch seconds, the caller's clock)
The three lease keys are always written together and given the same expiry, so they never
disagree. A script first drops the budget's expired leases from all three, then reads or writes.

On a Redis Cluster a budget's keys carry `{K}` as their hash tag, so a script over one budget
stays in one slot; a call over several budgets runs one script per slot, at once. Admission is
still all or nothing: when a slot refuses, the slots that took their leases give them back
(RELEASE). The generation marker (see `restore`) is one per slot there, as a master can lose its
data alone.

Expiry: `K:used` gets PEXPIREAT from `expires_at` when one is given (else it persists). The
lease keys expire with the budget or when their latest lease would (relative, so a skew between
the caller's clock and Redis's cannot drop live leases), whichever comes first by the caller's
clock: an idle budget without `expires_at` leaves nothing behind but its used total.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import RedisError

from arks.adapters.redis.client import (
    Script,
    answer_within,
    connect,
    mget,
    run,
    run_many,
    target,
)
from arks.adapters.redis.resp import pipelined
from arks.limits.budgets import (
    LEVELS_PER_READ,
    SETTLED_MEMORY_S,
    Admission,
    Charge,
    Lease,
    Level,
)
from arks.limits.budgets.room import (
    NOTHING_TO_ADMIT,
    check_admit,
    check_restore,
    check_settle,
    merge_leases,
)
from arks.limits.model import BackendUnavailable

# A budget's keys (and K:settled, written by settlements only); no suffix ends another.
SUFFIXES = (":used", ":leased", ":leases", ":expiry")

# Numbers reach Lua as the caller's strings and go back to Redis as strings: "%d" for sums (Lua
# would print 1e15 as "1e+15"), the raw reply for stored integers. Times are epoch seconds as
# repr(float), so sorted-set scores are the very doubles the memory store compares.
_PRELUDE = """
local function int(n)
  return string.format("%d", n)
end

local function drop_expired(leased_key, leases_key, expiry_key, now)
  local ids = redis.call("ZRANGEBYSCORE", expiry_key, "-inf", now)
  if #ids == 0 then
    return
  end
  local total = 0
  for first = 1, #ids, 500 do  -- unpack is bounded by Lua's C stack
    local last = math.min(first + 499, #ids)
    local amounts = redis.call("HMGET", leases_key, unpack(ids, first, last))
    for j = 1, #amounts do
      if amounts[j] then
        total = total + tonumber(amounts[j])
      end
    end
    redis.call("HDEL", leases_key, unpack(ids, first, last))
  end
  redis.call("ZREMRANGEBYSCORE", expiry_key, "-inf", now)
  if redis.call("DECRBY", leased_key, int(total)) <= 0 then
    redis.call("DEL", leased_key)
  end
end
"""

# KEYS: the four keys of each budget, in lease order. ARGV[1] now, ARGV[2] lease expiry (now +
# ttl), ARGV[3] request id; then per budget: limit, amount, budget expiry in ms or "".
# Reply: {admitted 0/1, index of the deciding budget, its used, leased and this request's lease,
# what the leases replaced}, figures read before any lease is taken; what they replaced is per
# budget the request's lease before (amount and expiry, "" for none; empty when refused), so
# RELEASE can put it back. A refusal writes nothing but the expired leases' drop.
ADMIT = (
    _PRELUDE
    + """
local now, until_s, rid = ARGV[1], ARGV[2], ARGV[3]
local count = #KEYS / 4
local figures = {}
for i = 1, count do
  local k, a = (i - 1) * 4, 3 + (i - 1) * 3
  drop_expired(KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], now)
  local used = redis.call("GET", KEYS[k + 1]) or "0"
  local leased = redis.call("GET", KEYS[k + 2]) or "0"
  local own = redis.call("HGET", KEYS[k + 3], rid) or "0"
  figures[i] = {used, leased, own}
  local others = tonumber(leased) - tonumber(own)
  if tonumber(used) + others + tonumber(ARGV[a + 2]) > tonumber(ARGV[a + 1]) then
    return {0, i, used, leased, own, {}}
  end
end
local replaced = {}
for i = 1, count do
  local k, a = (i - 1) * 4, 3 + (i - 1) * 3
  local amount, expires_ms = ARGV[a + 2], ARGV[a + 3]
  replaced[#replaced + 1] = figures[i][3]
  replaced[#replaced + 1] = redis.call("ZSCORE", KEYS[k + 4], rid) or ""
  redis.call("HSET", KEYS[k + 3], rid, amount)
  redis.call("ZADD", KEYS[k + 4], until_s, rid)
  redis.call("INCRBY", KEYS[k + 2], int(tonumber(amount) - tonumber(figures[i][3])))
  local latest = tonumber(redis.call("ZRANGE", KEYS[k + 4], -1, -1, "WITHSCORES")[2])
  local lease_ms = math.ceil((latest - tonumber(now)) * 1000)
  if expires_ms ~= "" then
    redis.call("PEXPIREAT", KEYS[k + 1], expires_ms)
  end
  for j = 2, 4 do
    if expires_ms ~= "" and tonumber(expires_ms) <= latest * 1000 then
      redis.call("PEXPIREAT", KEYS[k + j], expires_ms)
    else
      redis.call("PEXPIRE", KEYS[k + j], int(lease_ms))
    end
  end
end
local last = figures[count]
return {1, count, last[1], last[2], last[3], replaced}
"""
)

# KEYS[1] the store's generation marker, then the four keys of each budget and its K:settled
# (sorted set: request id -> when settled), in charge order. ARGV[1] now, ARGV[2] request id,
# ARGV[3] forget settlements up to this time, ARGV[4] how long K:settled outlives its last write
# (ms), ARGV[5] the generation the caller knows; then per budget: cost, budget expiry in ms or
# "". A request already settled on a budget is skipped there (a retry after a lost reply).
# Reply: {how many charges were given, 1 if the marker is the caller's generation, then each
# budget's used total after (as a string)}.
SETTLE = (
    _PRELUDE
    + """
local now, rid, forget, memory_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local count = (#KEYS - 1) / 5
local totals = {}
for i = 1, count do
  local k, a = 1 + (i - 1) * 5, 5 + (i - 1) * 2
  local settled = KEYS[k + 5]
  redis.call("ZREMRANGEBYSCORE", settled, "-inf", forget)
  if redis.call("ZADD", settled, "NX", now, rid) == 1 then
    redis.call("PEXPIRE", settled, memory_ms)
    drop_expired(KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], now)
    local own = redis.call("HGET", KEYS[k + 3], rid)
    if own then
      redis.call("HDEL", KEYS[k + 3], rid)
      redis.call("ZREM", KEYS[k + 4], rid)
      if redis.call("DECRBY", KEYS[k + 2], own) <= 0 then
        redis.call("DEL", KEYS[k + 2])
      end
    end
    local cost, expires_ms = ARGV[a + 1], ARGV[a + 2]
    if cost ~= "0" then
      redis.call("INCRBY", KEYS[k + 1], cost)
    end
    if expires_ms ~= "" then
      redis.call("PEXPIREAT", KEYS[k + 1], expires_ms)
    end
  end
  totals[i] = redis.call("GET", KEYS[k + 1]) or "0"
end
local generation = redis.call("GET", KEYS[1])
return {count, (generation and generation == ARGV[5]) and 1 or 0, unpack(totals)}
"""
)

# KEYS: the four keys of each budget. ARGV[1] now (ADMIT's), ARGV[2] request id; then per budget
# what ADMIT's lease replaced (its reply's last item: amount and expiry, "" for none). Takes back
# the leases ADMIT took for the request (on a cluster, when another slot refused it or failed): a
# lease the request did not hold before goes, one it held is put back as it was (a refusal keeps
# the lease it had). Reply: how many.
RELEASE = (
    _PRELUDE
    + """
local rid = ARGV[2]
local released = 0
for i = 1, #KEYS / 4 do
  local k, a = (i - 1) * 4, 1 + i * 2
  drop_expired(KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], ARGV[1])
  local own = redis.call("HGET", KEYS[k + 3], rid)
  if own then
    local before, until_s = ARGV[a], ARGV[a + 1]
    local leased
    if until_s == "" then
      redis.call("HDEL", KEYS[k + 3], rid)
      redis.call("ZREM", KEYS[k + 4], rid)
      leased = redis.call("DECRBY", KEYS[k + 2], own)
    else
      redis.call("HSET", KEYS[k + 3], rid, before)
      redis.call("ZADD", KEYS[k + 4], until_s, rid)
      leased = redis.call("INCRBY", KEYS[k + 2], int(tonumber(before) - tonumber(own)))
    end
    if leased <= 0 then
      redis.call("DEL", KEYS[k + 2])
    end
    released = released + 1
  end
end
return released
"""
)

# KEYS: the four keys of each budget. ARGV[1] now, ARGV[2] the new lease expiry (now + ttl);
# then per budget: how many request ids, and the ids. A lease still held gets the new expiry, and
# the lease keys live at least as long (never shortened). Reply: how many leases were renewed.
RENEW = (
    _PRELUDE
    + """
local now, until_s = ARGV[1], ARGV[2]
local renewed, at = 0, 3
for i = 1, #KEYS / 4 do
  local k = (i - 1) * 4
  drop_expired(KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], now)
  local n = tonumber(ARGV[at])
  local any = false
  for j = at + 1, at + n do
    if redis.call("HEXISTS", KEYS[k + 3], ARGV[j]) == 1 then
      redis.call("ZADD", KEYS[k + 4], "XX", until_s, ARGV[j])
      renewed, any = renewed + 1, true
    end
  end
  at = at + n + 1
  if any then
    local lease_ms = math.ceil((tonumber(until_s) - tonumber(now)) * 1000)
    for j = 2, 4 do
      if redis.call("PTTL", KEYS[k + j]) < lease_ms then
        redis.call("PEXPIRE", KEYS[k + j], int(lease_ms))
      end
    end
  end
end
return renewed
"""
)

# KEYS: the four keys of each budget. ARGV[1] now. Reply: each budget's used total and leased sum
# (as strings), after dropping its expired leases as an admission would.
LEVELS = (
    _PRELUDE
    + """
local out = {}
for i = 1, #KEYS / 4 do
  local k = (i - 1) * 4
  drop_expired(KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], ARGV[1])
  out[#out + 1] = redis.call("GET", KEYS[k + 1]) or "0"
  out[#out + 1] = redis.call("GET", KEYS[k + 2]) or "0"
end
return out
"""
)

# KEYS: used totals, ARGV: their values. Reply: how many were missing and set.
RESTORE = """
-- KEYS[1] the store's generation marker, then the used keys; ARGV[1] the generation this client
-- last saw ("" if none), ARGV[2] a new generation, then the snapshot values.
local seen = redis.call("GET", KEYS[1])
if seen and seen == ARGV[1] then
  return {0, seen}  -- the store kept its data: nothing to put back
end
local restored = 0
for i = 2, #KEYS do
  local value = ARGV[i + 1]
  if seen == false and ARGV[1] ~= "" then
    -- The marker this client saw is gone: Redis lost its data. Whatever was charged since the
    -- restart is new; the snapshot is what came before it.
    redis.call("INCRBY", KEYS[i], value)
    restored = restored + 1
  elseif redis.call("SET", KEYS[i], value, "NX") then
    restored = restored + 1  -- first contact: fill only what is missing
  end
end
if seen then
  return {restored, seen}
end
redis.call("SET", KEYS[1], ARGV[2])
return {restored, ARGV[2]}
"""

# KEYS: used totals, ARGV: their floors. Reply: how many were raised. A raised total keeps the
# key's expiry (KEEPTTL, Redis 6.0+): the budget still goes when its period's grace ends.
RAISE = """
local raised = 0
for i = 1, #KEYS do
  local floor = tonumber(ARGV[i])
  local current = tonumber(redis.call("GET", KEYS[i]) or "0")
  if floor > current then
    redis.call("SET", KEYS[i], ARGV[i], "KEEPTTL")
    raised = raised + 1
  end
end
return raised
"""

_ADMIT, _SETTLE, _RENEW, _RESTORE, _LEVELS, _RAISE, _RELEASE = (
    Script.of(ADMIT),
    Script.of(SETTLE),
    Script.of(RENEW),
    Script.of(RESTORE),
    Script.of(LEVELS),
    Script.of(RAISE),
    Script.of(RELEASE),
)

T = TypeVar("T")


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """A short hash tag for each cluster slot: `{tag}` puts a key in that slot (the slots'
    generation markers live there). Computed once: ~0.2 s, only by a client of a cluster."""
    tags: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
    missing = REDIS_CLUSTER_HASH_SLOTS
    for n in itertools.count():
        tag = format(n, "x")
        slot = key_slot(tag.encode())
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
            if not missing:
                return tuple(t for t in tags if t is not None)
    raise AssertionError("unreachable")


def by_slot(items: Sequence[T], key: Callable[[T], str]) -> dict[int, list[int]]:
    """The items' indexes grouped by the cluster slot of `key(item)`, in first-seen order."""
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key_slot(key(item).encode()), []).append(i)
    return groups


class RedisBudgets:
    """Shared budgets in Redis; every key is `prefix + budget key + suffix` (on a cluster
    `prefix + {budget key} + suffix`).

    Any failure to get an answer within `timeout_s` (connect, pool wait, script) raises
    BackendUnavailable. Broken connections are dropped and reopened on the next call, so the
    store recovers by itself when Redis comes back (empty: see `restore`).
    """

    def __init__(
        self,
        url: str,
        prefix: str = "arks:budget:",
        timeout_s: float = 0.5,
        *,
        max_connections: int = 64,
        password: str | None = None,
        **options: Any,
    ) -> None:
        """`options`: the rest of `connect`'s (username, sentinel_username, sentinel_password,
        tls)."""
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._cluster = target(url).kind == "cluster"
        if self._cluster and "{" in prefix:
            raise ValueError(f"a cluster's budget prefix has no hash tag of its own: {prefix!r}")
        self._generation: str | None = None  # the store's generation marker as last seen
        self._generations: dict[int, str] = {}  # a cluster's, by slot
        self._redis: Redis = connect(url, timeout_s, max_connections, password, **options)
        # One plain server: the scripts go over the lean pipelined client (resp.py).
        self._fast = pipelined(url, timeout_s, password, **options)

    async def admit(
        self, request_id: str, leases: Sequence[Lease], ttl_s: float, now: float
    ) -> Admission:
        """Admitted: the figures are the last budget's (in the order given), before its lease."""
        merged = merge_leases(leases)
        check_admit(merged, ttl_s, now)
        if not merged:
            return NOTHING_TO_ADMIT
        groups = self._groups(merged, lambda lease: lease.key)
        head: list[str | int] = [repr(now), repr(now + ttl_s), request_id]
        calls = []
        for group in groups:
            args = list(head)
            for i in group:
                args += [merged[i].limit, merged[i].amount, _ms(merged[i].expires_at)]
            calls.append(([n for i in group for n in self._names(merged[i].key)], args))
        async with self._answer("admit"):
            # Every slot's script settles before any error is raised: one still running would
            # take its leases behind the caller's back.
            replies = await asyncio.gather(
                *(self._run(_ADMIT, *call) for call in calls), return_exceptions=True
            )
            failed = next((r for r in replies if isinstance(r, BaseException)), None)
            for group, reply in zip(groups, replies, strict=True):
                if failed is None and not (
                    isinstance(reply, list) and len(reply) == 6 and 1 <= reply[1] <= len(group)
                ):
                    failed = RedisError(f"unexpected script reply: {reply!r}")
            # The slots that took their leases give them back when another refused or failed.
            taken = {g: r for g, r in enumerate(replies) if isinstance(r, list) and r[0] == 1}
            refused = [g for g in range(len(groups)) if g not in taken]
            if refused and taken:
                await asyncio.gather(
                    *(
                        self._run(_RELEASE, calls[g][0], [repr(now), request_id, *_texts(r[5])])
                        for g, r in taken.items()
                    )
                )
            if failed is not None:
                raise failed
        answers = [r for r in replies if isinstance(r, list)]
        # Refused: the first budget that refused, in lease order; admitted: the last budget.
        if refused:
            deciding = min(refused, key=lambda g: groups[g][answers[g][1] - 1])
        else:
            deciding = max(range(len(groups)), key=lambda g: groups[g][-1])
        admitted, index, used, leased, own, _ = answers[deciding]
        lease = merged[groups[deciding][index - 1]]
        return Admission(admitted == 1, lease.key, int(used), int(leased) - int(own), lease.limit)

    async def settle(
        self, request_id: str, charges: Sequence[Charge], now: float
    ) -> Mapping[str, int] | None:
        """The charged budgets' totals just after, when the store still holds the generation
        `restore` last saw (None: wiped and not restored yet, or never restored by this
        client). Totals, not increments: a snapshot takes the larger figure, so a read of the
        store that already saw this settlement cannot make it count twice."""
        (totals,) = await self.settle_many([(request_id, charges)], now)
        return totals

    async def settle_many(
        self, settlements: Sequence[tuple[str, Sequence[Charge]]], now: float
    ) -> list[Mapping[str, int] | None]:
        """Every settlement's script in one pipeline: one round trip for an access-log batch."""
        for _, charges in settlements:
            check_settle(charges, now)
        # Per settlement, its calls: one per slot on a cluster, else one.
        plans = [
            self._settle_calls(request_id, charges, now) for request_id, charges in settlements
        ]
        calls = [call for plan in plans for (_, _, call) in plan]
        replies: list[Any] = []
        if calls:
            async with self._answer("settle"):
                if self._fast is not None:  # one write for them all, on the pipelined client
                    replies = list(
                        await asyncio.gather(*(self._run(_SETTLE, *call) for call in calls))
                    )
                else:
                    replies = await run_many(self._redis, _SETTLE, calls)
        out: list[Mapping[str, int] | None] = []
        answers = iter(replies)
        for (_, charges), plan in zip(settlements, plans, strict=True):
            if not charges:
                out.append({})
                continue
            totals: dict[str, int] = {}
            vouched = False
            for indexes, _, _ in plan:
                reply = next(answers)
                if not (
                    isinstance(reply, list)
                    and len(reply) == 2 + len(indexes)
                    and reply[0] == len(indexes)
                ):
                    raise BackendUnavailable(f"redis budgets (settle): unexpected reply {reply!r}")
                if reply[1]:  # the generation this client restored: totals it can vouch for
                    vouched = True
                    totals.update(
                        (charges[i].key, int(total))
                        for i, total in zip(indexes, reply[2:], strict=True)
                    )
            out.append(totals if vouched else None)
        return out

    def _settle_calls(
        self, request_id: str, charges: Sequence[Charge], now: float
    ) -> list[tuple[list[int], int | None, tuple[list[str], list[str | int]]]]:
        """(charge indexes, slot or None, (keys, args)) of each SETTLE call a settlement needs."""
        calls = []
        for slot, indexes in self._slots(charges, lambda charge: charge.key):
            keys = [self._marker(slot)]
            for i in indexes:
                keys += [*self._names(charges[i].key), self._name(charges[i].key, ":settled")]
            args: list[str | int] = [
                repr(now),
                request_id,
                repr(now - SETTLED_MEMORY_S),
                math.ceil(SETTLED_MEMORY_S * 1000),
                self._known(slot),
            ]
            for i in indexes:
                args += [str(charges[i].cost), _ms(charges[i].expires_at)]
            calls.append((indexes, slot, (keys, args)))
        return calls

    async def renew(self, held: Mapping[str, Sequence[str]], ttl_s: float, now: float) -> int:
        held = {key: ids for key, ids in held.items() if ids}
        if not held:
            return 0
        budgets = list(held)
        calls = []
        for _, indexes in self._slots(budgets, lambda key: key):
            keys = [name for i in indexes for name in self._names(budgets[i])]
            args: list[str | int] = [repr(now), repr(now + ttl_s)]
            for i in indexes:
                args += [len(held[budgets[i]]), *held[budgets[i]]]
            calls.append((keys, args))
        async with self._answer("renew"):
            renewed = await asyncio.gather(*(self._run(_RENEW, *call) for call in calls))
        return sum(int(n) for n in renewed)

    async def used(self, keys: Sequence[str]) -> dict[str, int]:
        if not keys:
            return {}
        async with self._answer("used"):
            values = await mget(self._redis, [self._name(key, ":used") for key in keys])
            return {key: int(value or 0) for key, value in zip(keys, values, strict=True)}

    async def levels(self, keys: Sequence[str], now: float) -> dict[str, Level]:
        out: dict[str, Level] = {}
        unique = list(dict.fromkeys(keys))
        for _, indexes in self._slots(unique, lambda key: key):
            for first in range(0, len(indexes), LEVELS_PER_READ):
                chunk = [unique[i] for i in indexes[first : first + LEVELS_PER_READ]]
                names = [name for key in chunk for name in self._names(key)]
                async with self._answer("levels"):
                    reply = await self._run(_LEVELS, names, [repr(now)])
                    if not (isinstance(reply, list) and len(reply) == 2 * len(chunk)):
                        raise RedisError(f"unexpected script reply: {reply!r}")
                for i, key in enumerate(chunk):
                    out[key] = Level(int(reply[2 * i]), int(reply[2 * i + 1]))
        return {key: out[key] for key in unique}

    async def restore(self, used: Mapping[str, int]) -> int:
        """Put the snapshot back if Redis lost it. A generation marker tells a store that was
        wiped (the marker this client saw is gone: the snapshot is added to whatever was charged
        since) from one met for the first time (only missing totals are filled). Zeros are not
        restored. Restored totals have no expiry until the budget's next lease or charge. On a
        cluster each slot of the snapshot's budgets has its marker: a master can lose its data
        alone."""
        check_restore(used)
        budgets = list(used)
        # Called with nothing to restore too: the first call marks the generation, so that a
        # wipe before any usage was snapshotted is still recognised as one.
        plans = (
            self._slots(budgets, lambda key: key)
            if self._cluster
            else [(None, list(range(len(budgets))))]
        )
        restored = 0
        for slot, indexes in plans:
            missing = {budgets[i]: used[budgets[i]] for i in indexes if used[budgets[i]]}
            keys = [self._marker(slot), *(self._name(key, ":used") for key in missing)]
            args: list[str | int] = [self._known(slot), uuid.uuid4().hex, *missing.values()]
            async with self._answer("restore"):
                reply = await self._run(_RESTORE, keys, args)
            count, generation = reply
            seen = generation.decode() if isinstance(generation, bytes) else str(generation)
            if slot is None:
                self._generation = seen
            else:
                self._generations[slot] = seen
            restored += int(count)
        # On a cluster the slots this snapshot has no budget in are forgotten: their markers
        # are not kept up, so a wipe there would not be seen before their first budget is
        # snapshotted, and that budget is then met as for the first time (filled if missing,
        # never added twice). Only after a whole pass: a slot a failed call did not reach keeps
        # its generation, or a wipe there would be met as a first contact and its snapshot lost.
        if self._cluster:
            planned = {slot for slot, _ in plans}
            self._generations = {s: g for s, g in self._generations.items() if s in planned}
        return restored

    async def raise_to(self, used: Mapping[str, int]) -> int:
        check_restore(used)
        floors = {key: value for key, value in used.items() if value}
        if not floors:
            return 0
        budgets = list(floors)
        calls = []
        for _, indexes in self._slots(budgets, lambda key: key):
            keys = [self._name(budgets[i], ":used") for i in indexes]
            calls.append((keys, [floors[budgets[i]] for i in indexes]))
        async with self._answer("raise"):
            raised = await asyncio.gather(*(self._run(_RAISE, *call) for call in calls))
        return sum(int(n) for n in raised)

    async def close(self) -> None:
        if self._fast is not None:
            await self._fast.close()
        await self._redis.aclose()

    def _name(self, key: str, suffix: str) -> str:
        """A budget's key: on a cluster `{key}` is its hash tag, so a budget is in one slot (a
        key that would make the tag empty would spread its budget over slots: refused)."""
        if not self._cluster:
            return self._prefix + key + suffix
        if not key or key[0] == "}":
            raise ValueError(f"budget key {key!r} cannot be a cluster hash tag")
        return f"{self._prefix}{{{key}}}{suffix}"

    def _names(self, key: str) -> list[str]:
        return [self._name(key, suffix) for suffix in SUFFIXES]

    def _marker(self, slot: int | None) -> str:
        """The generation marker: the store's, or on a cluster the slot's."""
        if slot is None:
            return self._prefix + "generation"
        return f"{self._prefix}{{{slot_tags()[slot]}}}:generation"

    def _known(self, slot: int | None) -> str:
        """The generation this client last saw at `slot`'s marker ("" if none)."""
        seen = self._generation if slot is None else self._generations.get(slot)
        return seen or ""

    def _slots(
        self, items: Sequence[T], key: Callable[[T], str]
    ) -> list[tuple[int | None, list[int]]]:
        """The items' indexes by the slot of their budget's keys (on a cluster), else all at
        once under no slot."""
        if not self._cluster:
            return [(None, list(range(len(items))))] if items else []
        groups = by_slot(items, lambda item: self._name(key(item), ""))
        return list(groups.items())

    def _groups(self, items: Sequence[T], key: Callable[[T], str]) -> list[list[int]]:
        return [indexes for _, indexes in self._slots(items, key)]

    def _answer(self, what: str) -> AbstractAsyncContextManager[None]:
        return answer_within(self._timeout_s, f"budgets ({what})")

    async def _run(self, script: Script, keys: list[str], args: Sequence[str | int]) -> Any:
        return await run(self._redis, script, keys, args, fast=self._fast)


def _texts(values: Sequence[Any]) -> list[str | int]:
    """A script's reply items as arguments for another."""
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def _ms(expires_at: float | None) -> str | int:
    return "" if expires_at is None else math.ceil(expires_at * 1000)
