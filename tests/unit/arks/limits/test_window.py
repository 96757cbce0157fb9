"""The counter arithmetic with plain numbers: fixed windows (envoyproxy rules) and GCRA."""

from __future__ import annotations

import math

import pytest

from arks.limits.model import Algorithm, Hit, Outcome
from arks.limits.window import (
    CELL_SLACK,
    Instant,
    counter_key,
    fixed_window_key,
    fixed_window_outcome,
    fixed_window_start,
    gcra_ahead,
    gcra_charge,
    gcra_outcome,
    gcra_step,
    gcra_ttl_s,
    validate,
)

EPOCH = 1_700_000_040.0  # a multiple of 60 and of 10, at today's magnitude


def fixed(limit: int, hits: int = 1, window_s: int = 60) -> Hit:
    return Hit(key="k", limit=limit, window_s=window_s, hits=hits, algorithm=Algorithm.FIXED_WINDOW)


def gcra(limit: int, hits: int = 1, window_s: int = 10) -> Hit:
    return Hit(key="k", limit=limit, window_s=window_s, hits=hits, algorithm=Algorithm.GCRA)


class Gcra:
    """A single GCRA counter driven through `gcra_step`, as the memory backend drives it."""

    def __init__(self) -> None:
        self.tat: Instant | None = None
        self.writes = 0

    def __call__(self, hit: Hit, now: float) -> Outcome:
        step = gcra_step(self.tat, now, hit)
        if step.tat is not None:
            self.tat = step.tat
            self.writes += 1
        return step.outcome


# Fixed window -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "start"),
    [
        (120.0, 120),
        (179.999, 120),
        (180.0, 180),
        (EPOCH + 59.5, EPOCH),
        (EPOCH - 0.001, EPOCH - 60),
    ],
)
def test_fixed_window_starts_at_aligned_multiples(now: float, start: float) -> None:
    assert fixed_window_start(now, 60) == start


def test_fixed_window_key_is_envoyproxy_style() -> None:
    assert fixed_window_key("domain_user_alice", 60, 130.5) == "domain_user_alice_120"
    assert counter_key(fixed(5), 130.5) == "k_120"


def test_fixed_window_request_reaching_the_limit_exactly_passes() -> None:
    assert fixed_window_outcome(10, fixed(10), 130.0) == Outcome(
        over_limit=False, remaining=0, reset_s=50.0, used=10
    )


def test_fixed_window_request_beyond_the_limit_is_over() -> None:
    outcome = fixed_window_outcome(11, fixed(10), 130.0)
    assert outcome.over_limit
    assert outcome.remaining == 0  # never negative
    assert outcome.used == 11


def test_fixed_window_reset_is_the_time_to_the_window_end() -> None:
    assert fixed_window_outcome(1, fixed(10), 179.75).reset_s == pytest.approx(0.25)
    assert fixed_window_outcome(1, fixed(10), 180.0).reset_s == 60.0


def test_fixed_window_read_uses_the_same_rule() -> None:
    assert not fixed_window_outcome(10, fixed(10, hits=0), 130.0).over_limit
    assert fixed_window_outcome(11, fixed(10, hits=0), 130.0).over_limit


def test_fixed_window_limit_zero_rejects_every_counted_request() -> None:
    outcome = fixed_window_outcome(1, fixed(0), 130.0)
    assert outcome.over_limit
    assert outcome.remaining == 0


def test_fixed_window_large_cost() -> None:
    outcome = fixed_window_outcome(10**12, fixed(10**6, hits=10**12), 130.0)
    assert outcome.over_limit
    assert outcome.used == 10**12


# GCRA -------------------------------------------------------------------------------------------


def test_gcra_key_has_its_own_suffix() -> None:
    assert counter_key(gcra(5), 130.5) == "k_gcra"


def test_gcra_charge_from_empty_state() -> None:
    # T = 1 s: three units push the TAT three seconds ahead.
    h = gcra(10, hits=3)
    outcome = gcra_outcome(gcra_charge(gcra_ahead(None, Instant.of(100.0)), h), h)
    assert outcome == Outcome(over_limit=False, remaining=7, reset_s=3.0, used=3)


def test_gcra_past_tat_counts_as_now() -> None:
    assert gcra_ahead(Instant.of(90.0), Instant.of(100.0)) == 0.0
    assert gcra_ahead(Instant.of(104.5), Instant.of(100.0)) == 4.5


def test_gcra_full_burst_passes_and_one_more_is_over() -> None:
    counter = Gcra()
    outcomes = [counter(gcra(10), 100.0) for _ in range(11)]
    assert [o.over_limit for o in outcomes] == [False] * 10 + [True]
    assert outcomes[9] == Outcome(over_limit=False, remaining=0, reset_s=10.0, used=10)


@pytest.mark.parametrize(
    ("limit", "window_s"), [(3, 2), (7, 1), (10, 1), (1000, 60), (3000, 1), (100_000, 3600)]
)
def test_gcra_exact_limit_burst_passes_at_epoch_magnitudes(limit: int, window_s: int) -> None:
    # Emission intervals such as 2/3 s or 0.1 s are inexact in binary, and a float epoch time
    # keeps only ~0.2 µs: the limit-th unit must still fit, the next must not.
    counter = Gcra()
    now = EPOCH + 0.123456
    outcomes = [counter(gcra(limit, window_s=window_s), now) for _ in range(limit + 1)]
    assert not any(o.over_limit for o in outcomes[:limit])
    assert [o.remaining for o in outcomes[-3:-1]] == [1, 0]
    assert outcomes[limit].over_limit


