"""Quota usage kept somewhere durable, so that no service holds the only copy of a counter.

The gateway keeps a snapshot of the used totals of every quota's current periods: each
settlement it makes brings the totals just after it, and every few seconds it is merged
with the store's own totals (other replicas' charges) and written to a durable copy — a state
file locally, `ArksQuota.status` in a cluster. Every housekeeping tick (half a second) puts back
what the store lost. So a Redis that restarts empty gets back every charge this replica made
(other replicas' since the last merge at most), and the in-memory store of a restarted gateway
gets back what the durable copy had (at most one interval old).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from arks.api import ArksQuota
from arks.ledger import LedgerStore, LedgerUnavailable, UsageRecord
from arks.limits.budgets import BudgetStore
from arks.policy import Policy, PolicySource
from extproc import quota, rebuild

log = logging.getLogger(__name__)


def current_keys(policy: Policy, now: datetime) -> list[str]:
    return [quota.budget_key(q.key, item, now) for q in policy.quotas.values() for item in q.quotas]


class DurableCopy(Protocol):
    """`save` blocks (a file, the API server): it is called in a thread, off the request loop."""

    def load(self, policy: Policy, now: datetime) -> dict[str, int]: ...

    def save(self, snapshot: Mapping[str, int], policy: Policy, now: datetime) -> None: ...


@dataclass(frozen=True)
class StateFile:
    """Local mode: a JSON file, replaced atomically."""

    path: Path

    def load(self, policy: Policy, now: datetime) -> dict[str, int]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            log.error("quota state file %s unreadable, starting without it: %s", self.path, err)
            return {}
        return {k: int(v) for k, v in data.get("used", {}).items() if isinstance(v, int | float)}

    def save(self, snapshot: Mapping[str, int], policy: Policy, now: datetime) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(
            json.dumps(
                {"taken_at": now.timestamp(), "used": dict(snapshot)}, indent=1, sort_keys=True
            )
        )
        tmp.replace(self.path)


def quota_status(q: ArksQuota, snapshot: Mapping[str, int], now: datetime) -> list[dict[str, Any]]:
    """`ArksQuota.status.quotaStatus`: each item's use in its current period, in its own units."""
    out = []
    for item in q.quotas:
        used = snapshot.get(quota.budget_key(q.key, item, now), 0)
        start, _ = quota.period_bounds(item.period, now)
        out.append(
            {
                "type": item.type,
                "period": item.period,
                "used": used / quota.MICRO if item.type == "cost" else used,
                "windowStart": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
    return out


STATUS_WRITE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class QuotaStatus:
    """In a cluster: `ArksQuota.status`, which the API server keeps in etcd."""

    api_client: Any
    read_status: Callable[[ArksQuota], Mapping[str, Any] | None]  # the status the watch last saw

    def load(self, policy: Policy, now: datetime) -> dict[str, int]:
        loaded: dict[str, int] = {}
        for q in policy.quotas.values():
            status = self.read_status(q) or {}
            current = {(s["type"], s["period"]): s for s in quota_status(q, {}, now)}
            for entry in status.get("quotaStatus") or []:
                mine = current.get((entry.get("type"), entry.get("period")))
                if mine is None or entry.get("windowStart") != mine["windowStart"]:
                    continue  # another period's figure: nothing to restore from it
                item = next(
                    i for i in q.quotas if (i.type, i.period) == (entry["type"], entry["period"])
                )
                value = float(entry.get("used") or 0)
                loaded[quota.budget_key(q.key, item, now)] = (
                    round(value * quota.MICRO) if item.type == "cost" else int(value)
                )
        return loaded

    def save(self, snapshot: Mapping[str, int], policy: Policy, now: datetime) -> None:
        """Each ArksQuota whose status (as the watch last saw it) differs: one PATCH each, so an
        idle quota costs the API server nothing, however many replicas snapshot it."""
        import kubernetes

        custom = kubernetes.client.CustomObjectsApi(self.api_client)
        for q in policy.quotas.values():
            written = quota_status(q, snapshot, now)
            if (self.read_status(q) or {}).get("quotaStatus") == written:
                continue
            body = {"status": {"quotaStatus": written}}
            try:
                custom.patch_namespaced_custom_object_status(
                    "arks.ai",
                    "v1",
                    q.key.namespace,
                    "arksquotas",
                    q.key.name,
                    body,
                    # A hung API server: this write (the rest of this snapshot) gives up, the
                    # next snapshot tries again. A transport error ends the write the same way.
                    _request_timeout=STATUS_WRITE_TIMEOUT_S,
                )
            except kubernetes.client.ApiException as err:
                log.warning("ArksQuota %s status not written: %s", q.key, err.reason)


def _report_failure(saving: asyncio.Future[None]) -> None:
    if not saving.cancelled() and (err := saving.exception()) is not None:
        log.error("quota snapshot not written: %s", err, exc_info=err)


# Turns (of the snapshot timer) that rebuild from the ledger after a loss: the records other
# replicas settled before it reach the ledger within their writers' flush, a turn or two later.
REBUILD_TURNS = 3


@dataclass
class QuotaSnapshots:
    budgets: BudgetStore
    policy: PolicySource
    durable: DurableCopy | None
    clock: Callable[[], float]
    snapshot: dict[str, int] | None = None
    # With a usage ledger, a store that lost its data (and every start) is rebuilt from it
    # (extproc/rebuild.py); the snapshot stays as the floor without one.
    ledger: LedgerStore | None = None
    pending: Callable[[], Iterable[UsageRecord]] = tuple
    ledger_ready: Callable[[], bool] = lambda: True  # the writer migrated its schema
    rebuild_due: int = REBUILD_TURNS  # the first turns rebuild: the store may be empty
    _keys_for: tuple[Policy, int] | None = None
    _keys: frozenset[str] = frozenset()
    _saving: asyncio.Future[None] | None = None

    def charged(self, totals: Mapping[str, int]) -> None:
        """A settlement the store took: the quota budgets' totals just after it join the
        snapshot at once (the larger figure wins, as in `turn`: a total is never counted twice;
        rate windows and concurrency slots are not snapshotted)."""
        if self.snapshot is None:
            return  # before the first turn, which reads the store's totals anyway
        keys = self._quota_keys()
        for key, total in totals.items():
            if key in keys and total > self.snapshot.get(key, 0):
                self.snapshot[key] = total

    def _quota_keys(self) -> frozenset[str]:
        now = datetime.fromtimestamp(self.clock(), UTC)
        policy = self.policy.current()
        day = now.date().toordinal()  # budget keys change with the policy or the day, no faster
        if self._keys_for is None or self._keys_for[0] is not policy or self._keys_for[1] != day:
            self._keys_for, self._keys = (policy, day), frozenset(current_keys(policy, now))
        return self._keys

    async def restore_lost(self) -> int:
        """Put back what the store lost (a Redis restarted empty); a cheap call otherwise."""
        if self.snapshot is None:
            return 0
        restored = await self.budgets.restore(self.snapshot)
        if restored:
            log.warning("restored %d quota totals the budget store had lost", restored)
            self.rebuild_due = REBUILD_TURNS
            await self._rebuild(self.policy.current(), datetime.fromtimestamp(self.clock(), UTC))
        return restored

    async def _rebuild(self, policy: Policy, now: datetime) -> None:
        """Raise the quota budgets to what the ledger says they used, while a rebuild is due."""
        if self.ledger is None or self.rebuild_due <= 0 or not self.ledger_ready():
            return
        try:
            raised = await rebuild.rebuild(policy, now, self.ledger, self.budgets, self.pending)
        except LedgerUnavailable as err:
            log.warning("quota budgets not rebuilt from the ledger (next turn again): %s", err)
            return
        if raised:
            log.warning("raised %d quota totals to what the usage ledger holds", raised)
        self.rebuild_due -= 1

    async def turn(self) -> int:
        """Restore what the store lost, then snapshot what it has; returns how many keys came back."""
        now = datetime.fromtimestamp(self.clock(), UTC)
        policy = self.policy.current()
        if self.snapshot is None:
            self.snapshot = self.durable.load(policy, now) if self.durable else {}
        restored = await self.budgets.restore(self.snapshot)
        if restored:
            log.warning("restored %d quota totals the budget store had lost", restored)
            self.rebuild_due = REBUILD_TURNS
        await self._rebuild(policy, now)
        keys = current_keys(policy, now)
        used = await self.budgets.used(keys) if keys else {}
        # Within a period `used` only grows: the larger figure is the truer one (a store that
        # restarted empty between restore and read must not zero the snapshot).
        self.snapshot = {k: max(self.snapshot.get(k, 0), v) for k, v in used.items()}
        self._save(policy, now)
        return restored

    def _save(self, policy: Policy, now: datetime) -> None:
        """Write the snapshot to the durable copy in a thread, off the request loop (a file; in a
        cluster a PATCH per changed quota: done on the loop, an API server's round trips stalled
        every request in flight, every interval). Not awaited: a slow or hung API server delays
        the next write (this one is skipped while the last still runs), never the turn."""
        if self.durable is None:
            return
        if self._saving is not None and not self._saving.done():
            log.warning("the last quota snapshot is still being written; skipping this one")
            return
        self._saving = asyncio.ensure_future(
            asyncio.to_thread(self.durable.save, dict(self.snapshot or {}), policy, now)
        )
        self._saving.add_done_callback(_report_failure)

    async def saved(self) -> None:
        """Wait for the snapshot write under way, if any (tests; shutdown)."""
        if self._saving is not None:
            await asyncio.wait([self._saving])
