"""The budget admission rule and its bounds, without a store."""

from __future__ import annotations

import math
import random

import pytest

from arks.limits.budgets import Charge, Lease
from arks.limits.budgets.room import (
    MAX_AMOUNT,
    check_admit,
    check_restore,
    check_settle,
    fits,
    merge_leases,
)


def test_fits_up_to_and_including_the_limit() -> None:
    assert fits(used=3, leased=4, amount=3, limit=10)
    assert not fits(used=3, leased=4, amount=4, limit=10)
    assert fits(used=0, leased=0, amount=0, limit=0)
    assert not fits(used=11, leased=0, amount=0, limit=10)  # settled past the limit: full


def test_fits_decides_the_same_in_doubles_within_the_bounds() -> None:
    """What makes the Lua check exact: operands in [0, 2**53 - 1], sums may overflow 2**53."""
    rng = random.Random(53)
    near = [0, 1, 2, MAX_AMOUNT // 2, MAX_AMOUNT - 2, MAX_AMOUNT - 1, MAX_AMOUNT]

    def pick() -> int:
        if rng.random() < 0.3:
            return rng.randint(0, MAX_AMOUNT)
        return min(max(rng.choice(near) + rng.randint(-2, 2), 0), MAX_AMOUNT)

    for _ in range(20_000):
        used, leased, amount, limit = pick(), pick(), pick(), pick()
        in_doubles = float(used) + float(leased) + float(amount) <= float(limit)
        assert in_doubles == fits(used, leased, amount, limit), (used, leased, amount, limit)


def test_merge_keeps_one_lease_per_key_in_first_order() -> None:
    merged = merge_leases(
        [
            Lease("a", limit=10, amount=2),
            Lease("b", limit=5, amount=1, expires_at=100.0),
            Lease("a", limit=8, amount=3, expires_at=50.0),
        ]
    )
    assert merged == [
        Lease("a", limit=8, amount=5, expires_at=50.0),
        Lease("b", limit=5, amount=1, expires_at=100.0),
    ]
    assert merge_leases([]) == []


@pytest.mark.parametrize(
    ("leases", "ttl_s", "now", "names"),
    [
        ([Lease("q", 10, -1)], 60.0, 0.0, "'q': lease amount"),
        ([Lease("q", MAX_AMOUNT + 1, 1)], 60.0, 0.0, "'q': limit"),
        ([Lease("q", 10, 1.5)], 60.0, 0.0, "'q': lease amount"),  # type: ignore[arg-type]
        ([Lease("q", 10, 1, math.inf)], 60.0, 0.0, "'q': expires_at"),
        ([Lease("q", 10, 1)], 0.0, 0.0, "ttl_s"),
        ([Lease("q", 10, 1)], math.nan, 0.0, "ttl_s"),
        ([], 60.0, math.nan, "now"),
    ],
)
def test_admit_rejects_what_it_cannot_take_exactly(
    leases: list[Lease], ttl_s: float, now: float, names: str
) -> None:
    with pytest.raises(ValueError, match=names):
        check_admit(leases, ttl_s, now)


def test_settle_and_restore_reject_negative_or_inexact_figures() -> None:
    check_settle([Charge("q", 0), Charge("q", MAX_AMOUNT)], 0.0)
    with pytest.raises(ValueError, match="'q': cost"):
        check_settle([Charge("q", -5)], 0.0)
    check_restore({"q": MAX_AMOUNT, "z": 0})
    with pytest.raises(ValueError, match="'q': used total"):
        check_restore({"q": 2**53})


def test_merged_leases_keep_the_first_known_expiry() -> None:
    (merged,) = merge_leases([Lease("b", 10, 1, 100.0), Lease("b", 10, 1, 200.0)])
    assert merged.expires_at == 100.0
    (merged,) = merge_leases([Lease("b", 10, 1, None), Lease("b", 10, 1, 200.0)])
    assert merged.expires_at == 200.0


def test_time_errors_say_which_time() -> None:
    with pytest.raises(ValueError, match=r"^now must be finite epoch seconds, not nan$"):
        check_admit([], 60.0, math.nan)
    with pytest.raises(ValueError, match=r"^now must be finite epoch seconds, not inf$"):
        check_settle([], math.inf)
    with pytest.raises(ValueError, match=r"^budget 'b': expires_at must be finite"):
        check_settle([Charge("b", 1, math.inf)], 0.0)
