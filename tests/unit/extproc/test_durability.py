"""The quota snapshot follows settlements by their totals: a settlement a read already saw
cannot count twice (it did when the snapshot added each settlement's cost: a Redis wiped
afterwards got one request's charge back twice)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from arks.limits.budgets import Charge, MemoryBudgets
from arks.policy import Policy, build_policy
from extproc import durability

NOW = datetime(2026, 12, 5, 12, tzinfo=UTC)


class Source:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def current(self) -> Policy:
        return self.policy


def team_policy() -> Policy:
    team = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksQuota",
        "metadata": {"name": "team", "namespace": "default"},
        "spec": {"quotas": [{"type": "total", "value": 1000, "period": "day"}]},
    }
    return build_policy([("q", team)])


async def test_a_settlement_a_read_already_saw_counts_once() -> None:
    store = MemoryBudgets()
    policy = team_policy()
    snapshots = durability.QuotaSnapshots(store, Source(policy), None, NOW.timestamp)
    [key] = durability.current_keys(policy, NOW)
    await snapshots.turn()
    totals = await store.settle("r1", [Charge(key, 30)], NOW.timestamp())
    assert totals == {key: 30}
    await snapshots.turn()  # the read sees the settlement before its totals are handed on
    snapshots.charged(totals)
    snapshots.charged(totals)  # and again: totals, not increments
    assert snapshots.snapshot == {key: 30}


async def test_only_the_quota_budgets_of_the_current_period_are_snapshotted() -> None:
    store = MemoryBudgets()
    policy = team_policy()
    snapshots = durability.QuotaSnapshots(store, Source(policy), None, NOW.timestamp)
    [key] = durability.current_keys(policy, NOW)
    snapshots.charged({key: 5})  # before the first turn: the turn reads the store instead
    assert snapshots.snapshot is None
    await snapshots.turn()
    snapshots.charged({key: 12, "tpm/default/alice/qwen/29": 400, "concurrency/x": 0})
    assert snapshots.snapshot == {key: 12}
    snapshots.charged({key: 7})  # an older figure never lowers it
    assert snapshots.snapshot == {key: 12}
    assert key.startswith("quota/default/team/total/")


class SlowCopy:
    """A durable copy whose writes wait until let go (an API server that hangs)."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.saved: list[dict[str, int]] = []

    def load(self, policy: Policy, now: datetime) -> dict[str, int]:
        return {}

    def save(self, snapshot: Mapping[str, int], policy: Policy, now: datetime) -> None:
        self.go.wait(10)
        self.saved.append(dict(snapshot))


async def test_a_hung_write_of_the_snapshot_delays_neither_the_turn_nor_the_loop() -> None:
    store = MemoryBudgets()
    policy = team_policy()
    copy = SlowCopy()
    snapshots = durability.QuotaSnapshots(store, Source(policy), copy, NOW.timestamp)
    [key] = durability.current_keys(policy, NOW)
    started = time.monotonic()
    await snapshots.turn()  # its write hangs ...
    await store.settle("r1", [Charge(key, 30)], NOW.timestamp())
    await snapshots.turn()  # ... so this turn's is skipped, not queued behind it
    assert time.monotonic() - started < 1
    assert copy.saved == []
    copy.go.set()
    await snapshots.saved()
    assert copy.saved == [{key: 0}]
    await snapshots.turn()  # the next turn writes what the snapshot holds now
    await snapshots.saved()
    assert copy.saved == [{key: 0}, {key: 30}]
