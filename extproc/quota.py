"""ArksQuota budgets and concurrency limits as leases on a budget store (pure).

A quota item (`prompt`, `response`, `total` tokens, or `cost`) has a calendar period in UTC
(`day`, `week` from Monday, `month`, or `none`); each period is its own budget, keyed by the
period's start. Costs are counted in micro-units of the price table's currency: prices are per
million tokens, so a token costs `price` micro-units.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from arks.api import ArksQuota, ObjectKey, Price, QuotaItem
from arks.limits.budgets import Charge, Lease
from extproc.decision import Identity

MICRO = 1_000_000
# A budget is kept this long after its period ended, so late settlements still find it.
GRACE = timedelta(days=7)


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime | None]:
    """The [start, end) of the calendar period holding `now` (UTC); `none` never ends."""
    return _day_period(period, now.astimezone(UTC).date().toordinal())


@functools.lru_cache(maxsize=64)
def _day_period(period: str, day_ordinal: int) -> tuple[datetime, datetime | None]:
    # Per (period, day): the same few answers serve every request of a day.
    plain = date.fromordinal(day_ordinal)
    day = datetime(plain.year, plain.month, plain.day, tzinfo=UTC)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    if period == "month":
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
        return start, end
    return datetime(1970, 1, 1, tzinfo=UTC), None


def budget_key(quota: ObjectKey, item: QuotaItem, now: datetime) -> str:
    return _budget_key(quota, item.type, item.period, now.astimezone(UTC).date().toordinal())


@functools.lru_cache(maxsize=4096)
def _budget_key(quota: ObjectKey, kind: str, period: str, day_ordinal: int) -> str:
    start, _ = _day_period(period, day_ordinal)
    label = "none" if period == "none" else f"{period}-{start:%Y-%m-%d}"
    return f"quota/{quota.namespace}/{quota.name}/{kind}/{label}"


def _expiry(item: QuotaItem, now: datetime) -> float | None:
    _, end = period_bounds(item.period, now)
    return None if end is None else (end + GRACE).timestamp()


def limit_units(item: QuotaItem) -> int:
    return round(item.value * MICRO) if item.type == "cost" else int(item.value)


def price_for(quota: ArksQuota, model: str) -> Price | None:
    for price in quota.prices:
        if price.model == model:
            return price
    return next((p for p in quota.prices if p.model == "*"), None)


def cost_of(
    item: QuotaItem, prompt: int, completion: int, price: Price | None, seconds: float = 0.0
) -> int:
    if item.type == "prompt":
        return prompt
    if item.type == "response":
        return completion
    if item.type == "total":
        return prompt + completion
    return cost_micros(prompt, completion, price, seconds)


def cost_micros(prompt: int, completion: int, price: Price | None, seconds: float = 0.0) -> int:
    """What a request costs against a cost quota, in micro-units, rounded up; 0 without a price
    for its model (it costs nothing against a cost quota). `seconds` of audio cost
    `price.second` each, in the currency (a million micro-units)."""
    if price is None:
        return 0
    return math.ceil(
        prompt * price.input + completion * price.output + seconds * price.second * MICRO
    )


def currency_cost(prompt: int, completion: int, price: Price, seconds: float = 0.0) -> float:
    """What a request cost in the price table's currency (prices are per million tokens, and per
    second of audio), exact (not rounded up to a micro-unit as the budget charge is)."""
    return (prompt * price.input + completion * price.output) / MICRO + seconds * price.second


def _lease(key: str, limit: int, amount: int, expires_at: float | None) -> Lease:
    # A reservation larger than the whole budget could never be admitted: cap it, so such a
    # request still runs when the budget is untouched (and overshoots by at most its excess).
    return Lease(key, limit, min(amount, limit), expires_at)


def quota_leases(
    quota: ArksQuota, model: str, prompt: int, completion: int, now: datetime
) -> list[Lease]:
    price = price_for(quota, model)
    return [
        _lease(
            budget_key(quota.key, item, now),
            limit_units(item),
            cost_of(item, prompt, completion, price),
            _expiry(item, now),
        )
        for item in quota.quotas
    ]


def quota_charges(
    quota: ArksQuota,
    model: str,
    prompt: int,
    completion: int,
    admitted: datetime,
    seconds: float = 0.0,
) -> list[Charge]:
    """Settle into the periods the request was admitted in, even if it ended in the next."""
    price = price_for(quota, model)
    return [
        Charge(
            budget_key(quota.key, item, admitted),
            cost_of(item, prompt, completion, price, seconds),
            _expiry(item, admitted),
        )
        for item in quota.quotas
    ]


TOKEN_WINDOWS = {"tpm": 60, "tpd": 86400}


def token_rate_key(identity: Identity, kind: str, now: float) -> tuple[str, float]:
    """The budget of a tokens-per-window limit for the window holding `now`, and its end."""
    window = TOKEN_WINDOWS[kind]
    start = int(now) // window * window
    return f"{kind}/{identity.namespace}/{identity.user}/{identity.model}/{start}", float(
        start + window
    )


def token_rate_leases(
    identity: Identity, limits: Mapping[str, int], amount: int, now: float
) -> list[Lease]:
    """tpm/tpd as budgets: reserve the request's estimated tokens in the current window."""
    leases = []
    for kind, value in limits.items():
        key, end = token_rate_key(identity, kind, now)
        leases.append(_lease(key, value, amount, end + GRACE.total_seconds()))
    return leases


def token_rate_charges(
    identity: Identity, limits: Mapping[str, int], tokens: int, admitted: float
) -> list[Charge]:
    charges = []
    for kind in limits:
        key, end = token_rate_key(identity, kind, admitted)
        charges.append(Charge(key, tokens, end + GRACE.total_seconds()))
    return charges


def concurrency_key(identity: Identity) -> str:
    return f"concurrency/{identity.namespace}/{identity.user}/{identity.model}"


@dataclass(frozen=True)
class Refusal:
    """Why an admission was refused, for the client."""

    status: int
    code: str
    message: str
    retry_after_s: int
    reason: str  # the check that refused: concurrency, tpm, tpd or quota


def refusal(key: str, used: int, leased: int, limit: int, now: datetime) -> Refusal:
    if key.startswith("concurrency/"):
        return Refusal(
            429,
            "rate_limit_exceeded",
            f"Too many concurrent requests: the limit is {limit}.",
            1,
            "concurrency",
        )
    kind = key.split("/", 1)[0]
    if kind in TOKEN_WINDOWS:
        window = TOKEN_WINDOWS[kind]
        retry = window - int(now.timestamp()) % window
        per = "minute" if kind == "tpm" else "day"
        return Refusal(
            429,
            "rate_limit_exceeded",
            f"Token rate limit reached: {limit} tokens per {per}; {used} used and {leased} reserved "
            f"in this {per}. Try again in {retry} s.",
            retry,
            kind,
        )
    _, namespace, name, kind, period = key.split("/", 4)
    shown = (lambda v: f"{v / MICRO:.6g}") if kind == "cost" else str
    period_kind = period.split("-", 1)[0]
    _, end = period_bounds(period_kind, now)
    retry = max(1, math.ceil((end - now).total_seconds())) if end else 0
    when = f" until {end:%Y-%m-%d %H:%M} UTC" if end else ""
    return Refusal(
        429,
        "insufficient_quota",
        f"You exceeded your quota {namespace}/{name} ({kind}, period {period_kind}): "
        f"used {shown(used)} and {shown(leased)} reserved of {shown(limit)}{when}.",
        retry,
        "quota",
    )
