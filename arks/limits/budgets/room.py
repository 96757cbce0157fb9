"""The admission rule both budget stores apply, and the bounds that keep it exact (pure).

Redis scripts compute in Lua numbers (doubles), exact for integers up to 2**53. Limits, amounts,
costs and restored totals are therefore bounded by `MAX_AMOUNT` and never negative: then every
sum that could still fit a limit is exact, and a sum that overflows 2**53 rounds to a double
that is still above any limit, so `fits` decides the same in Lua as in Python. (Quota costs are
micro-units: 2**53 of them is about nine billion currency units.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from arks.limits.budgets import Admission, Charge, Lease

MAX_AMOUNT = 2**53 - 1

# What `admit` answers for no leases at all: nothing to check, nothing taken.
NOTHING_TO_ADMIT = Admission(admitted=True, key="", used=0, leased=0, limit=0)


def fits(used: int, leased: int, amount: int, limit: int) -> bool:
    """Whether a lease of `amount` has room; `leased` excludes the asking request's own lease."""
    return used + leased + amount <= limit


def merge_leases(leases: Iterable[Lease]) -> list[Lease]:
    """One lease per key, in order of first appearance.

    Two leases of one request on one key (two quota items that name the same budget) become one
    for their summed amount under the tighter limit, just as settling both charges adds both
    costs. Checking them one after the other instead would let the second replace the first.
    """
    merged: dict[str, Lease] = {}
    for lease in leases:
        prior = merged.get(lease.key)
        if prior is None:
            merged[lease.key] = lease
        else:
            merged[lease.key] = Lease(
                key=lease.key,
                limit=min(prior.limit, lease.limit),
                amount=prior.amount + lease.amount,
                expires_at=prior.expires_at if prior.expires_at is not None else lease.expires_at,
            )
    return list(merged.values())


def check_admit(leases: Sequence[Lease], ttl_s: float, now: float) -> None:
    """Raise ValueError unless these (merged) leases can be taken exactly; see the module doc."""
    _check_time("now", now)
    if not (math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"lease ttl_s must be a positive number of seconds, not {ttl_s!r}")
    for lease in leases:
        _check_amount(f"budget {lease.key!r}: limit", lease.limit)
        _check_amount(f"budget {lease.key!r}: lease amount", lease.amount)
        if lease.expires_at is not None:
            _check_time(f"budget {lease.key!r}: expires_at", lease.expires_at)


def check_settle(charges: Sequence[Charge], now: float) -> None:
    _check_time("now", now)
    for charge in charges:
        _check_amount(f"budget {charge.key!r}: cost", charge.cost)
        if charge.expires_at is not None:
            _check_time(f"budget {charge.key!r}: expires_at", charge.expires_at)


def check_restore(used: Mapping[str, int]) -> None:
    for key, value in used.items():
        _check_amount(f"budget {key!r}: used total to restore", value)


def _check_amount(what: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= MAX_AMOUNT:
        raise ValueError(f"{what} must be an integer in [0, 2**53 - 1], not {value!r}")


def _check_time(what: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite epoch seconds, not {value!r}")
