"""Load -> weights: the properties the gateway relies on, checked over many rounds."""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping

import pytest

from arks.engine_metrics import (
    EngineLoad,
    HistogramTotals,
    LoadWindow,
    Observation,
    ScrapeFailure,
)
from controller.load.weights import EndpointWeight, WeightSettings, WeightTracker, load_score

DOWN = ScrapeFailure("connection refused")


def busy(waiting: float = 0, running: float = 8, kv: float = 0.5) -> EngineLoad:
    return EngineLoad("vllm", waiting=waiting, running=running, kv_cache_usage=kv)


def settle(
    tracker: WeightTracker[str], loads: Mapping[str, Observation], rounds: int = 40
) -> dict[str, int]:
    weights: dict[str, int] = {}
    for _ in range(rounds):
        weights = tracker.update(loads)
    return weights


def test_equal_load_gives_equal_weights() -> None:
    for waiting in (0, 1, 5, 40, 500):
        weights = settle(WeightTracker(), {k: busy(waiting) for k in "abc"})
        assert set(weights.values()) == {100}, waiting


def test_a_longer_queue_never_gets_a_higher_weight() -> None:
    settings = WeightSettings()
    previous = settings.max_weight + 1
    for waiting in range(0, 200, 3):
        weights = settle(WeightTracker(settings), {"ref": busy(0), "x": busy(waiting)})
        assert weights["ref"] == settings.max_weight
        assert weights["x"] <= previous, waiting
        previous = weights["x"]
    assert previous < 10  # and a long enough queue drives it near the floor


def test_weights_stay_within_bounds() -> None:
    settings = WeightSettings(min_weight=5, max_weight=50)
    rng = random.Random(7)
    tracker: WeightTracker[str] = WeightTracker(settings)
    for _ in range(300):
        loads = {
            k: busy(rng.choice((0, 1, 10, 1000, 10**6)), rng.randint(0, 500), rng.random())
            for k in "abcd"
        }
        for weight in tracker.update(loads).values():
            assert settings.min_weight <= weight <= settings.max_weight


def test_failing_engine_is_drained_after_n_failures_and_returns_gradually() -> None:
    settings = WeightSettings(failures_to_drain=3, recovery_steps=5)
    tracker: WeightTracker[str] = WeightTracker(settings)
    settle(tracker, {"a": busy(2), "b": busy(2)})
    for n in range(1, 3):  # fewer than N failures: still in rotation
        weights = tracker.update({"a": busy(2), "b": DOWN})
        assert weights["b"] > 0, n
        assert tracker.state()["b"].consecutive_failures == n
    assert tracker.update({"a": busy(2), "b": DOWN})["b"] == 0
    assert tracker.state()["b"].drained
    assert tracker.update({"a": busy(2), "b": DOWN})["b"] == 0  # stays drained
    ramp = [tracker.update({"a": busy(2), "b": busy(2)})["b"] for _ in range(8)]
    assert ramp[0] == 20  # first healthy round: capped at max_weight / recovery_steps
    assert ramp == sorted(ramp), ramp  # comes back monotonically ...
    assert ramp[3] < 100 and ramp[-1] == 100  # ... over recovery_steps rounds, not at once
    assert not tracker.state()["b"].drained


def test_a_single_failure_between_successes_does_not_drain() -> None:
    tracker: WeightTracker[str] = WeightTracker(WeightSettings(failures_to_drain=2))
    for i in range(50):
        weights = tracker.update({"a": busy(1), "b": DOWN if i % 2 else busy(1)})
        assert weights["b"] > 0


def test_all_engines_failing_are_all_drained() -> None:
    tracker: WeightTracker[str] = WeightTracker(WeightSettings(failures_to_drain=2))
    settle(tracker, {"a": busy(1), "b": busy(3)})
    weights = settle(tracker, {"a": DOWN, "b": DOWN}, rounds=2)
    assert weights == {"a": 0, "b": 0}


