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
from arks.ledger import LedgerStore, UsageRecord
from arks.limits.budgets import BudgetStore, Charge, MemoryBudgets
from arks.policy import Policy, build_policy
from extproc import quota as quotas
from extproc import rebuild
from tests.integration.test_budgets import shared_redis_store

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
