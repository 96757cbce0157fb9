"""Quota usage kept somewhere durable, so that no service holds the only copy of a counter.

Every few seconds the used totals of every quota's current periods are read from the budget
store and written to a state file (atomically); the same turn puts any total the store has lost
back (`restore` only sets missing keys). So a Redis that restarts empty — or the in-memory store
of a restarted gateway — gets its quota usage back, less at most one interval of charges.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from arks.policy import Policy, PolicySource
from extproc import quota
from ratelimit.budgets import BudgetStore

log = logging.getLogger(__name__)


def current_keys(policy: Policy, now: datetime) -> list[str]:
    return [quota.budget_key(q.key, item, now) for q in policy.quotas.values() for item in q.quotas]


@dataclass
class QuotaSnapshots:
    budgets: BudgetStore
    policy: PolicySource
    path: Path | None
    clock: Callable[[], float]
    snapshot: dict[str, int] | None = None

    def load(self) -> dict[str, int]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            log.error("quota state file %s unreadable, starting without it: %s", self.path, err)
            return {}
        return {k: int(v) for k, v in data.get("used", {}).items() if isinstance(v, int | float)}

    async def turn(self) -> int:
        """Restore what the store lost, then snapshot what it has; returns how many keys came back."""
        if self.snapshot is None:
            self.snapshot = self.load()
        restored = await self.budgets.restore(self.snapshot)
        if restored:
            log.warning("restored %d quota totals the budget store had lost", restored)
        keys = current_keys(self.policy.current(), datetime.fromtimestamp(self.clock(), UTC))
        used = await self.budgets.used(keys) if keys else {}
        # Within a period `used` only grows: the larger figure is the truer one (a store that
        # restarted empty between restore and read must not zero the snapshot).
        self.snapshot = {k: max(self.snapshot.get(k, 0), v) for k, v in used.items()}
        if self.path is not None:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps({"taken_at": self.clock(), "used": self.snapshot}, indent=1, sort_keys=True))
            tmp.replace(self.path)
        return restored