def test_no_flapping_under_steady_noisy_load() -> None:
    """±1 waiting of noise per round: after convergence, 200 rounds publish no change."""
    scenarios = [
        ({"a": 2, "b": 4, "c": 8}, 8, 0.5),
        ({"a": 0, "b": 1, "c": 2}, 8, 0.5),
        ({"a": 1, "b": 1, "c": 1}, 8, 0.5),
        ({"a": 3, "b": 3, "c": 12}, 16, 0.7),
        ({"a": 0, "b": 0, "c": 0}, 0, 0.0),
        ({"a": 10, "b": 20, "c": 40}, 32, 0.9),
    ]
    for seed in range(20):
        for base, running, kv in scenarios:
            rng = random.Random(seed)
            tracker: WeightTracker[str] = WeightTracker()
            history = []
            for _ in range(40 + 200):
                noisy = {
                    k: busy(max(0, w + rng.choice((-1, 0, 1))), running, kv)
                    for k, w in base.items()
                }
                history.append(tracker.update(noisy))
            steady = history[40:]
            changes = sum(1 for before, after in itertools.pairwise(steady) if before != after)
            assert changes == 0, (seed, base, changes)


def test_steady_noise_keeps_the_ordering_of_loads() -> None:
    rng = random.Random(3)
    tracker: WeightTracker[str] = WeightTracker()
    base = {"a": 2, "b": 10, "c": 30}
    for _ in range(100):
        weights = tracker.update({k: busy(w + rng.choice((-1, 0, 1))) for k, w in base.items()})
    assert weights["a"] == 100 > weights["b"] > weights["c"]


def test_a_step_change_in_load_converges_within_k_rounds() -> None:
    tracker: WeightTracker[str] = WeightTracker()
    settle(tracker, {k: busy(2) for k in "abc"})
    after = {"a": busy(2), "b": busy(2), "c": busy(12)}
    target = settle(WeightTracker(), after, rounds=60)["c"]  # where a fresh tracker settles
    history = [tracker.update(after)["c"] for _ in range(30)]
    k = 12
    assert abs(history[k - 1] - target) <= 3, history
    assert history[k - 1 :] == [history[-1]] * (len(history) - k + 1), history  # and stays
    assert history[5] < 60  # most of the way there within a few rounds
    assert history[-1] < 100


def test_new_endpoint_starts_at_the_fleets_weight_not_at_max() -> None:
    tracker: WeightTracker[str] = WeightTracker()
    settle(tracker, {"a": busy(10), "b": busy(10)})
    # a fresh engine with no load joins: it starts where the fleet is and climbs, no stampede
    joined = [tracker.update({"a": busy(10), "b": busy(10), "new": busy(0)}) for _ in range(30)]
    first, last = joined[0], joined[-1]
    assert first["new"] == 100 and first["a"] >= 70  # it does not take everything at once
    ideal = round(100 * (1 + 1.8) / (1 + 6.8))  # scores: idle 1.8 (running, kv), busy 6.8
    assert last["new"] == 100 and abs(last["a"] - ideal) <= 5  # then its idleness shows
    shares = [w["a"] for w in joined]
    assert shares == sorted(shares, reverse=True), shares


def test_first_endpoint_alone_gets_max_weight() -> None:
    assert WeightTracker[str]().update({"a": busy(30)}) == {"a": 100}
    assert WeightTracker[str]().update({"a": DOWN}) == {"a": 100}  # unknown yet, not drained yet


def test_endpoints_missing_from_an_update_are_forgotten() -> None:
    tracker: WeightTracker[str] = WeightTracker()
    settle(tracker, {"a": busy(0), "b": busy(20)})
    assert tracker.update({"b": busy(20)}) == {"b": 100}
    assert set(tracker.state()) == {"b"}


def test_errors_and_latency_lower_the_weight() -> None:
    def with_counters(requests: float, errors: float, ttft_sum: float) -> EngineLoad:
        return EngineLoad(
            "vllm",
            waiting=0,
            running=4,
            kv_cache_usage=0.2,
            requests_total=requests,
            errors_total=errors,
            ttft=HistogramTotals(ttft_sum, requests),
        )

    tracker: WeightTracker[str] = WeightTracker()
    weights: dict[str, int] = {}
    for i in range(40):
        n = 10.0 * i
        weights = tracker.update(
            {
                "fine": with_counters(n, 0, n * 0.05),
                "erroring": with_counters(n, n * 0.5, n * 0.05),
                "slow": with_counters(n, 0, n * 4.0),
            }
        )
    assert weights["fine"] == 100
    assert weights["erroring"] < 40 and weights["slow"] < 60


