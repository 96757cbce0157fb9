"""Quota budgets rebuilt from the usage ledger (extproc/rebuild.py): after a store lost its data,
each current budget is raised to exactly what the ledger's records (and the records not written
yet) charged it, by admission period; never lowered. Real SQLite ledger; memory and Redis budgets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from arks.adapters.ledger import open_ledger
from arks.adapters.redis.budgets import RedisBudgets
from arks.ledger import LedgerStore, UsageRecord
from arks.limits.budgets import BudgetStore, Charge, MemoryBudgets
from arks.policy import Policy, build_policy
from extproc import quota as quotas
from extproc import rebuild
from extproc.durability import QuotaSnapshots
from tests.integration.test_budgets import shared_redis_store
from tests.support.gateway import StaticPolicy
from tests.support.redis_server import PrivateRedis

NOW = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)


def policy() -> Policy:
    doc = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksQuota",
        "metadata": {"name": "team", "namespace": "default"},
        "spec": {
            "quotas": [
                {"type": "total", "value": 10_000, "period": "day"},
                {"type": "prompt", "value": 10_000, "period": "month"},
                {"type": "cost", "value": 5, "period": "month"},
            ],
            "prices": [{"model": "*", "input": 2.0, "output": 3.5}],
        },
    }
    return build_policy([("test", doc)])


def charged(request_id: str, admitted: datetime, prompt: int, completion: int) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        time=admitted + timedelta(seconds=2),
        namespace="default",
        user="alice",
        model="m",
        engine="127.0.0.1:1",
        path="/v1/chat/completions",
        status=200,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost=(prompt * 2.0 + completion * 3.5) / 1e6,
        source="reported",
        estimate_reason=None,
        duration_s=2.0,
        ttft_s=None,
        quota="default/team",
        admitted_at=admitted,
        cost_micros=quotas.cost_of(COST_ITEM, prompt, completion, PRICE),
    )


COST_ITEM = policy().quotas[next(iter(policy().quotas))].quotas[2]
PRICE = policy().quotas[next(iter(policy().quotas))].prices[0]


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[LedgerStore]:
    store = open_ledger(f"sqlite:///{tmp_path}/usage.db")
    await store.migrate()
    yield store
    await store.close()


@pytest.fixture(params=["memory", "redis"])
async def budgets(request: pytest.FixtureRequest) -> AsyncIterator[BudgetStore]:
    if request.param == "memory":
        yield MemoryBudgets()
    else:
        async with shared_redis_store() as store:
            yield store


async def test_a_wiped_store_gets_back_exactly_what_the_records_charged(
    ledger: LedgerStore, budgets: BudgetStore
) -> None:
    p = policy()
    today = NOW.replace(hour=0)
    written = [
        charged("r1", today + timedelta(hours=1), 100, 7),
        charged("r2", today + timedelta(hours=2), 33, 1),
        charged("yesterday", today - timedelta(seconds=1), 1000, 1000),  # this month, not today
        dataclasses.replace(charged("other", today, 5, 5), quota="default/other"),
    ]
    await ledger.write(written)
    unwritten = [charged("queued", today + timedelta(hours=3), 10, 20)]
    raised = await rebuild.rebuild(p, NOW, ledger, budgets, lambda: unwritten)
    keys = {t.kind: t.key for t in rebuild.targets(p, NOW)}
    assert raised == 3
    used = await budgets.used(list(keys.values()))
    assert used[keys["total"]] == 107 + 34 + 30
    assert used[keys["prompt"]] == 100 + 33 + 1000 + 10
    mine = [r for r in [*written, *unwritten] if r.quota == "default/team"]
    assert used[keys["cost"]] == sum(r.cost_micros or 0 for r in mine)
    # Charges the ledger has not seen yet stay counted: raised, never lowered.
    await budgets.settle("late", [Charge(keys["total"], 50)], NOW.timestamp())
    assert await rebuild.rebuild(p, NOW, ledger, budgets, lambda: unwritten) == 0
    assert (await budgets.used([keys["total"]]))[keys["total"]] == 107 + 34 + 30 + 50


def test_each_quota_item_is_rebuilt_from_its_own_period() -> None:
    found = {t.kind: t for t in rebuild.targets(policy(), NOW)}
    assert found["total"].start == NOW.replace(hour=0)
    assert found["total"].end == NOW.replace(hour=0) + timedelta(days=1)
    assert found["cost"].start == NOW.replace(day=1, hour=0)
    assert {t.quota for t in found.values()} == {"default/team"}


# Redis expires a budget at its period's end (plus grace) by its own clock: live time here.
LIVE = datetime.now(UTC)


class Replica:
    """One gateway replica's quota bookkeeping: its own Redis client, snapshot and ledger
    writer's queue (records handed over, written to the shared ledger on `flush`)."""

    def __init__(self, name: str, url: str, ledger: LedgerStore | None) -> None:
        self.name = name
        self.budgets = RedisBudgets(url, prefix="arks:budget:rebuild:")
        self.queue: list[UsageRecord] = []
        self.ledger = ledger
        self.snapshots = QuotaSnapshots(
            self.budgets, StaticPolicy(policy()), None, lambda: LIVE.timestamp()
        )
        if ledger is not None:
            self.snapshots.ledger = ledger
            self.snapshots.pending = lambda: list(self.queue)

    async def settle(self, n: int, prompt: int, completion: int) -> int:
        """One request's settlement, as AdmissionControl.settle and the settlement's record."""
        q = next(iter(policy().quotas.values()))
        charges = quotas.quota_charges(q, "m", prompt, completion, LIVE)
        totals = await self.budgets.settle(f"{self.name}-{n}", charges, LIVE.timestamp())
        if totals is not None:
            self.snapshots.charged(totals)
        self.queue.append(charged(f"{self.name}-{n}", LIVE, prompt, completion))
        return prompt + completion

    async def flush(self) -> None:
        if self.ledger is not None:
            await self.ledger.write(self.queue)
        self.queue = []