def test_gcra_spreads_instead_of_bursting_at_the_window_edge() -> None:
    counter = Gcra()
    for _ in range(10):
        assert not counter(gcra(10), 100.0).over_limit
    assert not counter(gcra(10), 101.0).over_limit  # one interval later: room for one
    assert counter(gcra(10), 101.0).over_limit


def test_gcra_over_limit_is_still_charged() -> None:
    counter = Gcra()
    for _ in range(10):
        counter(gcra(10), 100.0)
    counter(gcra(10), 100.0)  # over, yet charged: the TAT is now 11 s ahead
    assert counter.tat == Instant.of(111.0)


def test_gcra_debt_from_a_large_cost_blocks_until_repaid() -> None:
    counter = Gcra()
    first = counter(gcra(10, hits=30), 100.0)
    # Charged in full: 30 s ahead, 20 s beyond the tolerance; one unit fits after 21 s.
    assert first == Outcome(over_limit=True, remaining=0, reset_s=21.0, used=10)
    assert counter(gcra(10, hits=0), 120.5).over_limit
    assert counter.writes == 1  # reads never store
    assert not counter(gcra(10, hits=0), 121.0).over_limit
    assert not counter(gcra(10), 121.0).over_limit
    assert counter(gcra(10), 121.0).over_limit


def test_gcra_reset_after_over_limit_is_when_one_unit_fits() -> None:
    counter = Gcra()
    for _ in range(12):
        last = counter(gcra(10), 100.0)
    assert last.over_limit
    assert last.reset_s == pytest.approx(3.0)  # TAT 12 s ahead: 12 - 10 + 1
    assert counter(gcra(10, hits=0), 100.0 + last.reset_s - 0.01).over_limit
    assert not counter(gcra(10, hits=0), 100.0 + last.reset_s).over_limit


def test_gcra_read_asks_whether_one_more_unit_fits() -> None:
    assert not gcra_outcome(9.0, gcra(10, hits=0)).over_limit  # 9 s ahead, 1 s interval: fits
    assert gcra_outcome(9.5, gcra(10, hits=0)).over_limit
    read = gcra_outcome(9.5, gcra(10, hits=0))
    assert read.reset_s == pytest.approx(0.5)
    assert read.remaining == 0


def test_gcra_read_stores_nothing() -> None:
    step = gcra_step(None, 100.0, gcra(10, hits=0))
    assert step.tat is None
    assert step.outcome == Outcome(over_limit=False, remaining=10, reset_s=0.0, used=0)


def test_gcra_limit_zero_rejects_everything_without_dividing() -> None:
    for hits in (0, 1, 50):
        step = gcra_step(None, 100.0, gcra(0, hits=hits))
        assert step.outcome.over_limit
        assert step.outcome.remaining == 0
        assert step.tat is None


def test_gcra_limit_zero_answers_a_full_window_to_wait_and_nothing_used() -> None:
    assert gcra_outcome(0.0, gcra(0, hits=3, window_s=10)) == Outcome(
        over_limit=True, remaining=0, reset_s=10.0, used=0
    )


def test_gcra_a_limit_of_one_stores_its_tat() -> None:
    step = gcra_step(None, 100.0, gcra(1, hits=1))
    assert step.tat == Instant.of(110.0)


def test_gcra_a_tat_exactly_at_the_tolerance_edge_still_fits() -> None:
    """The edge is the window plus the slack; landing exactly on it is within the limit."""
    one_per_second = gcra(1, window_s=1)
    edge = 1.0 + 1.0 * CELL_SLACK
    assert not gcra_outcome(edge, one_per_second).over_limit  # charged: TAT on the edge
    read = gcra(1, hits=0, window_s=1)
    assert not gcra_outcome(edge - 1.0, read).over_limit  # would one more land on the edge?


def test_gcra_large_cost() -> None:
    step = gcra_step(None, EPOCH, gcra(100, hits=10**9, window_s=60))
    ahead = 10**9 * 0.6
    assert step.outcome.over_limit
    assert step.outcome.reset_s == pytest.approx(ahead - 60 + 0.6)
    assert step.ttl_s == math.ceil(ahead) + 1


def test_gcra_key_lives_until_the_tat_has_passed() -> None:
    assert gcra_ttl_s(0.0) == 1
    assert gcra_ttl_s(3.0) == 4
    assert gcra_ttl_s(3.2) == 5


def test_instant_keeps_sub_microsecond_offsets_at_epoch_magnitudes() -> None:
    now = Instant.of(EPOCH + 0.7)
    later = now.plus(1e-9)
    assert later.offset_from(now) == pytest.approx(1e-9, rel=1e-6)
    assert now.plus(0.5).seconds == int(EPOCH) + 1  # carries into the whole seconds
    assert 0.0 <= now.plus(0.5).fraction < 1.0


# Validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hit",
    [fixed(10, hits=-1), fixed(-1), fixed(10, window_s=0), gcra(10, window_s=-5)],
)
def test_impossible_hits_are_rejected(hit: Hit) -> None:
    with pytest.raises(ValueError, match="k"):
        validate(hit)


@pytest.mark.parametrize(
    "hit",
    [fixed(0), fixed(10, window_s=1), gcra(0, window_s=1), fixed(10, hits=0)],
    ids=["limit 0", "1-second window", "gcra limit 0 per second", "a read"],
)
def test_edge_values_are_valid_hits(hit: Hit) -> None:
    validate(hit)  # no error: a 1-second window and a limit of 0 are real configurations
    assert fixed_window_outcome(hit.hits, hit, EPOCH).over_limit == (hit.hits > hit.limit)
