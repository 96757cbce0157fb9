"""The usage ledger: one durable record per finished request, and the queries over them (pure).

A record is what a tenant is billed from: who (namespace, the ArksToken's name), what (model,
engine, endpoint path, status), how much (prompt and completion tokens, cost in the price table's
currency) and whether the engine reported the numbers or the gateway estimated them (and why).
Never the token text, never prompt or answer content.

Stores (`arks/adapters/ledger/`: SQLite, PostgreSQL) implement `LedgerStore`; the gateway's
writer (extproc) hands them batches off the request path. `request_id` is the record's identity:
writing a record whose request id is already stored does nothing, so a replayed or duplicated
settlement (two gateway replicas, a retry after a database error, a spill file replayed) is
recorded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

Source = Literal["reported", "estimated"]
Granularity = Literal["day", "week", "month", "none"]  # week: ISO weeks, from Monday (UTC)
GroupBy = Literal["namespace", "user", "model"]


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str  # Envoy's x-request-id: the record's identity
    time: datetime  # when the request ended (UTC, aware)
    namespace: str
    user: str  # the ArksToken's name
    model: str  # the configured model it was routed to
    engine: str  # the engine's address (host:port) Envoy sent it to; "" when none was reached
    path: str  # the API path (/v1/chat/completions, ...)
    status: int  # the HTTP status sent to the client (0: none sent)
    prompt_tokens: int
    completion_tokens: int
    cost: float | None  # in the price table's currency; None when no price applied
    source: Source
    estimate_reason: str | None  # why it is an estimate (None when reported)
    duration_s: float | None
    ttft_s: float | None  # streams: time to the first content byte
    # What the quota budgets were charged, so they can be rebuilt from the ledger exactly: the
    # ArksQuota ("namespace/name") the admission reserved against, the admission's time (a
    # request settles into the periods it was admitted in), and the micro-units a cost item was
    # charged (each request rounded up, as the budget charge is).
    quota: str | None = None
    admitted_at: datetime | None = None
    cost_micros: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ReportQuery:
    """Totals of the records with `start <= time < end`, grouped by `group_by` and by period."""

    start: datetime
    end: datetime
    group_by: tuple[GroupBy, ...] = ("namespace", "user", "model")
    granularity: Granularity = "day"
    namespaces: tuple[str, ...] = ()  # empty: all
    users: tuple[str, ...] = ()
    models: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReportRow:
    period: datetime | None  # the period's start (UTC); None for granularity "none"
    namespace: str | None  # None when not grouped by it
    user: str | None
    model: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float  # sum of the priced records' cost (unpriced count 0)
    estimated_requests: int


@dataclass(frozen=True, slots=True)
class QuotaTotals:
    """What the records charged to one ArksQuota and admitted within a period add up to."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micros: int = 0


class LedgerStore(Protocol):
    async def migrate(self) -> int:
        """Apply the schema migrations not applied yet (versioned, in order); the version now."""
        ...

    async def write(self, records: Sequence[UsageRecord]) -> int:
        """Store a batch in one transaction; records whose request id is stored are skipped.
        Returns how many were new. Raises `LedgerUnavailable` when the database cannot be
        reached (nothing of the batch is stored then)."""
        ...

    async def report(self, query: ReportQuery) -> list[ReportRow]:
        """Totals for `query`, ordered by period then the grouped labels."""
        ...

    async def quota_totals(self, quota: str, start: datetime, end: datetime | None) -> QuotaTotals:
        """The totals of the records charged to `quota` ("namespace/name") whose admission was
        in [start, end) (`end` None: no end): what that quota's budgets for the period used."""
        ...

    async def known(self, request_ids: Sequence[str]) -> set[str]:
        """Which of these request ids are stored."""
        ...

    async def close(self) -> None: ...


class LedgerUnavailable(Exception):
    """The database cannot be reached or refused the batch for a reason a retry may cure."""
