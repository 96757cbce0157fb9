"""The budget stores against one shared suite: memory, the real Redis on 127.0.0.1:6379, and a
real 3-master Redis Cluster (a request's budgets spread over slots: a script per slot).

Lease expiry is judged by the `now` passed in, so it is stepped exactly. Budget expiry
(`expires_at`) is judged by Redis's own clock, so those tests use real time. Outage tests run
their own redis-server on a free port and never touch the shared one.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from arks.adapters.redis.budgets import RedisBudgets, slot_tags
from arks.limits.backends import BackendUnavailable
from arks.limits.budgets import (
    LEVELS_PER_READ,
    SETTLED_MEMORY_S,
    Admission,
    BudgetStore,
    Charge,
    Lease,
    Level,
    MemoryBudgets,
)
from arks.limits.budgets.room import MAX_AMOUNT
from launcher.procs import Supervisor, free_port, wait_port
from tests.support.redis_server import SHARED_REDIS, PrivateRedis, fresh_prefix
from tests.support.redis_topologies import Cluster, command

T0 = 1_700_000_000.0
TTL = 60.0


def lease(limit: int, amount: int, key: str = "q", expires_at: float | None = None) -> Lease:
    return Lease(key=key, limit=limit, amount=amount, expires_at=expires_at)


async def figures(store: BudgetStore, key: str, now: float) -> tuple[int, int]:
    """(used, leased) of a budget, read by an admission that cannot fit and so takes nothing."""
    probe = await store.admit("probe", [lease(0, 1, key)], TTL, now)
    assert not probe.admitted
    return probe.used, probe.leased


@asynccontextmanager
async def shared_redis_store(prefix: str = "") -> AsyncIterator[RedisBudgets]:
    """A RedisBudgets on the shared server under a fresh prefix; its keys are deleted after."""
    async with fresh_prefix("arks:budget:test") as fresh:
        store = RedisBudgets(SHARED_REDIS, prefix=prefix or fresh, timeout_s=SHARED_TIMEOUT_S)
        try:
            yield store
        finally:
            await store.close()


# The shared suite asserts what is counted, not the deadline (the outage tests below do): a
# generous one keeps 100 concurrent admissions on a cluster from timing out on a loaded 2-core
# machine (seen at the default 0.5 s with a benchmark running beside the tests).
SHARED_TIMEOUT_S = 5.0


def cluster_store(cluster: Cluster, **options: Any) -> RedisBudgets:
    options.setdefault("timeout_s", SHARED_TIMEOUT_S)
    return RedisBudgets(
        f"redis+cluster://{cluster.urls}",
        prefix=f"arks:budget:test:{uuid.uuid4().hex}:",
        **options,
    )


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[BudgetStore]:
    if request.param == "memory":
        memory = MemoryBudgets()
        yield memory
        await memory.close()
    elif request.param == "redis":
        async with shared_redis_store() as redis_store:
            yield redis_store
    else:
        on_cluster = cluster_store(request.getfixturevalue("redis_cluster"))
        yield on_cluster
        await on_cluster.close()


# Admission --------------------------------------------------------------------------------------


async def test_admits_within_and_exactly_at_the_limit_then_refuses(store: BudgetStore) -> None:
    first = await store.admit("r1", [lease(10, 4)], TTL, T0)
    at_limit = await store.admit("r2", [lease(10, 6)], TTL, T0)
    over = await store.admit("r3", [lease(10, 1)], TTL, T0)
    assert (first.admitted, first.used, first.leased) == (True, 0, 0)
    assert (at_limit.admitted, at_limit.leased) == (True, 4)
    assert over == Admission(admitted=False, key="q", used=0, leased=10, limit=10)


async def test_no_leases_admit_trivially(store: BudgetStore) -> None:
    assert (await store.admit("r1", [], TTL, T0)).admitted


async def test_budgets_are_taken_all_or_nothing(store: BudgetStore) -> None:
    both = await store.admit("r1", [lease(10, 3, "a"), lease(5, 4, "b")], TTL, T0)
    assert (both.admitted, both.key, both.limit) == (True, "b", 5)  # the last budget's figures

    refused = await store.admit("r2", [lease(10, 3, "a"), lease(5, 2, "b")], TTL, T0)
    assert refused == Admission(admitted=False, key="b", used=0, leased=4, limit=5)
    assert await figures(store, "a", T0) == (0, 3)  # a's room was checked, never taken

    first_refuses = await store.admit("r3", [lease(10, 8, "a"), lease(5, 2, "b")], TTL, T0)
    assert (first_refuses.admitted, first_refuses.key, first_refuses.leased) == (False, "a", 3)


async def test_two_leases_on_one_budget_count_together(store: BudgetStore) -> None:
    refused = await store.admit("r1", [lease(10, 6), lease(10, 6)], TTL, T0)
    assert (refused.admitted, refused.leased) == (False, 0)
    taken = await store.admit("r1", [lease(10, 3), lease(8, 5)], TTL, T0)  # 8 is the tighter
    assert (taken.admitted, taken.limit) == (True, 8)
    assert await figures(store, "q", T0) == (0, 8)


# Settling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("real", [2, 9], ids=["cheaper", "dearer"])
async def test_settle_moves_the_lease_to_used_at_the_real_cost(
    store: BudgetStore, real: int
) -> None:
    await store.admit("r1", [lease(10, 6)], TTL, T0)
    await store.admit("r2", [lease(10, 3)], TTL, T0)
    await store.settle("r1", [Charge("q", real)], T0 + 1)
    assert await figures(store, "q", T0 + 1) == (real, 3)
    assert await store.used(["q"]) == {"q": real}


async def test_expired_leases_free_their_room(store: BudgetStore) -> None:
    assert (await store.admit("r1", [lease(10, 10)], TTL, T0)).admitted
    assert not (await store.admit("r2", [lease(10, 1)], TTL, T0 + TTL - 0.001)).admitted
    after = await store.admit("r2", [lease(10, 10)], TTL, T0 + TTL)  # a lease lives [now, now+ttl)
    assert (after.admitted, after.leased) == (True, 0)


async def test_levels_show_used_and_live_leases_of_many_budgets_in_batches(
    store: BudgetStore,
) -> None:
    keys = [f"b{i}" for i in range(LEVELS_PER_READ + 5)]  # more than one round trip
    await store.admit("short", [lease(100, 4, "b0")], 10.0, T0)
    await store.admit("long", [lease(100, 6, "b0"), lease(100, 2, keys[-1])], 100.0, T0)
    await store.settle("done", [Charge("b0", 30), Charge(keys[-1], 1)], T0)
    levels = await store.levels(keys, T0 + 1)
    assert set(levels) == set(keys)
    assert levels["b0"] == Level(30, 10)
    assert levels[keys[-1]] == Level(1, 2)
    assert levels["b1"] == Level(0, 0)  # never touched
    assert (await store.levels(["b0"], T0 + 20))["b0"] == Level(30, 6)  # the short lease expired
    # Reading changed nothing an admission sees.
    assert await figures(store, "b0", T0 + 20) == (30, 6)


async def test_settling_an_expired_or_missing_lease_still_charges(store: BudgetStore) -> None:
    await store.admit("short", [lease(10, 5)], 10.0, T0)
    await store.admit("long", [lease(10, 5)], 100.0, T0)
    await store.settle("short", [Charge("q", 3)], T0 + 20)
    assert await figures(store, "q", T0 + 20) == (3, 5)  # the long lease is untouched
    await store.settle("never-admitted", [Charge("q", 4)], T0 + 20)
    assert await figures(store, "q", T0 + 20) == (7, 5)


async def test_a_settlement_retried_counts_once(store: BudgetStore) -> None:
    """A settlement whose reply was lost is retried: it must not charge twice."""
    assert (await store.admit("r1", [lease(100, 10)], TTL, T0)).admitted
    await store.settle("r1", [Charge("q", 7)], T0 + 1)
    # the retry; a store this client restored (on a cluster: the budget's slot) says the
    # total, as after the first
    await store.restore({"q": 0})
    assert await store.settle("r1", [Charge("q", 7)], T0 + 2) == {"q": 7}
    assert await store.used(["q"]) == {"q": 7}
    assert await figures(store, "q", T0 + 3) == (7, 0)
    # long after, the request id is forgotten (ids are unique; memory stays bounded)
    await store.settle("r1", [Charge("q", 7)], T0 + 3 + SETTLED_MEMORY_S)
    assert await store.used(["q"]) == {"q": 14}


async def test_readmitting_a_request_replaces_its_lease(store: BudgetStore) -> None:
    await store.admit("r1", [lease(10, 4)], TTL, T0)
    again = await store.admit("r1", [lease(10, 7)], TTL, T0)
    assert (again.admitted, again.leased) == (True, 0)  # its own lease is not in the way
    assert await figures(store, "q", T0) == (0, 7)
    too_big = await store.admit("r1", [lease(10, 11)], TTL, T0)
    assert (too_big.admitted, too_big.leased) == (False, 0)
    assert await figures(store, "q", T0) == (0, 7)  # a refusal keeps the lease it had
    await store.settle("r1", [Charge("q", 1)], T0)
    assert await figures(store, "q", T0) == (1, 0)


async def test_a_refused_readmission_keeps_every_lease_it_had(store: BudgetStore) -> None:
    """On a cluster `a` and `b` are in different slots: `a`'s slot takes the new lease before
    `b`'s refuses, then puts back the one the request had, amount and expiry."""
    await store.admit("r1", [lease(10, 4, "a"), lease(10, 4, "b")], TTL, T0)
    refused = await store.admit("r1", [lease(10, 5, "a"), lease(10, 11, "b")], TTL, T0 + 30)
    assert (refused.admitted, refused.key) == (False, "b")
    assert await figures(store, "a", T0 + 30) == (0, 4)
    assert await figures(store, "b", T0 + 30) == (0, 4)
    assert await figures(store, "a", T0 + TTL) == (0, 0)  # not renewed by the refusal


