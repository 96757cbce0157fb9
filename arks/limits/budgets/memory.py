"""Budgets in dicts: for a single process (the local default) and as the tests' real fake.

Time is only ever the `now` passed in. `used` and `restore` have none, so they judge budget
expiry by the latest `now` an `admit` or `settle` brought.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from arks.limits.budgets import SETTLED_MEMORY_S, Admission, Charge, Lease, Level
from arks.limits.budgets.room import (
    NOTHING_TO_ADMIT,
    check_admit,
    check_restore,
    check_settle,
    fits,
    merge_leases,
)

# Expired budgets and leases of budgets nobody touches any more are dropped all at once after
# this many writes (or as many writes as there are budgets, whichever is more): O(1) per write.
MIN_WRITES_PER_SWEEP = 1024


@dataclass
class _Budget:
    used: int | None = None  # None until settled or restored: a missing total, as in Redis
    expires_at: float | None = None
    leases: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (amount, until)
    leased: int = 0  # the sum of the leases' amounts
    # (until, request id), oldest first; entries of replaced or settled leases linger until
    # popped or compacted, so they are checked against `leases` when popped.
    expiries: list[tuple[float, str]] = field(default_factory=list)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    @property
    def idle(self) -> bool:
        return self.used is None and not self.leases

    def own(self, request_id: str) -> int:
        lease = self.leases.get(request_id)
        return lease[0] if lease else 0

    def drop_expired_leases(self, now: float) -> None:
        while self.expiries and self.expiries[0][0] <= now:
            _, request_id = heapq.heappop(self.expiries)
            lease = self.leases.get(request_id)
            if lease is not None and lease[1] <= now:
                self.release(request_id)

    def take(self, request_id: str, amount: int, until: float) -> None:
        self.release(request_id)
        self.leases[request_id] = (amount, until)
        self.leased += amount
        heapq.heappush(self.expiries, (until, request_id))
        if len(self.expiries) > 2 * len(self.leases) + 64:
            self.expiries = [(u, rid) for rid, (_, u) in self.leases.items()]
            heapq.heapify(self.expiries)

    def release(self, request_id: str) -> None:
        lease = self.leases.pop(request_id, None)
        if lease is not None:
            self.leased -= lease[0]


class MemoryBudgets:
    """Not shared between processes; atomic per call because no call awaits."""

    def __init__(self) -> None:
        self._budgets: dict[str, _Budget] = {}
        self._now = -math.inf  # the latest `now` seen
        self._writes = 0
        self._writes_per_sweep = MIN_WRITES_PER_SWEEP
        # (budget key, request id) settled, and when: a retried settlement counts once
        self._settled: dict[tuple[str, str], float] = {}
        self._settled_order: deque[tuple[float, tuple[str, str]]] = deque()

    async def admit(
        self, request_id: str, leases: Sequence[Lease], ttl_s: float, now: float
    ) -> Admission:
        """Admitted: the figures are the last budget's (in the order given), before its lease."""
        merged = merge_leases(leases)
        check_admit(merged, ttl_s, now)
        if not merged:
            return NOTHING_TO_ADMIT
        self._now = max(self._now, now)
        figures: list[tuple[int, int]] = []
        for lease in merged:
            budget = self._live(lease.key, now)
            used, leased = (
                (budget.used or 0, budget.leased - budget.own(request_id)) if budget else (0, 0)
            )
            if not fits(used, leased, lease.amount, lease.limit):
                return Admission(False, lease.key, used, leased, lease.limit)
            figures.append((used, leased))
        until = now + ttl_s
        for lease in merged:
            budget = self._budgets.setdefault(lease.key, _Budget())
            budget.take(request_id, lease.amount, until)
            if lease.expires_at is not None:
                budget.expires_at = lease.expires_at
        self._wrote(len(merged), now)
        used, leased = figures[-1]
        return Admission(True, merged[-1].key, used, leased, merged[-1].limit)

    async def settle(
        self, request_id: str, charges: Sequence[Charge], now: float
    ) -> Mapping[str, int] | None:
        check_settle(charges, now)
        self._now = max(self._now, now)
        self._forget_settled(now - SETTLED_MEMORY_S)
        for charge in charges:
            if (charge.key, request_id) in self._settled:
                continue
            self._settled[(charge.key, request_id)] = now
            self._settled_order.append((now, (charge.key, request_id)))
            budget = self._live(charge.key, now) or self._budgets.setdefault(charge.key, _Budget())
            budget.release(request_id)
            if charge.cost:
                budget.used = (budget.used or 0) + charge.cost
            if charge.expires_at is not None:
                budget.expires_at = charge.expires_at
            if budget.idle:
                del self._budgets[charge.key]
        self._wrote(len(charges), now)
        # One process, never wiped under its own snapshot: always the known generation.
        return {c.key: b.used or 0 for c in charges if (b := self._live(c.key, now)) is not None}

    async def settle_many(
        self, settlements: Sequence[tuple[str, Sequence[Charge]]], now: float
    ) -> list[Mapping[str, int] | None]:
        return [await self.settle(request_id, charges, now) for request_id, charges in settlements]

    def _forget_settled(self, before: float) -> None:
        order = self._settled_order
        while order and order[0][0] <= before:
            _, entry = order.popleft()
            self._settled.pop(entry, None)

    async def renew(self, held: Mapping[str, Sequence[str]], ttl_s: float, now: float) -> int:
        self._now = max(self._now, now)
        renewed = 0
        for key, request_ids in held.items():
            budget = self._live(key, now)
            if budget is None:
                continue
            for request_id in request_ids:
                lease = budget.leases.get(request_id)
                if lease is not None:
                    budget.take(request_id, lease[0], now + ttl_s)
                    renewed += 1
        return renewed

    async def used(self, keys: Sequence[str]) -> dict[str, int]:
        totals: dict[str, int] = {}
        for key in keys:
            budget = self._budgets.get(key)
            live = budget is not None and not budget.expired(self._now)
            totals[key] = (budget.used or 0) if budget is not None and live else 0
        return totals

    async def levels(self, keys: Sequence[str], now: float) -> dict[str, Level]:
        self._now = max(self._now, now)
        out: dict[str, Level] = {}
        for key in keys:
            budget = self._live(key, now)
            out[key] = Level(budget.used or 0, budget.leased) if budget else Level(0, 0)
        return out

    async def restore(self, used: Mapping[str, int]) -> int:
        """Zeros are not restored (a missing total is zero): they neither count nor write."""
        check_restore(used)
        restored = 0
        for key, value in used.items():
            budget = self._budgets.get(key)
            if budget is not None and budget.expired(self._now):
                del self._budgets[key]
                budget = None
            if value == 0 or (budget is not None and budget.used is not None):
                continue
            self._budgets.setdefault(key, _Budget()).used = value
            restored += 1
        return restored

    async def raise_to(self, used: Mapping[str, int]) -> int:
        check_restore(used)
        raised = 0
        for key, value in used.items():
            budget = self._budgets.get(key)
            if budget is not None and budget.expired(self._now):
                del self._budgets[key]
                budget = None
            if value == 0 or (budget is not None and (budget.used or 0) >= value):
                continue
            self._budgets.setdefault(key, _Budget()).used = value
            raised += 1
        return raised

    async def close(self) -> None:
        self._budgets.clear()

    def __len__(self) -> int:
        """Budgets held, expired ones included until touched or swept."""
        return len(self._budgets)

    def _live(self, key: str, now: float) -> _Budget | None:
        """The budget under `key` without its expired leases, or None (dropping it if expired)."""
        budget = self._budgets.get(key)
        if budget is None:
            return None
        if budget.expired(now):
            del self._budgets[key]
            return None
        budget.drop_expired_leases(now)
        return budget

    def _wrote(self, writes: int, now: float) -> None:
        self._writes += writes
        if self._writes < self._writes_per_sweep:
            return
        for key in list(self._budgets):
            budget = self._live(key, now)
            if budget is not None and budget.idle:
                del self._budgets[key]
        self._writes = 0
        self._writes_per_sweep = max(MIN_WRITES_PER_SWEEP, len(self._budgets))