def test_load_score_formula() -> None:
    s = WeightSettings()
    recent = LoadWindow(finished=10, error_ratio=0.1, mean_ttft_s=2.0, mean_e2e_s=9.0)
    score = load_score(busy(4, 10, 0.5), recent, s)
    assert score == pytest.approx(0.5 * 4 + 0.1 * 10 + 2.0 * 0.5 + 10.0 * 0.1 + 0.5 * 2.0)
    assert load_score(EngineLoad("unknown"), LoadWindow(None, None, None, None), s) == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"min_weight": 0},
        {"min_weight": 10, "max_weight": 5},
        {"smoothing": 0},
        {"smoothing": 1.5},
        {"hysteresis_rel": -0.1},
        {"failures_to_drain": 0},
        {"waiting_cost": -1},
    ],
)
def test_settings_reject_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="WeightSettings"):
        WeightSettings(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("noise", [False, True])
def test_an_engine_whose_long_queue_empties_gets_its_full_weight_back(noise: bool) -> None:
    """The dead band must not freeze the weight where the EWMA was when it noticed the move."""
    rng = random.Random(7)
    tracker: WeightTracker[str] = WeightTracker()

    def idle() -> EngineLoad:
        return busy(waiting=rng.choice((0, 1)) if noise else 0, running=0, kv=0.0)

    for _ in range(20):
        tracker.update({"a": idle(), "b": busy(waiting=30, running=0, kv=0.0)})
    weights: Mapping[str, int] = {}
    for _ in range(60):
        weights = tracker.update({"a": idle(), "b": idle()})
    if noise:
        # Inside the dead band a noisy idle queue (0 or 1 waiting) is indistinguishable from
        # a slightly busy one: the weight settles within the band's steady error.
        assert weights["a"] >= 60 and weights["b"] >= 60, weights
    else:
        assert weights["a"] >= 90 and weights["b"] >= 90, weights


@pytest.mark.parametrize(
    "bad",
    [
        {"hysteresis_abs": -1},
        {"deadband_abs": -0.5},
        {"deadband_rel": -0.1},
        {"recovery_steps": 0},
        {"ttft_cost": -1},
        {"e2e_cost": -1},
    ],
)
def test_settings_reject_each_negative_band_count_and_cost(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="WeightSettings"):
        WeightSettings(**bad)  # type: ignore[arg-type]


def test_settings_accept_their_edge_values() -> None:
    edge = WeightSettings(
        min_weight=7,
        max_weight=7,
        smoothing=1.0,
        hysteresis_abs=0,
        hysteresis_rel=0.0,
        deadband_abs=0.0,
        deadband_rel=0.0,
        failures_to_drain=1,
        recovery_steps=1,
        waiting_cost=0.0,
        running_cost=0.0,
        kv_cost=0.0,
        error_cost=0.0,
        ttft_cost=0.0,
        e2e_cost=0.0,
    )
    assert WeightTracker[str](edge).update({"a": busy(3), "b": busy(0)}) == {"a": 7, "b": 7}


def test_load_score_adds_end_to_end_latency_and_treats_unknowns_as_zero() -> None:
    s = WeightSettings(waiting_cost=0, running_cost=0, kv_cost=0, ttft_cost=0.5, e2e_cost=0.25)
    idle = EngineLoad("vllm")
    assert load_score(idle, LoadWindow(10, None, None, 8.0), s) == 2.0
    assert load_score(idle, LoadWindow(10, None, 3.0, 8.0), s) == 1.5 + 2.0
    assert load_score(idle, LoadWindow(10, None, 3.0, None), s) == 1.5


def only_queues(**overrides: float) -> WeightSettings:
    """Score = waiting; the EWMA and the dead band off, so only the hysteresis holds weights."""
    base: dict[str, float] = dict(
        smoothing=1.0,
        deadband_abs=0.0,
        deadband_rel=0.0,
        running_cost=0.0,
        kv_cost=0.0,
        ttft_cost=0.0,
        waiting_cost=1.0,
    )
    return WeightSettings(**(base | overrides))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "settings",
    [only_queues(hysteresis_abs=2, hysteresis_rel=0.0), only_queues(hysteresis_abs=0)],
    ids=["absolute band 2", "relative band 5% of 50"],
)
def test_published_weights_move_only_beyond_the_hysteresis(settings: WeightSettings) -> None:
    tracker: WeightTracker[str] = WeightTracker(settings)

    def publish(waiting: float) -> int:
        # a's idle queue is the best capacity: b's target is round(100 / (1 + waiting))
        return tracker.update({"a": busy(0), "b": busy(waiting)})["b"]

    assert [publish(1.0) for _ in range(6)][-1] == 50
    assert publish(100 / 52 - 1) == 50  # target 52: within the band, held
    assert publish(100 / 48 - 1) == 50  # target 48: likewise below
    assert publish(100 / 53 - 1) == 53  # target 53: beyond it, published
    assert publish(100 / 51 - 1) == 53  # and held again around the new weight