async def test_readmitting_renews_the_lease_expiry(store: BudgetStore) -> None:
    await store.admit("r1", [lease(10, 4)], TTL, T0)
    await store.admit("r1", [lease(10, 4)], TTL, T0 + 30)
    assert await figures(store, "q", T0 + TTL + 1) == (0, 4)
    assert await figures(store, "q", T0 + 30 + TTL) == (0, 0)


async def test_a_concurrency_budget_holds_n_and_releases(store: BudgetStore) -> None:
    slot = lease(3, 1, "concurrency/u")
    taken = [(await store.admit(f"r{i}", [slot], TTL, T0)).admitted for i in range(4)]
    assert taken == [True, True, True, False]
    await store.settle("r1", [Charge(slot.key, 0)], T0 + 1)
    assert (await store.admit("r3", [slot], TTL, T0 + 1)).admitted
    for i in (0, 2, 3):
        await store.settle(f"r{i}", [Charge(slot.key, 0)], T0 + 2)
    assert await figures(store, slot.key, T0 + 2) == (0, 0)
    assert await store.used([slot.key]) == {slot.key: 0}


async def test_amounts_are_exact_up_to_two_to_the_53(store: BudgetStore) -> None:
    await store.settle("earlier", [Charge("q", MAX_AMOUNT - 1)], T0)
    refused = await store.admit("r1", [lease(MAX_AMOUNT, 2)], TTL, T0)
    assert (refused.admitted, refused.used) == (False, MAX_AMOUNT - 1)
    assert (await store.admit("r1", [lease(MAX_AMOUNT, 1)], TTL, T0)).admitted
    await store.settle("r1", [Charge("q", MAX_AMOUNT)], T0)
    assert await store.used(["q"]) == {"q": 2 * MAX_AMOUNT - 1}  # past 2**53, still exact
    with pytest.raises(ValueError, match="lease amount"):
        await store.admit("r2", [lease(MAX_AMOUNT, MAX_AMOUNT + 1)], TTL, T0)


