"""The counter backends against one shared suite: memory, the real Redis on 127.0.0.1:6379, and
a real 3-master Redis Cluster (where one apply's hits spread over slots: a script per slot).

Time is passed in (`now`), so windows and GCRA intervals are stepped exactly. Redis outage tests
run their own redis-server on a free port and never touch the shared one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from arks.adapters.redis.backend import RedisBackend
from arks.limits.backends import BackendUnavailable, CounterBackend, MemoryBackend
from arks.limits.backends.per_second import PerSecondSplit
from arks.limits.model import Algorithm, Hit
from tests.support.redis_server import SHARED_REDIS, PrivateRedis, fresh_prefix
from tests.support.redis_topologies import Cluster

T0 = 1_700_000_040.0  # a window start for 10 s and 60 s windows

# The shared suite asserts what is counted, not the deadline (the outage tests below do): a
# generous one keeps 200 concurrent applies from timing out on a loaded 2-core CI machine.
SHARED_TIMEOUT_S = 5.0

FIXED = Algorithm.FIXED_WINDOW
GCRA = Algorithm.GCRA


def hit(
    limit: int, hits: int = 1, *, key: str = "k", window_s: int = 60, algorithm: Algorithm = FIXED
) -> Hit:
    return Hit(key=key, limit=limit, window_s=window_s, hits=hits, algorithm=algorithm)


@asynccontextmanager
async def shared_redis_backend(prefix: str = "") -> AsyncIterator[RedisBackend]:
    """A RedisBackend on the shared server under a fresh prefix; its keys are deleted after."""
    async with fresh_prefix("arks:rl:test") as fresh:
        backend = RedisBackend(SHARED_REDIS, prefix=prefix or fresh, timeout_s=SHARED_TIMEOUT_S)
        try:
            yield backend
        finally:
            await backend.close()


@pytest.fixture(params=["memory", "redis", "redis-cluster", "per-second-split"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[CounterBackend]:
    if request.param == "memory":
        memory = MemoryBackend()
        yield memory
        await memory.close()
    elif request.param == "redis":
        async with shared_redis_backend() as redis_backend:
            yield redis_backend
    elif request.param == "per-second-split":  # REDIS_PERSECOND: a second store, same answers
        async with shared_redis_backend() as per_second, shared_redis_backend() as other:
            yield PerSecondSplit(per_second, other)
    else:
        cluster = request.getfixturevalue("redis_cluster")
        on_cluster = RedisBackend(
            f"redis+cluster://{cluster.urls}",
            prefix=f"arks:rl:test:{uuid.uuid4().hex}:",
            timeout_s=SHARED_TIMEOUT_S,
        )
        yield on_cluster
        await on_cluster.close()


async def over(backend: CounterBackend, h: Hit, now: float) -> bool:
    (outcome,) = await backend.apply([h], now)
    return outcome.over_limit


# Fixed window -----------------------------------------------------------------------------------


async def test_fixed_window_passes_limit_requests_then_is_over(backend: CounterBackend) -> None:
    results = [await over(backend, hit(5), T0 + 1) for _ in range(6)]
    assert results == [False] * 5 + [True]


async def test_fixed_window_resets_exactly_at_the_boundary(backend: CounterBackend) -> None:
    assert not await over(backend, hit(2), T0)
    assert not await over(backend, hit(2), T0 + 30)
    assert await over(backend, hit(2), T0 + 59.999)
    (outcome,) = await backend.apply([hit(2)], T0 + 60)
    assert not outcome.over_limit
    assert outcome.used == 1
    assert outcome.reset_s == 60.0


async def test_fixed_window_hits_addend_counts_as_many(backend: CounterBackend) -> None:
    (a,) = await backend.apply([hit(10, hits=4)], T0)
    (b,) = await backend.apply([hit(10, hits=6)], T0)
    (c,) = await backend.apply([hit(10, hits=1)], T0)
    assert (a.used, a.remaining, a.over_limit) == (4, 6, False)
    assert (b.used, b.remaining, b.over_limit) == (10, 0, False)  # exactly the limit passes
    assert (c.used, c.remaining, c.over_limit) == (11, 0, True)


async def test_fixed_window_zero_hits_reads_without_counting(backend: CounterBackend) -> None:
    (empty,) = await backend.apply([hit(3, hits=0)], T0)
    assert (empty.used, empty.remaining, empty.over_limit) == (0, 3, False)
    await backend.apply([hit(3, hits=2)], T0)
    for _ in range(3):
        (read,) = await backend.apply([hit(3, hits=0)], T0 + 1)
        assert (read.used, read.remaining) == (2, 1)


# GCRA -------------------------------------------------------------------------------------------


def g(limit: int = 10, hits: int = 1, *, key: str = "k") -> Hit:
    """A GCRA hit with a 10 s window: `limit` 10 makes the emission interval 1 s."""
    return hit(limit, hits, key=key, window_s=10, algorithm=GCRA)


async def test_gcra_spreads_with_no_burst_at_the_window_edge(backend: CounterBackend) -> None:
    t = T0 + 0.25  # T = 1 s
    assert [await over(backend, g(), t) for _ in range(10)] == [False] * 10
    assert not await over(backend, g(), t + 1.0)
    assert await over(backend, g(), t + 1.0)


async def test_gcra_debt_from_a_large_cost_blocks_until_repaid(backend: CounterBackend) -> None:
    (charged,) = await backend.apply([g(hits=30)], T0)
    assert charged.over_limit
    assert charged.reset_s == pytest.approx(21.0)  # 30 s ahead, tolerance 10 s, interval 1 s
    assert await over(backend, g(hits=0), T0 + 20.5)
    assert not await over(backend, g(hits=0), T0 + 21.0)
    assert not await over(backend, g(), T0 + 21.0)
    assert await over(backend, g(), T0 + 21.0)


async def test_gcra_zero_hits_reads_without_charging(backend: CounterBackend) -> None:
    for _ in range(20):
        (read,) = await backend.apply([g(hits=0)], T0)
        assert (read.over_limit, read.remaining, read.used) == (False, 10, 0)


async def test_gcra_limit_zero_is_always_over(backend: CounterBackend) -> None:
    assert await over(backend, g(limit=0), T0)
    assert await over(backend, g(limit=0, hits=0), T0)


# Several hits, concurrency ----------------------------------------------------------------------


async def test_hits_in_one_apply_are_independent(backend: CounterBackend) -> None:
    batch = [
        hit(2, key="per-user"),
        hit(5, key="per-model"),
        g(limit=3, key="tokens", hits=2),
        hit(100, key="read-only", hits=0),
    ]
    rounds = [await backend.apply(batch, T0 + 1) for _ in range(3)]
    assert [[o.over_limit for o in r] for r in rounds] == [
        [False, False, False, False],
        [False, False, True, False],
        [True, False, True, False],
    ]
    assert [o.used for o in rounds[-1]] == [3, 3, 3, 0]


@pytest.mark.parametrize("algorithm", [FIXED, GCRA])
async def test_concurrent_applies_admit_exactly_the_limit(
    backend: CounterBackend, algorithm: Algorithm
) -> None:
    h = hit(100, algorithm=algorithm)
    outcomes = await asyncio.gather(*(backend.apply([h], T0 + 2.5) for _ in range(200)))
    assert sum(not o.over_limit for (o,) in outcomes) == 100


# All or nothing: admission charges a refused request nothing -----------------------------------


async def test_all_or_nothing_charges_no_hit_when_one_is_over(backend: CounterBackend) -> None:
    rpm, rpd = hit(3, key="rpm"), hit(1, key="rpd", window_s=86400)
    first = await backend.apply([rpm, rpd], T0, all_or_nothing=True)
    assert [o.over_limit for o in first] == [False, False]
    refused = await backend.apply([rpm, rpd], T0 + 1, all_or_nothing=True)
    # The outcomes say what charging would have given; nothing was charged.
    assert [(o.over_limit, o.used) for o in refused] == [(False, 2), (True, 2)]
    (rpm_now, rpd_now) = await backend.apply(
        [hit(3, 0, key="rpm"), hit(1, 0, key="rpd", window_s=86400)], T0 + 2
    )
    assert (rpm_now.used, rpd_now.used) == (1, 1)


async def test_all_or_nothing_leaves_a_gcra_cell_alone_when_another_limit_refuses(
    backend: CounterBackend,
) -> None:
    cell, strict = g(limit=2, key="cell"), hit(1, key="strict")
    await backend.apply([cell, strict], T0, all_or_nothing=True)
    for _ in range(5):
        (cell_outcome, strict_outcome) = await backend.apply(
            [cell, strict], T0, all_or_nothing=True
        )
        assert strict_outcome.over_limit and not cell_outcome.over_limit
    (read,) = await backend.apply([g(limit=2, hits=0, key="cell")], T0)
    assert read.remaining == 1  # only the admitted request holds a unit


async def test_all_or_nothing_holds_across_per_second_and_longer_windows(
    backend: CounterBackend,
) -> None:
    """With REDIS_PERSECOND the two windows live in two stores: each refusal charges neither."""
    rps, rpm = hit(2, key="rps", window_s=1), hit(3, key="rpm")
    cell = g(limit=1, key="cell")  # a GCRA cell of a minute, in the other store
    assert not any(
        o.over_limit for o in await backend.apply([rps, rpm, cell], T0, all_or_nothing=True)
    )
    over_minute = await backend.apply([rps, rpm, cell], T0, all_or_nothing=True)  # the cell refuses
    assert [o.over_limit for o in over_minute] == [False, False, True]
    (rps_now, rpm_now, cell_now) = await backend.apply(
        [hit(2, 0, key="rps", window_s=1), hit(3, 0, key="rpm"), g(limit=1, hits=0, key="cell")], T0
    )
    assert (rps_now.used, rpm_now.used, cell_now.remaining) == (1, 1, 0)
    await backend.apply([rps], T0)  # the second is spent
    over_second = await backend.apply([rps, rpm], T0, all_or_nothing=True)
    assert [o.over_limit for o in over_second] == [True, False]
    (rpm_after,) = await backend.apply([hit(3, 0, key="rpm")], T0)
    assert rpm_after.used == 1  # the minute gave its hit back


async def test_refund_gives_back_what_apply_charged(backend: CounterBackend) -> None:
    fixed, cell, second = (
        hit(5, hits=3, key="f"),
        g(limit=4, hits=3, key="c"),
        hit(9, 2, key="s", window_s=1),
    )
    await backend.apply([fixed, cell, second], T0)
    await backend.refund([fixed, cell, second], T0 + 0.5)
    outcomes = await backend.apply(
        [hit(5, hits=5, key="f"), g(limit=4, hits=4, key="c"), hit(9, 9, key="s", window_s=1)],
        T0 + 0.5,
    )
    assert [(o.over_limit, o.used) for o in outcomes] == [(False, 5), (False, 4), (False, 9)]
    await backend.refund([hit(5, hits=50, key="f")], T0 + 0.5)  # more than was charged: none left
    (empty,) = await backend.apply([hit(5, 0, key="f")], T0 + 0.5)
    assert empty.used == 0
    await backend.refund([hit(5, key="never")], T0)  # nothing to give back: nothing happens
    (never,) = await backend.apply([hit(5, 0, key="never")], T0)
    assert never.used == 0


async def test_all_or_nothing_counts_a_key_hit_twice_once_per_hit(backend: CounterBackend) -> None:
    twice = [hit(3, hits=2, key="same"), hit(3, hits=2, key="same")]
    outcomes = await backend.apply(twice, T0, all_or_nothing=True)
    assert [o.over_limit for o in outcomes] == [False, True]
    (read,) = await backend.apply([hit(3, 0, key="same")], T0)
    assert read.used == 0


async def test_without_all_or_nothing_over_limit_hits_are_still_charged(
    backend: CounterBackend,
) -> None:
    # envoyproxy/ratelimit's rule, kept for the rate-limit service
    await backend.apply([hit(1, key="a"), hit(5, key="b")], T0)
    await backend.apply([hit(1, key="a"), hit(5, key="b")], T0)
    (b,) = await backend.apply([hit(5, 0, key="b")], T0)
    assert b.used == 2


# Both backends agree ----------------------------------------------------------------------------


async def test_redis_and_memory_give_identical_outcomes() -> None:
    memory = MemoryBackend()
    now = time.time()  # fractional epoch seconds, as the service passes them
    batches = [
        [hit(7, hits=i % 3, key="f"), g(limit=7, hits=i % 4, key="g"), g(limit=1000, key="fine")]
        for i in range(40)
    ]
    async with shared_redis_backend() as redis_backend:
        for i, batch in enumerate(batches):
            at = now + i * 0.137
            assert await redis_backend.apply(batch, at) == await memory.apply(batch, at)


async def test_redis_and_memory_agree_in_all_or_nothing_mode() -> None:
    memory = MemoryBackend()
    async with shared_redis_backend() as redis_backend:
        await agree_in_all_or_nothing_mode(redis_backend, memory)


async def test_a_cluster_and_memory_agree_in_all_or_nothing_mode(redis_cluster: Cluster) -> None:
    """A script per slot (three keys: three slots, but for a 1 in 16,384² chance), refused
    slots giving back what the others took, ends where one script would."""
    on_cluster = RedisBackend(
        f"redis+cluster://{redis_cluster.urls}", prefix=f"arks:rl:test:{uuid.uuid4().hex}:"
    )
    try:
        await agree_in_all_or_nothing_mode(on_cluster, MemoryBackend())
    finally:
        await on_cluster.close()


@pytest.mark.parametrize("all_or_nothing", [True, False], ids=["all-or-nothing", "each"])
async def test_a_cluster_slot_that_fails_leaves_the_other_slots_uncharged(
    redis_cluster: Cluster, all_or_nothing: bool
) -> None:
    """One script per slot: when one fails (here a key of the wrong type), the slots that did
    charge give it back, as one script that failed would have charged nothing."""
    prefix = f"arks:rl:test:{uuid.uuid4().hex}:"
    on_cluster = RedisBackend(f"redis+cluster://{redis_cluster.urls}", prefix=prefix)
    admin = RedisCluster.from_url(f"redis://{redis_cluster.nodes[0].address}")
    window = int(T0)  # T0 starts a 60 s window
    ok = "a"
    broken = next(
        f"b{i}"
        for i in range(100)
        if key_slot(f"{prefix}b{i}_{window}".encode()) != key_slot(f"{prefix}a_{window}".encode())
    )
    try:
        await admin.hset(f"{prefix}{broken}_{window}", "not", "a counter")
        with pytest.raises(BackendUnavailable):
            await on_cluster.apply(
                [hit(5, key=ok), hit(5, key=broken)], T0, all_or_nothing=all_or_nothing
            )
        (read,) = await on_cluster.apply([hit(5, 0, key=ok)], T0)
        assert read.used == 0
    finally:
        await admin.aclose()
        await on_cluster.close()


async def test_a_cluster_waits_for_a_connection_as_one_server_does(redis_cluster: Cluster) -> None:
    """More concurrent applies than connections: each waits its turn (as one server's pool
    makes it wait), none is refused for want of a connection."""
    on_cluster = RedisBackend(
        f"redis+cluster://{redis_cluster.urls}",
        prefix=f"arks:rl:test:{uuid.uuid4().hex}:",
        timeout_s=SHARED_TIMEOUT_S,
        max_connections=2,
    )
    try:
        answers = await asyncio.gather(
            *(on_cluster.apply([hit(100, key="busy")], T0) for _ in range(40))
        )
        assert sorted(outcome.used for (outcome,) in answers) == list(range(1, 41))
    finally:
        await on_cluster.close()


async def agree_in_all_or_nothing_mode(backend: CounterBackend, memory: MemoryBackend) -> None:
    now = time.time()
    batches = [
        [hit(5, hits=i % 3, key="f"), g(limit=4, hits=i % 2, key="g"), hit(20, key="wide")]
        for i in range(40)
    ]
    for i, batch in enumerate(batches):
        at = now + i * 0.71
        assert await backend.apply(batch, at, all_or_nothing=True) == await memory.apply(
            batch, at, all_or_nothing=True
        )


# Keeping state bounded ---------------------------------------------------------------------------


async def test_redis_keys_are_named_by_prefix_and_expire() -> None:
    prefix = f"arks:rl:test:{uuid.uuid4().hex}:"
    async with shared_redis_backend(prefix) as redis_backend:
        await redis_backend.apply([hit(5, key="fw"), g(limit=10, hits=3, key="cell")], T0 + 1)
        admin = Redis.from_url(SHARED_REDIS)
        try:
            assert await admin.ttl(f"{prefix}fw_{int(T0)}") == 60  # envoyproxy: the window length
            pttl = await admin.pttl(f"{prefix}cell_gcra")
            assert 3000 < pttl <= 4000  # TAT 3 s ahead, plus a second
        finally:
            await admin.aclose()


async def test_memory_backend_drops_expired_entries() -> None:
    memory = MemoryBackend()
    await memory.apply([hit(5, key=f"old{i}", window_s=10) for i in range(3000)], T0)
    for i in range(3000):
        await memory.apply([g(key=f"new{i}")], T0 + 100)
    assert len(memory) <= 3000 + 1024  # the old windows went in a sweep


# Outages of a private redis-server --------------------------------------------------------------


OUTAGE_TIMEOUT_S = 0.3


async def test_redis_down_raises_in_time_and_recovers(private_redis: PrivateRedis) -> None:
    backend = RedisBackend(private_redis.url, timeout_s=OUTAGE_TIMEOUT_S)
    try:
        (first,) = await backend.apply([hit(10)], T0)
        assert first.used == 1

        private_redis.kill()
        for _ in range(2):  # every call fails fast while it is down
            started = time.monotonic()
            with pytest.raises(BackendUnavailable) as info:
                await backend.apply([hit(10)], T0)
            assert time.monotonic() - started < OUTAGE_TIMEOUT_S + 0.2
            assert info.value.__cause__ is not None

        private_redis.start()  # same port, empty data, no cached script
        (again,) = await backend.apply([hit(10)], T0)
        assert (again.used, again.over_limit) == (1, False)

        private_redis.kill()  # a restart between two calls leaves a dead pooled connection
        private_redis.start()
        (silent,) = await backend.apply([hit(10)], T0)
        assert (silent.used, silent.over_limit) == (1, False)
    finally:
        await backend.close()


async def test_stalled_redis_times_out_and_recovers(private_redis: PrivateRedis) -> None:
    backend = RedisBackend(private_redis.url, timeout_s=OUTAGE_TIMEOUT_S)
    try:
        await backend.apply([hit(10)], T0)
        private_redis.pause()
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await backend.apply([hit(10)], T0)
        assert time.monotonic() - started < OUTAGE_TIMEOUT_S + 0.2
        private_redis.resume()
        (after,) = await backend.apply([hit(10)], T0)
        # The timed-out script was already sent, so Redis may still have run it once it resumed.
        assert after.used in (2, 3)
        assert not after.over_limit
    finally:
        await backend.close()


async def test_a_per_second_store_that_fails_leaves_the_other_uncharged(
    private_redis: PrivateRedis,
) -> None:
    """REDIS_PERSECOND's Redis down: the call fails (the service applies its fail policy) and
    the other store gives back what it took, as one store that failed would have charged
    nothing; back up, both count again."""
    per_second = RedisBackend(private_redis.url, timeout_s=OUTAGE_TIMEOUT_S)
    async with shared_redis_backend() as other:
        split = PerSecondSplit(per_second, other)
        try:
            private_redis.kill()
            with pytest.raises(BackendUnavailable):
                await split.apply([hit(5, key="rps", window_s=1), hit(5, key="rpm")], T0)
            (rpm,) = await other.apply([hit(5, 0, key="rpm")], T0)
            assert rpm.used == 0
            private_redis.start()
            both = await split.apply([hit(5, key="rps", window_s=1), hit(5, key="rpm")], T0)
            assert [o.used for o in both] == [1, 1]
        finally:
            await split.close()
