"""What both stores decide alike, as pure functions: a batch's first record per request id, the
months a batch touches, and a report row from the grouped totals a query returns.

The stores differ in SQL only; these keep their answers identical (the order of the rows and the
rounding of the summed cost, which each database adds up in its own order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime
from typing import Any

from arks.ledger import GroupBy, ReportQuery, ReportRow, UsageRecord

# Cost sums are rounded to this many decimal places: far below any currency's unit, far above
# the last bits in which two databases' float additions (in different orders) differ.
COST_DECIMALS = 9
# usage_records' columns, in the order both stores write a record's values.
COLUMNS = (
    "time",
    "request_id",
    "namespace",
    "user",
    "model",
    "engine",
    "path",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "source",
    "estimate_reason",
    "duration_s",
    "ttft_s",
    "quota",
    "admitted_at",
    "cost_micros",
)


def values(record: UsageRecord, stamp: Callable[[datetime], Any]) -> tuple[Any, ...]:
    """A record's values in `COLUMNS` order, its times as `stamp` makes them (each store its own)."""
    return (
        stamp(record.time),
        record.request_id,
        record.namespace,
        record.user,
        record.model,
        record.engine,
        record.path,
        record.status,
        record.prompt_tokens,
        record.completion_tokens,
        record.cost,
        record.source,
        record.estimate_reason,
        record.duration_s,
        record.ttft_s,
        record.quota,
        None if record.admitted_at is None else stamp(record.admitted_at),
        record.cost_micros,
    )


GROUP_COLUMNS: tuple[GroupBy, ...] = ("namespace", "user", "model")


def utc(moment: datetime) -> datetime:
    """`moment` in UTC. A naive datetime is refused: a record's time must say its zone, or the
    ledger would guess and a report's day boundaries would move."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"a ledger time must be timezone-aware, got {moment.isoformat()}")
    return moment.astimezone(UTC)


def first_of_each(records: Iterable[UsageRecord]) -> list[UsageRecord]:
    """The batch with only the first record of each request id (a later one is a duplicate
    settlement; the store keeps the first, as it keeps the already stored one)."""
    seen: set[str] = set()
    kept = []
    for record in records:
        if record.request_id not in seen:
            seen.add(record.request_id)
            kept.append(record)
    return kept


def month_of(moment: datetime) -> date:
    """The first day of `moment`'s month in UTC."""
    moment = utc(moment)
    return date(moment.year, moment.month, 1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def months_of(records: Iterable[UsageRecord]) -> set[date]:
    """The months (first days, UTC) the records' times fall in."""
    return {month_of(record.time) for record in records}


def report_row(
    query: ReportQuery,
    period: datetime | None,
    labels: Sequence[str | None],
    totals: tuple[int, int, int, float | None, int],
) -> ReportRow:
    """A row from one group's SQL answer: the period's start, the three label columns (None
    where not grouped), and requests, prompt tokens, completion tokens, cost, estimated count."""
    namespace, user, model = (
        label if column in query.group_by else None
        for column, label in zip(GROUP_COLUMNS, labels, strict=True)
    )
    requests, prompt, completion, cost, estimated = totals
    return ReportRow(
        period=None if period is None else utc(period),
        namespace=namespace,
        user=user,
        model=model,
        requests=int(requests),
        prompt_tokens=int(prompt),
        completion_tokens=int(completion),
        cost=round(float(cost or 0.0), COST_DECIMALS) + 0.0,  # + 0.0: no -0.0
        estimated_requests=int(estimated),
    )


def ordered(rows: Iterable[ReportRow]) -> list[ReportRow]:
    """Rows by period then the grouped labels, by code point (a database's collation would sort
    text by its locale, and two stores would disagree)."""
    never = datetime.min.replace(tzinfo=UTC)
    return sorted(
        rows,
        key=lambda r: (r.period or never, r.namespace or "", r.user or "", r.model or ""),
    )


def period_start(granularity: str, moment: datetime) -> datetime | None:
    """The start (UTC) of the day, ISO week (Monday) or month `moment` falls in; None for
    "none". The reference the stores' SQL truncation is tested against."""
    moment = utc(moment)
    day = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    if granularity == "day":
        return day
    if granularity == "week":
        return day.fromordinal(day.toordinal() - day.weekday()).replace(tzinfo=UTC)
    if granularity == "month":
        return day.replace(day=1)
    if granularity == "none":
        return None
    raise ValueError(f"unknown granularity {granularity!r}")