# Totals and their durability --------------------------------------------------------------------


async def test_a_renewed_lease_outlives_its_first_expiry_and_an_abandoned_one_does_not(
    store: BudgetStore,
) -> None:
    assert (await store.admit("alive", [lease(2, 1)], 10.0, T0)).admitted
    assert (await store.admit("dead", [lease(2, 1)], 10.0, T0)).admitted
    # At T0 + 8 only "alive" is renewed (its process is still running), for 10 s more.
    assert await store.renew({"q": ["alive", "never-admitted"]}, 10.0, T0 + 8) == 1
    # At T0 + 12 the abandoned lease is gone, the renewed one still holds its unit.
    after = await store.admit("next", [lease(2, 1)], 10.0, T0 + 12)
    assert after.admitted and after.leased == 1
    assert not (await store.admit("over", [lease(2, 1)], 10.0, T0 + 12)).admitted


async def test_renewing_never_brings_back_an_expired_or_settled_lease(store: BudgetStore) -> None:
    await store.admit("expired", [lease(5, 2)], 10.0, T0)
    await store.admit("settled", [lease(5, 2)], 10.0, T0)
    await store.settle("settled", [Charge("q", 1)], T0 + 1)
    assert await store.renew({"q": ["expired", "settled"], "other": ["x"]}, 10.0, T0 + 11) == 0
    taken = await store.admit("r", [lease(5, 4)], 10.0, T0 + 11)
    assert taken.admitted and (taken.used, taken.leased) == (1, 0)