def test_a_drained_engine_comes_back_in_equal_steps() -> None:
    tracker: WeightTracker[str] = WeightTracker(WeightSettings(failures_to_drain=1))
    settle(tracker, {"a": busy(2), "b": busy(2)})
    tracker.update({"a": busy(2), "b": DOWN})
    ramp = [tracker.update({"a": busy(2), "b": busy(2)})["b"] for _ in range(7)]
    assert ramp == [20, 40, 60, 80, 100, 100, 100]


def test_state_reports_a_drained_engine_at_weight_zero_with_its_last_score() -> None:
    tracker: WeightTracker[str] = WeightTracker(WeightSettings(failures_to_drain=1, smoothing=1.0))
    tracker.update({"a": busy(2, running=0, kv=0.0)})
    assert tracker.state()["a"] == EndpointWeight(100, 1.0, 0, False)  # 0.5 per queued request
    tracker.update({"a": DOWN})
    assert tracker.state()["a"] == EndpointWeight(0, 1.0, 1, True)


def test_an_endpoint_first_seen_failing_starts_at_the_fleets_weight() -> None:
    tracker: WeightTracker[str] = WeightTracker()
    settle(tracker, {"a": busy(0), "b": busy(10)})
    fleet = tracker.update({"a": busy(0), "b": busy(10)})
    joined = tracker.update({"a": busy(0), "b": busy(10), "c": DOWN})
    # the fleet's mean score: between a's and b's weight, not the maximum of an unknown
    assert fleet["b"] < joined["c"] < fleet["a"]


def test_after_its_ramp_a_returned_engine_is_held_by_the_hysteresis_again() -> None:
    tracker: WeightTracker[str] = WeightTracker(
        only_queues(failures_to_drain=1, recovery_steps=2, hysteresis_abs=2, hysteresis_rel=0.0)
    )
    settle(tracker, {"a": busy(0), "b": busy(1.0)}, rounds=6)
    tracker.update({"a": busy(0), "b": DOWN})
    assert tracker.update({"a": busy(0), "b": busy(1.0)})["b"] == 50  # ramp step 1 of 2: cap 50
    assert tracker.update({"a": busy(0), "b": busy(100 / 52 - 1)})["b"] == 50  # ramped: held


def test_the_dead_band_holds_the_score_after_warming_up_and_after_each_move() -> None:
    """Score = waiting, no EWMA: the held score follows for 3 rounds, then moves only by more
    than the dead band (2), and follows again for 3 rounds after each move."""
    tracker: WeightTracker[str] = WeightTracker(
        only_queues(deadband_abs=2.0, hysteresis_abs=0, hysteresis_rel=0.0)
    )
    waits = [1, 1, 3, 1, 0.5, 0.5, 0.5, 2, 0.5]
    published = [tracker.update({"a": busy(0), "b": busy(w)})["b"] for w in waits]
    assert published == [50, 50, 25, 25, 67, 67, 67, 33, 33]
    #                    warming up ^  held  moved  following   ^ held: within the band of 2