@pytest.mark.parametrize("with_ledger", [False, True])
async def test_two_replicas_and_a_redis_restarted_empty(
    tmp_path: Path, private_redis: PrivateRedis, with_ledger: bool
) -> None:
    """Replica B settles after A's last snapshot turn, then Redis restarts empty. A, first to
    notice, puts back its snapshot (the generation marker then tells B not to add its own):
    without a ledger B's latest charges are lost; with one, the rebuild raises the total to
    exactly what the records charged, B's unwritten ones included once they are written."""
    ledger = open_ledger(f"sqlite:///{tmp_path}/usage.db") if with_ledger else None
    if ledger is not None:
        await ledger.migrate()
    a = Replica("a", private_redis.url, ledger)
    b = Replica("b", private_redis.url, ledger)
    key = next(t.key for t in rebuild.targets(policy(), LIVE) if t.kind == "total")
    try:
        await a.snapshots.turn()
        await b.snapshots.turn()
        truth = 0
        for n in range(40):
            truth += await (a if n % 2 else b).settle(n, 11, 3 + n % 5)
        await a.flush()
        await a.snapshots.turn()  # A's snapshot now holds B's charges so far ...
        for n in range(40, 60):
            truth += await b.settle(n, 13, 2)  # ... but not these
        await b.flush()  # B's writer wrote some of them; the rest wait in its queue
        for n in range(60, 64):
            truth += await b.settle(n, 5, 5)
        private_redis.kill()
        private_redis.start()  # empty
        await a.snapshots.restore_lost()
        await b.snapshots.restore_lost()
        await b.flush()  # B's queue reaches the ledger ...
        await a.snapshots.turn()  # ... and the next turn's rebuild finds it
        used = (await a.budgets.used([key]))[key]
        lost = truth - used
        print(f"with_ledger={with_ledger}: {lost} of {truth} tokens lost")
        if with_ledger:
            assert used == truth
        else:
            assert lost == 20 * 15 + 4 * 10  # what B settled after A's last turn
    finally:
        await a.budgets.close()
        await b.budgets.close()
        if ledger is not None:
            await ledger.close()