async def test_used_reports_totals_and_zero_for_unknown_budgets(store: BudgetStore) -> None:
    await store.settle("r1", [Charge("a", 5), Charge("b", 0)], T0)
    await store.admit("r2", [lease(10, 5, "c")], TTL, T0)
    assert await store.used(["a", "b", "c", "nothing"]) == {"a": 5, "b": 0, "c": 0, "nothing": 0}
    assert await store.used([]) == {}


async def test_restore_sets_only_missing_totals(store: BudgetStore) -> None:
    await store.settle("r1", [Charge("a", 5)], T0)
    await store.admit("r2", [lease(10, 2, "b")], TTL, T0)  # leases only: its total is missing
    assert await store.restore({"a": 100, "b": 7, "c": 0}) == 1
    assert await store.restore({"a": 100, "b": 70}) == 0
    assert await store.used(["a", "b", "c"]) == {"a": 5, "b": 7, "c": 0}
    refused = await store.admit("r3", [lease(10, 2, "b")], TTL, T0)
    assert (refused.admitted, refused.used, refused.leased) == (False, 7, 2)
    assert await store.restore({}) == 0


async def test_raise_to_only_ever_raises_and_keeps_leases(store: BudgetStore) -> None:
    """The ledger's figure is a floor: a total below it is raised, one above it (charges the
    ledger has not seen yet) is kept, a missing one is set; leases stay as they were."""
    await store.settle("r1", [Charge("a", 5)], T0)
    await store.settle("r2", [Charge("b", 50)], T0)
    assert (await store.admit("r3", [lease(100, 10, "a")], TTL, T0)).admitted
    assert await store.raise_to({"a": 40, "b": 20, "c": 3, "d": 0}) == 2
    assert await store.used(["a", "b", "c", "d"]) == {"a": 40, "b": 50, "c": 3, "d": 0}
    refused = await store.admit("r4", [lease(100, 55, "a")], TTL, T0)
    assert (refused.admitted, refused.used, refused.leased) == (False, 40, 10)
    assert await store.raise_to({"a": 40}) == 0
    with pytest.raises(ValueError):
        await store.raise_to({"a": -1})


async def test_a_budget_is_forgotten_when_it_expires(store: BudgetStore) -> None:
    now = time.time()  # budget expiry is absolute: Redis judges it by its own clock
    ends = now + 0.3
    assert (await store.admit("r1", [lease(10, 4, expires_at=ends)], TTL, now)).admitted
    await store.settle("r1", [Charge("q", 6, expires_at=ends)], now)
    assert (await store.admit("r2", [lease(10, 4, expires_at=ends)], TTL, now)).admitted
    assert await store.used(["q"]) == {"q": 6}
    await asyncio.sleep(ends - time.time() + 0.05)
    later = time.time()
    fresh = await store.admit("r3", [lease(10, 10, expires_at=later + 60)], TTL, later)
    assert (fresh.admitted, fresh.used, fresh.leased) == (True, 0, 0)
    assert await store.used(["q"]) == {"q": 0}


# Overshoot --------------------------------------------------------------------------------------
#
# Each admission takes E of room only if used + leased + E <= L, and a settlement swaps the
# request's E for its real cost R. Take the last admission: at that moment used + leased + E <= L,
# with c leases in flight counting it (leased = (c - 1) E), and afterwards only those c requests
# add to `used`. So
#     final used <= L + c (R_max - E),   and c E <= L, so c <= L // E.
# With R <= E there is no overshoot at all. With R up to 2 E it is at most L // E estimates
# (final used <= 2 L), not one: "at most one admission" only holds when requests do not overlap
# (c = 1). And a lease that expires before its request settles frees room that others take, so
# each such late settlement can add its whole cost on top (see
# test_settling_an_expired_or_missing_lease_still_charges).

LIMIT, ESTIMATE, REQUESTS = 250, 7, 100  # L // E = 35 of 100 can be admitted at a time


