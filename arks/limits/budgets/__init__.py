"""Budgets with leases: quotas and concurrency limits that admissions cannot overshoot.

A budget has a `used` total (what finished requests cost) and leases (what requests in flight
may still cost). Admitting a request takes a lease of its estimated cost, atomically, only if
`used + leased + cost <= limit`; settling it drops the lease and adds the real cost to `used`,
whatever it is. A lease nobody settles (the gateway died) expires by itself. Concurrency is a
budget whose leases cost 1 and whose settlements cost 0.

The bound: while every request's real cost stays within its lease (a quota's reservation is the
prompt estimate plus max_tokens), `used` never exceeds the limit, however many run at once.
Requests that cost more than they reserved (no max_tokens, an estimate that was low) can take
`used` past the limit by at most the sum of their excesses over the requests in flight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

# How long a budget remembers which requests it settled: longer than a settlement waits to be
# retried after a lost reply (the next housekeeping turn), short enough to stay small in Redis.
SETTLED_MEMORY_S = 120.0
# Budgets read per round trip by `levels` (a Redis script's keys: four per budget).
LEVELS_PER_READ = 256


@dataclass(frozen=True)
class Lease:
    """Ask to reserve `amount` of budget `key` (whose limit is `limit`) for one request."""

    key: str
    limit: int
    amount: int
    expires_at: float | None = None  # when the budget itself may be forgotten (its period ended)


@dataclass(frozen=True)
class Charge:
    """Settle one budget for one request: drop its lease, add `cost` to `used`."""

    key: str
    cost: int
    expires_at: float | None = None


@dataclass(frozen=True)
class Admission:
    admitted: bool
    key: str  # the first budget that refused, or the last checked when admitted
    used: int  # the budget's used total at decision time
    leased: int  # the budget's leases at decision time, without this request's
    limit: int


@dataclass(frozen=True)
class Level:
    """A budget as it stands: what finished requests cost, what requests in flight reserved."""

    used: int
    leased: int


class BudgetStore(Protocol):
    async def admit(
        self, request_id: str, leases: Sequence[Lease], ttl_s: float, now: float
    ) -> Admission:
        """All or nothing: take every lease (expiring at now + ttl_s), or none if one budget
        has no room. Expired leases of the budgets involved are dropped first. Taking a lease
        with an id that already holds one on that key replaces it."""
        ...

    async def settle(
        self, request_id: str, charges: Sequence[Charge], now: float
    ) -> Mapping[str, int] | None:
        """Drop this request's lease on each charge's key and add the cost to that budget's
        `used` (also when the lease already expired, or never existed). Once per request and
        budget: settling the same request id on a budget again within SETTLED_MEMORY_S changes
        nothing, so a settlement retried after a lost reply (applied or not) counts once.
        Returns the charged budgets' used totals just after, when the store holds the
        generation this client last restored (see `restore`), so a snapshot may take them;
        None when it does not (wiped and not restored yet, or never restored by this client)."""
        ...

    async def settle_many(
        self, settlements: Sequence[tuple[str, Sequence[Charge]]], now: float
    ) -> list[Mapping[str, int] | None]:
        """`settle` for each (request id, charges), in one round trip where the store has them:
        each applied as `settle` applies it, the answers in the same order. When it raises,
        any of them may have been applied (a retry counts once)."""
        ...

    async def renew(self, held: Mapping[str, Sequence[str]], ttl_s: float, now: float) -> int:
        """Keep leases alive: for each budget key, the leases of these request ids that are still
        held now expire at now + ttl_s (an expired or settled lease is not brought back). A
        process renews the leases of its requests in flight, so the leases of a process that
        died expire within one ttl. Returns how many leases were renewed."""
        ...

    async def used(self, keys: Sequence[str]) -> dict[str, int]:
        """The used totals (0 for unknown keys), for status, snapshots and tests."""
        ...

    async def levels(self, keys: Sequence[str], now: float) -> dict[str, Level]:
        """Each budget's used total and the sum of its live leases at `now` (expired leases are
        dropped first, as an admission would), zeros for unknown keys: what the gateway's
        budget gauges show. One round trip per `LEVELS_PER_READ` keys."""
        ...

    async def restore(self, used: Mapping[str, int]) -> int:
        """Durability: for each key whose used total is missing from the store, set it; keys the
        store already has are left alone. Returns how many keys were restored."""
        ...

    async def raise_to(self, used: Mapping[str, int]) -> int:
        """Rebuilding from the usage ledger: each key's used total becomes at least the given
        figure (a lower bound of the truth: what the ledger holds), never lower than it is.
        Returns how many keys were raised."""
        ...

    async def close(self) -> None: ...


# Imported after the names above: the implementations import them from here.
from arks.limits.budgets.memory import MemoryBudgets  # noqa: E402

__all__ = [
    "LEVELS_PER_READ",
    "SETTLED_MEMORY_S",
    "Admission",
    "BudgetStore",
    "Charge",
    "Lease",
    "Level",
    "MemoryBudgets",
]
