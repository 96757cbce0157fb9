"""Budget and rate-limit levels as gauges, refreshed by the snapshot timer, never per request.

Each ArksQuota item's current period: `arks_quota_used`, `arks_quota_reserved` (the leases of
requests in flight), `arks_quota_limit` and `arks_quota_reset_timestamp_seconds` (none for
period `none`), cost items in the price table's currency. Each configured limit of a token's
grant for a model that exists (rpm, rpd, tpm, tpd, concurrency): `arks_rate_limit_remaining`
and `arks_rate_limit_limit`. The gauges are rebuilt whole from the policy at every refresh, so
the series of a deleted quota or token are gone at the next one.

Reads per refresh: one budget-store round trip per `LEVELS_PER_READ` (256) budgets (quota items,
tpm/tpd windows, concurrency slots) and one counter-store round trip per `HITS_PER_READ` (256)
rpm/rpd counters; at most `MAX_LIMIT_SERIES` token limits are shown (the rest are logged once).

Every gateway replica shows the same figures (the store is shared): aggregate with max, not sum.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from arks.limits.backends import CounterBackend
from arks.limits.budgets import LEVELS_PER_READ, BudgetStore, Level
from arks.limits.model import Hit
from arks.policy import Policy
from extproc import qos, quota
from extproc.decision import Identity

log = logging.getLogger(__name__)

QUOTA_LABELS = ("namespace", "quota", "type", "period")
LIMIT_LABELS = ("namespace", "user", "model", "limit")
LIMIT_KINDS = ("rpm", "rpd", "tpm", "tpd", "concurrency")
MAX_LIMIT_SERIES = 10_000
HITS_PER_READ = 256

QUOTA_GAUGES = {
    "arks_quota_used": "Each ArksQuota item's use in its current period (cost in the price "
    "table's currency), as the snapshot last read it.",
    "arks_quota_reserved": "Each ArksQuota item's reservations held by requests in flight in "
    "its current period (cost in the price table's currency).",
    "arks_quota_limit": "Each ArksQuota item's limit per period (cost in the price table's "
    "currency).",
    "arks_quota_reset_timestamp_seconds": "When each ArksQuota item's current period ends "
    "(epoch seconds); none for period none.",
}
LIMIT_GAUGES = {
    "arks_rate_limit_remaining": "What a token may still use of each configured limit of its "
    "grant for a model, now: requests (rpm, rpd) or tokens (tpm, tpd) left in the window, "
    "concurrent requests left (concurrency).",
    "arks_rate_limit_limit": "Each configured limit of a token's grant for a model.",
}


@dataclass(frozen=True)
class QuotaPeriod:
    """One ArksQuota item in its current period."""

    labels: tuple[str, str, str, str]  # namespace, quota, type, period
    key: str  # its budget
    limit: float  # in the item's own units (currency for cost)
    scale: int  # budget units per shown unit: micro-units for cost, else 1
    resets_at: float | None  # epoch seconds; None for period none


@dataclass(frozen=True)
class TokenLimit:
    """One configured limit of one token's grant for one model."""

    identity: Identity
    kind: str  # rpm, rpd, tpm, tpd, concurrency
    value: int

    @functools.cached_property
    def labels(self) -> tuple[str, str, str, str]:
        """namespace, user, model, limit: computed once (the refresh reads them often)."""
        who = self.identity
        return (who.namespace, who.user, who.model, self.kind)


def quota_periods(policy: Policy, now: datetime) -> list[QuotaPeriod]:
    """Every quota item's current period; an item repeated in one quota is shown once."""
    out: dict[tuple[str, str, str, str], QuotaPeriod] = {}
    for found in sorted(policy.quotas.values(), key=lambda q: (q.key.namespace, q.key.name)):
        for item in found.quotas:
            labels = (found.key.namespace, found.key.name, item.type, item.period)
            _, end = quota.period_bounds(item.period, now)
            out.setdefault(
                labels,
                QuotaPeriod(
                    labels,
                    quota.budget_key(found.key, item, now),
                    item.value,
                    quota.MICRO if item.type == "cost" else 1,
                    None if end is None else end.timestamp(),
                ),
            )
    return list(out.values())


def token_limits(policy: Policy, now: datetime) -> list[TokenLimit]:
    """The configured limits of every usable token (not expired, not disabled) for the models
    its grants name that exist, in a stable order; a limit repeated in a grant, or a model
    granted twice, is shown as the first one."""
    out: dict[tuple[str, str, str, str], TokenLimit] = {}
    tokens = sorted(policy.tokens_by_digest.values(), key=lambda t: (t.key.namespace, t.user))
    for token in tokens:
        if token.disabled or token.expired(now):
            continue
        for grant in token.qos:
            if policy.endpoint(token.key.namespace, grant.endpoint) is None:
                continue
            who = Identity(token.key.namespace, token.user, grant.endpoint)
            for limit in grant.rate_limits:
                if limit.type in LIMIT_KINDS:
                    found = TokenLimit(who, limit.type, limit.value)
                    out.setdefault(found.labels, found)
    return list(out.values())


def budget_key(limit: TokenLimit, now: float) -> str | None:
    """The budget a tpm, tpd or concurrency limit is kept in now; None for rpm and rpd (counters)."""
    if limit.kind in quota.TOKEN_WINDOWS:
        return quota.token_rate_key(limit.identity, limit.kind, now)[0]
    if limit.kind == "concurrency":
        return quota.concurrency_key(limit.identity)
    return None