async def admit_and_settle(store: BudgetStore, costs: list[int]) -> tuple[list[int], int]:
    """REQUESTS concurrent requests, request i settling at costs[i]: (admitted ids, final used)."""

    async def one(i: int) -> int | None:
        taken = await store.admit(f"r{i}", [lease(LIMIT, ESTIMATE)], TTL, T0)
        if not taken.admitted:
            return None
        await asyncio.sleep(0)  # the upstream answers: other requests get their turn
        await store.settle(f"r{i}", [Charge("q", costs[i])], T0 + 1)
        return i

    outcomes = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    admitted = [i for i in outcomes if i is not None]
    return admitted, (await store.used(["q"]))["q"]


async def test_real_costs_within_estimates_never_overshoot(store: BudgetStore) -> None:
    rng = random.Random(1)
    costs = [rng.randint(0, ESTIMATE) for _ in range(REQUESTS)]
    admitted, used = await admit_and_settle(store, costs)
    assert used == sum(costs[i] for i in admitted)
    assert used <= LIMIT


async def test_exact_costs_admit_exactly_limit_over_estimate(store: BudgetStore) -> None:
    admitted, used = await admit_and_settle(store, [ESTIMATE] * REQUESTS)
    assert len(admitted) == LIMIT // ESTIMATE
    assert used == LIMIT // ESTIMATE * ESTIMATE