def test_when_one_endpoint_moves_every_weight_is_recomputed_from_fresh_scores() -> None:
    tracker: WeightTracker[str] = WeightTracker(
        only_queues(deadband_abs=2.0, hysteresis_abs=0, hysteresis_rel=0.0)
    )
    settle(tracker, {"z": busy(0), "a": busy(1), "b": busy(1)}, rounds=5)
    weights = tracker.update({"z": busy(0), "a": busy(2), "b": busy(5)})
    # b's move also brings in a's drift, which alone stayed inside the dead band
    assert (weights["a"], weights["b"]) == (33, 17)


def test_an_engine_back_from_a_drain_restarts_from_the_live_fleets_mean_score() -> None:
    tracker: WeightTracker[str] = WeightTracker(WeightSettings(failures_to_drain=1))
    settle(tracker, {"a": busy(10), "b": busy(0), "c": busy(30)})
    tracker.update({"a": busy(10), "b": DOWN, "c": DOWN})
    fleet = tracker.state()["a"].score
    assert fleet is not None
    tracker.update({"a": busy(10), "b": busy(0), "c": DOWN})
    raw = load_score(busy(0), LoadWindow(None, None, None, None), WeightSettings())
    assert tracker.state()["b"].score == pytest.approx(0.3 * raw + 0.7 * fleet)


def test_the_hysteresis_holds_the_smallest_weight_too() -> None:
    tracker: WeightTracker[str] = WeightTracker(only_queues(hysteresis_abs=2, hysteresis_rel=0.0))
    assert settle(tracker, {"a": busy(0), "b": busy(99)}, rounds=6)["b"] == 1
    assert tracker.update({"a": busy(0), "b": busy(49)})["b"] == 1  # target 2: within the band


def test_an_engine_back_from_a_drain_warms_up_again_before_the_dead_band_holds_it() -> None:
    tracker: WeightTracker[str] = WeightTracker(
        only_queues(
            failures_to_drain=1,
            recovery_steps=1,
            deadband_abs=2.0,
            hysteresis_abs=0,
            hysteresis_rel=0.0,
        )
    )
    settle(tracker, {"a": busy(0), "b": busy(1)}, rounds=6)
    tracker.update({"a": busy(0), "b": DOWN})
    back = [tracker.update({"a": busy(0), "b": busy(w)})["b"] for w in (1, 1, 3, 1)]
    assert back == [50, 50, 25, 25]  # three rounds follow the load, then the band holds


def test_a_joining_engines_warm_up_is_no_move_of_the_others() -> None:
    tracker: WeightTracker[str] = WeightTracker(
        only_queues(deadband_abs=2.0, hysteresis_abs=0, hysteresis_rel=0.0)
    )
    settle(tracker, {"z": busy(0), "a": busy(1)}, rounds=5)
    weights = tracker.update({"z": busy(0), "a": busy(2), "new": busy(1)})
    assert weights["a"] == 50  # a's drift stays inside its dead band


def test_settling_follows_the_ewma_until_the_noise_crosses_it() -> None:
    """Smoothing 0.5: six rounds of warm-up, then the held score follows the EWMA until the load
    crosses it (raw - smoothed changes sign), after which the dead band (10) holds it."""
    tracker: WeightTracker[str] = WeightTracker(
        only_queues(smoothing=0.5, deadband_abs=10.0, hysteresis_abs=0, hysteresis_rel=0.0)
    )
    steady = {"a": busy(0), "b": busy(4), "c": busy(4), "d": busy(4)}
    assert settle(tracker, steady, rounds=6) == {"a": 100, "b": 20, "c": 20, "d": 20}
    # one more round: the EWMA trails the load (gaps -0.3, +1.0, +0.3): still followed
    # (held 3.7, 5, 4.3)
    first = tracker.update({"a": busy(0), "b": busy(3.4), "c": busy(6), "d": busy(4.6)})
    assert first == {"a": 100, "b": 21, "c": 17, "d": 19}
    # the load crosses the EWMA (gaps +0.45, -1.0, -0.45): settled, held where it was
    crossed = tracker.update({"a": busy(0), "b": busy(4.6), "c": busy(3), "d": busy(3.4)})
    assert crossed == first