def remaining(limit: TokenLimit, level: Level | None, counted: int | None) -> int:
    """What is left of a limit: a request limit's counter says it; a token window's budget is
    its value less what was used and what is reserved; concurrency less the slots leased."""
    if limit.kind in qos.REQUEST_LIMITS:
        return limit.value if counted is None else counted
    if level is None:
        return limit.value
    used = 0 if limit.kind == "concurrency" else level.used
    return max(0, limit.value - used - level.leased)


@dataclass(frozen=True)
class Sample:
    labels: tuple[str, ...]
    value: float


@dataclass(frozen=True)
class Shown:
    """The gauges' samples, by metric name, replaced whole at every refresh."""

    samples: Mapping[str, tuple[Sample, ...]]


def shown(
    periods: Sequence[QuotaPeriod],
    limits: Sequence[tuple[TokenLimit, str | None]],
    levels: Mapping[str, Level],
    snapshot: Mapping[str, int],
    counted: Mapping[tuple[str, str, str, str], int],
) -> Shown:
    """The samples of every gauge from what the stores said (pure); each limit comes with its
    budget key (`budget_key`)."""
    out: dict[str, list[Sample]] = {name: [] for name in (*QUOTA_GAUGES, *LIMIT_GAUGES)}
    for period in periods:
        level = levels.get(period.key, Level(0, 0))
        # The snapshot holds settlements the store may have lost since: the larger figure wins.
        used = max(level.used, snapshot.get(period.key, 0))
        out["arks_quota_used"].append(Sample(period.labels, used / period.scale))
        out["arks_quota_reserved"].append(Sample(period.labels, level.leased / period.scale))
        out["arks_quota_limit"].append(Sample(period.labels, period.limit))
        if period.resets_at is not None:
            out["arks_quota_reset_timestamp_seconds"].append(
                Sample(period.labels, period.resets_at)
            )
    for limit, key in limits:
        left = remaining(limit, levels.get(key) if key else None, counted.get(limit.labels))
        out["arks_rate_limit_remaining"].append(Sample(limit.labels, left))
        out["arks_rate_limit_limit"].append(Sample(limit.labels, limit.value))
    return Shown({name: tuple(samples) for name, samples in out.items()})


class LevelGauges:
    """A collector serving the last `Shown` (one reference swap: a scrape sees one refresh)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._shown = Shown({})
        registry.register(self)

    def show(self, samples: Shown) -> None:
        self._shown = samples

    def describe(self) -> list[Metric]:
        return list(self._families(Shown({})))

    def collect(self) -> Iterator[Metric]:
        return self._families(self._shown)

    @staticmethod
    def _families(current: Shown) -> Iterator[Metric]:
        for names, labels in ((QUOTA_GAUGES, QUOTA_LABELS), (LIMIT_GAUGES, LIMIT_LABELS)):
            for name, doc in names.items():
                family = GaugeMetricFamily(name, doc, labels=labels)
                for sample in current.samples.get(name, ()):
                    family.add_metric(sample.labels, sample.value)
                yield family


@dataclass
class Levels:
    """The refresh: the policy's quota items and token limits, read from the stores in batches."""

    gauges: LevelGauges
    budgets: BudgetStore
    counters: CounterBackend
    _capped_at: int = 0  # the policy size last warned about

    async def refresh(self, policy: Policy, snapshot: Mapping[str, int], now: float) -> int:
        """Read and show every level; returns the store round trips it took."""
        moment = datetime.fromtimestamp(now, UTC)
        periods = quota_periods(policy, moment)
        limits = token_limits(policy, moment)
        if len(limits) > MAX_LIMIT_SERIES:
            if self._capped_at != len(limits):
                self._capped_at = len(limits)
                log.warning(
                    "%d token limits configured: the gauges show the first %d",
                    len(limits),
                    MAX_LIMIT_SERIES,
                )
            limits = limits[:MAX_LIMIT_SERIES]
        keyed = [(limit, budget_key(limit, now)) for limit in limits]
        keys = [p.key for p in periods] + [key for _, key in keyed if key is not None]
        unique = list(dict.fromkeys(keys))
        # Chunk by chunk, letting requests run between them: with in-memory stores nothing else
        # would yield, and a big policy's refresh would stall the loop for tens of ms.
        levels: dict[str, Level] = {}
        reads = 0
        for first in range(0, len(unique), LEVELS_PER_READ):
            levels.update(await self.budgets.levels(unique[first : first + LEVELS_PER_READ], now))
            reads += 1
            await asyncio.sleep(0)
        counted, counter_reads = await self._counted(limits, now)
        self.gauges.show(shown(periods, keyed, levels, snapshot, counted))
        return reads + counter_reads

    async def _counted(
        self, limits: Sequence[TokenLimit], now: float
    ) -> tuple[dict[tuple[str, str, str, str], int], int]:
        """The rpm/rpd counters' remaining allowance, read without counting, in batches."""
        asked: list[tuple[TokenLimit, Hit]] = [
            (limit, qos.peek(limit.identity, limit.kind, limit.value))
            for limit in limits
            if limit.kind in qos.REQUEST_LIMITS
        ]
        counted: dict[tuple[str, str, str, str], int] = {}
        reads = 0
        for first in range(0, len(asked), HITS_PER_READ):
            chunk = asked[first : first + HITS_PER_READ]
            outcomes = await self.counters.apply([hit for _, hit in chunk], now)
            reads += 1
            await asyncio.sleep(0)
            for (limit, _), outcome in zip(chunk, outcomes, strict=True):
                counted[limit.labels] = outcome.remaining
        return counted, reads