async def test_costs_over_estimates_overshoot_by_at_most_the_leases_in_flight(
    store: BudgetStore,
) -> None:
    rng = random.Random(2)
    costs = [rng.randint(ESTIMATE // 2, 2 * ESTIMATE) for _ in range(REQUESTS)]
    admitted, used = await admit_and_settle(store, costs)
    assert used == sum(costs[i] for i in admitted)
    assert used <= LIMIT + (LIMIT // ESTIMATE) * ESTIMATE  # c <= L // E, R_max - E = E


async def test_overlapping_requests_can_overshoot_by_more_than_one_estimate(
    store: BudgetStore,
) -> None:
    """The worst case of the bound above: every admission before any settlement."""
    taken = await asyncio.gather(
        *(store.admit(f"r{i}", [lease(LIMIT, ESTIMATE)], TTL, T0) for i in range(REQUESTS))
    )
    admitted = [i for i, t in enumerate(taken) if t.admitted]
    assert len(admitted) == LIMIT // ESTIMATE
    await asyncio.gather(
        *(store.settle(f"r{i}", [Charge("q", 2 * ESTIMATE)], T0 + 1) for i in admitted)
    )
    used = (await store.used(["q"]))["q"]
    assert used == 2 * ESTIMATE * (LIMIT // ESTIMATE)
    assert LIMIT + ESTIMATE < used <= LIMIT + (LIMIT // ESTIMATE) * ESTIMATE


async def test_sequential_requests_overshoot_by_at_most_one_estimate(store: BudgetStore) -> None:
    used = 0
    for i in range(REQUESTS):
        if (await store.admit(f"r{i}", [lease(LIMIT, ESTIMATE)], TTL, T0)).admitted:
            await store.settle(f"r{i}", [Charge("q", 2 * ESTIMATE)], T0)
        used = (await store.used(["q"]))["q"]
        assert used <= LIMIT + ESTIMATE
    assert used > LIMIT


# Both stores agree -------------------------------------------------------------------------------


async def identical_answers(store: RedisBudgets, keys: list[str]) -> None:
    """400 random admissions and settlements: `store` answers as the memory store does."""
    rng = random.Random(7)
    memory = MemoryBudgets()
    now = T0
    for step in range(400):
        now += rng.choice([0.0, 0.137, 1.5, 7.0])
        request_id = f"r{rng.randrange(30)}"
        chosen = rng.sample(keys, rng.randint(0, len(keys)))
        answers: list[object]
        if rng.random() < 0.6:
            leases = [lease(rng.randint(0, 40), rng.randint(0, 12), k) for k in chosen]
            ttl_s = rng.choice([2.0, 10.0, 30.0])
            answers = [await s.admit(request_id, leases, ttl_s, now) for s in (memory, store)]
        else:
            charges = [Charge(k, rng.randint(0, 12)) for k in chosen]
            for s in (memory, store):
                await s.settle(request_id, charges, now)
            answers = [await s.used(keys) for s in (memory, store)]
        assert answers[0] == answers[1], step


async def test_a_cluster_and_memory_give_identical_answers(redis_cluster: Cluster) -> None:
    """Refused in one slot, a request's leases in the others are given back: no trace."""
    store = cluster_store(redis_cluster)
    try:
        keys = ["a", "b", "c", "d"]
        assert len({key_slot(f"{{{k}}}".encode()) for k in keys}) == len(keys)
        await identical_answers(store, keys)
    finally:
        await store.close()


async def test_redis_and_memory_give_identical_answers() -> None:
    keys = ["a", "b", "c"]
    prefix = f"arks:budget:test:{uuid.uuid4().hex}:"
    async with shared_redis_store(prefix) as redis_store:
        await identical_answers(redis_store, keys)

        admin = Redis.from_url(SHARED_REDIS)
        try:  # the three lease keys of a budget still tell one story
            for key in keys:
                amounts = await admin.hgetall(f"{prefix}{key}:leases")
                members = await admin.zrange(f"{prefix}{key}:expiry", 0, -1)
                leased = int(await admin.get(f"{prefix}{key}:leased") or 0)
                assert sorted(amounts) == sorted(members)
                assert leased == sum(int(v) for v in amounts.values())
        finally:
            await admin.aclose()


# Keeping state bounded --------------------------------------------------------------------------


async def test_redis_keys_expire_with_the_budget_or_the_latest_lease() -> None:
    prefix = f"arks:budget:test:{uuid.uuid4().hex}:"
    admin = Redis.from_url(SHARED_REDIS)
    async with shared_redis_store(prefix) as redis_store:
        try:
            await redis_store.admit("r1", [lease(10, 4, "open")], 600.0, T0)
            for suffix in (":leased", ":leases", ":expiry"):
                assert 599_000 < await admin.pttl(f"{prefix}open{suffix}") <= 600_000
            await redis_store.settle("r1", [Charge("open", 3)], T0)
            assert await admin.pttl(f"{prefix}open:used") == -1  # no expiry given: it persists
            lease_keys = [f"{prefix}open{s}" for s in (":leased", ":leases", ":expiry")]
            assert await admin.exists(*lease_keys) == 0  # the last lease went: nothing is left

            now = time.time()
            await redis_store.admit("r2", [lease(10, 4, "period", expires_at=now + 5)], 600.0, now)
            await redis_store.settle("r3", [Charge("period", 1, expires_at=now + 5)], now)
            for suffix in (":used", ":leased", ":leases", ":expiry"):
                assert 4000 < await admin.pttl(f"{prefix}period{suffix}") <= 5001  # ms rounding
        finally:
            await admin.aclose()


async def test_memory_store_forgets_idle_and_expired_budgets() -> None:
    memory = MemoryBudgets()
    for i in range(3000):
        await memory.admit(f"r{i}", [lease(1, 1, f"concurrency/{i}")], TTL, T0)
        await memory.settle(f"r{i}", [Charge(f"concurrency/{i}", 0)], T0)
    assert len(memory) == 0  # a settled concurrency slot leaves nothing behind
    for i in range(2000):
        await memory.admit(f"r{i}", [lease(10, 1, f"day/{i}", expires_at=T0 + 10)], TTL, T0)
        await memory.admit(f"r{i}", [lease(10, 1, f"open/{i}")], TTL, T0)
    for i in range(5000):  # more writes than budgets held: a sweep comes
        await memory.admit(f"s{i}", [lease(10**6, 1, f"next/{i % 500}")], TTL, T0 + 100)
    assert len(memory) == 500  # the expired days and the lapsed leases went in the sweep


# Outages of a private redis-server --------------------------------------------------------------


OUTAGE_TIMEOUT_S = 0.3


async def test_redis_down_raises_in_time_and_restore_brings_totals_back(
    private_redis: PrivateRedis,
) -> None:
    store = RedisBudgets(private_redis.url, timeout_s=OUTAGE_TIMEOUT_S)
    try:
        assert (await store.admit("r1", [lease(10, 6)], TTL, T0)).admitted
        await store.settle("r1", [Charge("q", 6)], T0 + 1)
        snapshot = await store.used(["q"])
        assert snapshot == {"q": 6}

        private_redis.kill()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.admit("r2", [lease(10, 1)], TTL, T0 + 2),
            lambda: store.settle("r2", [Charge("q", 1)], T0 + 2),
            lambda: store.used(["q"]),
            lambda: store.restore(snapshot),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable) as info:
                await call()
            assert time.monotonic() - started < OUTAGE_TIMEOUT_S + 0.2
            assert info.value.__cause__ is not None

        private_redis.start()  # same port, empty data, no cached scripts
        assert await store.used(["q"]) == {"q": 0}
        assert await store.restore(snapshot) == 1
        assert await store.restore(snapshot) == 0
        refused = await store.admit("r3", [lease(10, 5)], TTL, T0 + 3)
        assert (refused.admitted, refused.used) == (False, 6)
        assert (await store.admit("r4", [lease(10, 4)], TTL, T0 + 3)).admitted
    finally:
        await store.close()


async def test_stalled_redis_times_out_and_recovers(private_redis: PrivateRedis) -> None:
    store = RedisBudgets(private_redis.url, timeout_s=OUTAGE_TIMEOUT_S)
    try:
        assert (await store.admit("r1", [lease(10, 4)], TTL, T0)).admitted
        private_redis.pause()
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await store.admit("r2", [lease(10, 4)], TTL, T0)
        assert time.monotonic() - started < OUTAGE_TIMEOUT_S + 0.2
        private_redis.resume()
        # The timed-out script was already sent, so Redis may have run it once it resumed.
        after = await store.admit("r3", [lease(10, 2)], TTL, T0)
        assert (after.admitted, after.leased in (4, 8)) == (True, True)
    finally:
        await store.close()


async def test_charges_made_after_a_wipe_are_added_to_the_restored_total(tmp_path: Path) -> None:
    """Redis restarts empty, a settlement lands before the restore turn: nothing is lost."""
    port = free_port()
    with Supervisor(log_dir=tmp_path) as sup:

        def start() -> None:
            child = sup.start(
                "redis", ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
            )
            wait_port(child, port)

        start()
        store = RedisBudgets(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
        try:
            await store.settle("r1", [Charge("q", 70)], 1000.0)
            await store.restore(
                {"q": 70}
            )  # first contact: the total is there; marks the generation
            assert await store.restore({"q": 70}) == 0  # the store kept its data
            sup.children.pop().stop()
            start()  # empty
            # lands before the restore turn, and says so: a snapshot must not count it, the
            # restore adds the snapshot to it
            assert await store.settle("r2", [Charge("q", 5)], 1001.0) is None
            assert await store.restore({"q": 70}) == 1
            assert await store.used(["q"]) == {"q": 75}
            assert await store.restore({"q": 75}) == 0
            assert await store.settle("r3", [Charge("q", 1)], 1002.0) == {"q": 76}
        finally:
            await store.close()


async def test_a_cluster_master_that_lost_its_data_gets_its_slots_back_alone(
    redis_cluster: Cluster,
) -> None:
    """Each slot has its generation marker: a master wiped (FLUSHALL, which its replica
    follows) is recognised as wiped for its own budgets only."""
    store = cluster_store(redis_cluster)
    try:
        served = {m.port: served_slots(m.port) for m in redis_cluster.masters()}
        # Two budgets held by different masters.
        where: dict[int, str] = {}
        for name in (f"b{i}" for i in range(50)):
            slot = key_slot(f"{{{name}}}".encode())
            where.setdefault(next(port for port, slots in served.items() if slot in slots), name)
            if len(where) == 2:
                break
        (wiped, a), (_, b) = list(where.items())
        await store.settle("r1", [Charge(a, 70), Charge(b, 30)], 1000.0)
        assert await store.restore({a: 70, b: 30}) == 0  # first contact: marks both slots
        assert await store.settle("r2", [Charge(a, 1), Charge(b, 1)], 1001.0) == {a: 71, b: 31}
        assert command(wiped, "FLUSHALL") == "OK"
        # Lands before the restore: a's total is not vouched for, b's is.
        assert await store.settle("r3", [Charge(a, 5), Charge(b, 2)], 1002.0) == {b: 33}
        assert await store.restore({a: 71, b: 33}) == 1  # only a's slot came back
        assert await store.used([a, b]) == {a: 76, b: 33}
        assert await store.settle("r4", [Charge(a, 1)], 1003.0) == {a: 77}
    finally:
        await store.close()


async def test_a_cluster_slot_that_fails_gives_back_the_leases_of_the_others(
    redis_cluster: Cluster,
) -> None:
    """Admission runs one script per slot: one failing (here a key of the wrong type in `b`'s
    slot), the leases the other slots took are given back, as a failed script takes none."""
    prefix = f"arks:budget:test:{uuid.uuid4().hex}:"
    store = RedisBudgets(f"redis+cluster://{redis_cluster.urls}", prefix=prefix)
    admin = RedisCluster.from_url(f"redis://{redis_cluster.nodes[0].address}")
    try:
        assert key_slot(b"{a}") != key_slot(b"{b}")
        await admin.hset(f"{prefix}{{b}}:leased", "not", "a number")
        with pytest.raises(BackendUnavailable):
            await store.admit("r1", [lease(10, 4, "a"), lease(10, 4, "b")], TTL, T0)
        assert await figures(store, "a", T0) == (0, 0)
    finally:
        await admin.aclose()
        await store.close()


async def test_a_restore_that_fails_midway_keeps_the_generations_it_did_not_reach(
    redis_cluster: Cluster,
) -> None:
    """A restore that fails at one slot (here a marker of the wrong type) forgets no other
    slot's generation: a wipe there is still recognised, its snapshot added, not lost."""
    prefix = f"arks:budget:test:{uuid.uuid4().hex}:"
    store = RedisBudgets(f"redis+cluster://{redis_cluster.urls}", prefix=prefix)
    admin = RedisCluster.from_url(f"redis://{redis_cluster.nodes[0].address}")
    try:
        served = {m.port: served_slots(m.port) for m in redis_cluster.masters()}

        def master_of(name: str) -> int:
            slot = key_slot(f"{{{name}}}".encode())
            return next(port for port, slots in served.items() if slot in slots)

        a = "a"
        b = next(n for n in (f"b{i}" for i in range(50)) if master_of(n) != master_of(a))
        await store.settle("r1", [Charge(a, 70), Charge(b, 30)], 1000.0)
        assert await store.restore({a: 70, b: 30}) == 0  # first contact: marks both slots
        a_slot = key_slot(f"{{{a}}}".encode())
        broken = f"{prefix}{{{slot_tags()[a_slot]}}}:generation"  # a's slot's marker
        await admin.delete(broken)
        await admin.hset(broken, "not", "a generation")
        with pytest.raises(BackendUnavailable):
            await store.restore({a: 70, b: 30})  # fails at a's slot, before b's
        assert command(master_of(b), "FLUSHALL") == "OK"
        assert await store.settle("r2", [Charge(b, 2)], 1001.0) is None  # not vouched for
        assert await store.restore({b: 30}) == 1
        assert await store.used([b]) == {b: 32}
    finally:
        await admin.aclose()
        await store.close()


def served_slots(port: int) -> set[int]:
    """The slots the master on `port` serves, from its own CLUSTER NODES line."""
    for line in command(port, "CLUSTER", "NODES").splitlines():
        fields = line.split()
        if "myself" in fields[2]:
            out: set[int] = set()
            for part in fields[8:]:
                first, _, last = part.partition("-")
                if first.isdigit():
                    out.update(range(int(first), int(last or first) + 1))
            return out
    raise AssertionError(f"no own line in CLUSTER NODES of {port}")


async def test_a_batch_of_settlements_is_each_settlement_once(store: BudgetStore) -> None:
    """An access-log batch settles in one call (one round trip on Redis): the same totals as
    one call each, a request without charges answered `{}`, and the batch retried whole (its
    reply lost) changes nothing."""
    ids = [f"r{i}" for i in range(6)]
    for request_id in ids:
        assert (await store.admit(request_id, [lease(100, 10), lease(6, 1, "c")], TTL, T0)).admitted
    batch: list[tuple[str, list[Charge]]] = [
        (request_id, [Charge("q", 3 + i), Charge("c", 0)]) for i, request_id in enumerate(ids)
    ]
    batch.insert(2, ("no-charges", []))

    first = await store.settle_many(batch, T0 + 1)
    again = await store.settle_many(batch, T0 + 2)

    assert first[2] == {} and again[2] == {}
    assert await store.used(["q", "c"]) == {"q": sum(3 + i for i in range(6)), "c": 0}
    assert await figures(store, "q", T0 + 3) == (33, 0)  # every lease released
    assert await figures(store, "c", T0 + 3) == (0, 0)


async def test_a_batch_of_settlements_reloads_a_script_redis_lost() -> None:
    async with shared_redis_store() as store:
        assert (await store.admit("r1", [lease(100, 10)], TTL, T0)).admitted
        admin = Redis.from_url(SHARED_REDIS)
        try:
            await admin.script_flush()  # as a restarted Redis would have it
        finally:
            await admin.aclose()
        await store.settle_many([("r1", [Charge("q", 7)])], T0 + 1)
        assert await store.used(["q"]) == {"q": 7}
