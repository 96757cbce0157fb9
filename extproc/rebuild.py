"""Quota budgets rebuilt from the usage ledger (issue 13): the figures a store that lost its data
must hold again, as floors (pure, but for `rebuild`).

Each record carries the quota it was charged to, when it was admitted (a request settles into
the periods it was admitted in) and the micro-units a cost item was charged. So a quota item's
budget for a period used exactly the sum of its records admitted in that period: what the
ledger holds, plus what this gateway settled but has not written yet (its writer's queue). That
sum is a lower bound of the truth (another replica's unwritten records are missing until they
are written), never above it, so the store's totals are raised to it and never lowered
(`BudgetStore.raise_to`): charges the ledger has not seen yet stay counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from arks.ledger import LedgerStore, QuotaTotals, UsageRecord
from arks.limits.budgets import BudgetStore
from arks.policy import Policy
from extproc import quota


@dataclass(frozen=True, slots=True)
class Target:
    """One budget to rebuild: a quota item's current period."""

    key: str  # the budget key
    quota: str  # "namespace/name", as records name it
    kind: str  # the item's type: prompt, response, total, cost
    start: datetime
    end: datetime | None


def targets(policy: Policy, now: datetime) -> list[Target]:
    """Every quota item's current period under `policy`."""
    out = []
    for q in policy.quotas.values():
        name = f"{q.key.namespace}/{q.key.name}"
        for item in q.quotas:
            start, end = quota.period_bounds(item.period, now)
            out.append(Target(quota.budget_key(q.key, item, now), name, item.type, start, end))
    return out


def used(kind: str, totals: QuotaTotals) -> int:
    """What a budget of this kind used, from its records' totals."""
    if kind == "prompt":
        return totals.prompt_tokens
    if kind == "response":
        return totals.completion_tokens
    if kind == "total":
        return totals.prompt_tokens + totals.completion_tokens
    return totals.cost_micros


def unwritten(records: Iterable[UsageRecord], target: Target) -> QuotaTotals:
    """The totals of records not in the ledger yet that belong to `target`'s budget."""
    requests = prompt = completion = cost = 0
    for r in records:
        if r.quota != target.quota or r.admitted_at is None or r.admitted_at < target.start:
            continue
        if target.end is not None and r.admitted_at >= target.end:
            continue
        requests += 1
        prompt += r.prompt_tokens
        completion += r.completion_tokens
        cost += r.cost_micros or 0
    return QuotaTotals(requests, prompt, completion, cost)


def plus(a: QuotaTotals, b: QuotaTotals) -> QuotaTotals:
    return QuotaTotals(
        a.requests + b.requests,
        a.prompt_tokens + b.prompt_tokens,
        a.completion_tokens + b.completion_tokens,
        a.cost_micros + b.cost_micros,
    )


async def rebuild(
    policy: Policy,
    now: datetime,
    ledger: LedgerStore,
    budgets: BudgetStore,
    pending: Callable[[], Iterable[UsageRecord]] = tuple,
) -> int:
    """Raise every current quota budget to what the ledger (and `pending()`, this gateway's
    records not written yet) says it used; returns how many budgets were raised. One ledger
    query per quota and period (items of one period share it). Raises `LedgerUnavailable`.

    The writer stores batches while this runs: `pending()` is read after the totals, and the
    records among them the ledger already holds are dropped, so none counts twice; one stored
    between the two reads counts in neither (the next turn's rebuild finds it)."""
    found = targets(policy, now)
    totals: dict[tuple[str, datetime, datetime | None], QuotaTotals] = {}
    for target in found:
        period = (target.quota, target.start, target.end)
        if period not in totals:
            totals[period] = await ledger.quota_totals(target.quota, target.start, target.end)
    charged = [r for r in pending() if r.quota is not None]
    stored = await ledger.known([r.request_id for r in charged]) if charged else set()
    waiting = [r for r in charged if r.request_id not in stored]
    floors = {
        t.key: used(t.kind, plus(totals[(t.quota, t.start, t.end)], unwritten(waiting, t)))
        for t in found
    }
    return await budgets.raise_to(floors) if floors else 0
