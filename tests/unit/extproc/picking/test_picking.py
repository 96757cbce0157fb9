"""Endpoint picking, pure: the datastore, filters, scorers and the picker (no sockets, no clock)."""

from __future__ import annotations

import random

import pytest

from arks.api import SocketAddress
from arks.engine_metrics import EngineLoad, ScrapeFailure
from extproc.picking.filters import Healthy, KvCacheRoom, QueueRoom
from extproc.picking.picker import Profile, pick
from extproc.picking.scorers import KvCacheScorer, PickRequest, PrefixScorer, QueueScorer
from extproc.picking.state import Datastore, EngineView, host

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
KEY = ("default", "qwen")


def load(waiting: float = 0, kv: float = 0.0, running: float = 0) -> EngineLoad:
    return EngineLoad("vllm", waiting=waiting, running=running, kv_cache_usage=kv)


def view(address: str, waiting: float = 0, kv: float = 0.0, **kw: int) -> EngineView:
    return EngineView(address, True, waiting, kv, **kw)


LEAST_LOAD = Profile(Healthy(), (KvCacheRoom(0.9),), ((QueueScorer(), 1.0), (KvCacheScorer(), 0.5)))


def hosts(
    engines: list[EngineView], request: PickRequest | None = None, profile: Profile = LEAST_LOAD
) -> tuple[str, ...]:
    return pick(engines, profile, request or PickRequest(), random.Random(7)).hosts


# --- state ------------------------------------------------------------------------------------


def test_hosts_are_spelled_as_envoy_names_them() -> None:
    assert host(SocketAddress("10.0.0.1", 8000)) == "10.0.0.1:8000"
    assert host(SocketAddress("fd00::1", 8000)) == "[fd00::1]:8000"


def test_datastore_shows_each_endpoints_engines_with_their_latest_load() -> None:
    store = Datastore()
    store.set_endpoints({KEY: [A, B], ("team", "llama"): [C]})
    store.observe({A: load(3, kv=0.5), B: ScrapeFailure("refused"), C: load(1)})

    a, b = store.engines(KEY)
    assert a == EngineView(A, scraped=True, waiting=3, kv_cache_usage=0.5)
    assert b == EngineView(B, scraped=False, failures=1)
    assert store.load(A) == load(3, kv=0.5) and store.load(B) is None
    assert store.engines(("default", "unknown")) == []


def test_a_failed_scrape_keeps_the_last_load_and_counts_failures() -> None:
    store = Datastore()
    store.set_endpoints({KEY: [A]})
    store.observe({A: load(3)})
    store.observe({A: ScrapeFailure("timeout")})
    store.observe({A: ScrapeFailure("timeout")})

    (a,) = store.engines(KEY)
    assert (a.scraped, a.waiting, a.failures) == (True, 3, 2)
    assert store.load(A) == load(3)
    store.observe({A: load(0)})
    assert store.engines(KEY)[0].failures == 0


def test_picks_count_as_unseen_until_the_next_scrape_and_in_flight_until_they_finish() -> None:
    store = Datastore()
    store.set_endpoints({KEY: [A]})
    store.observe({A: load(0)})
    store.picked("r1", A, now=0)
    store.picked("r2", A, now=0)
    assert (store.engines(KEY)[0].unseen, store.engines(KEY)[0].in_flight) == (2, 2)

    store.observe({A: load(2)})  # the scrape now shows them
    store.picked("r3", A, now=0)
    assert (store.engines(KEY)[0].unseen, store.engines(KEY)[0].in_flight) == (1, 3)

    assert store.finished("r1") is True  # picked before the scrape: only in flight drops
    assert store.finished("r3") is True
    assert store.finished("r3") is False  # once
    assert (store.engines(KEY)[0].unseen, store.engines(KEY)[0].in_flight) == (0, 1)


def test_picks_whose_access_log_entry_never_comes_expire() -> None:
    store = Datastore(max_pick_age_s=10)
    store.set_endpoints({KEY: [A]})
    store.picked("old", A, now=0)
    store.picked("new", A, now=8)

    assert store.expire(now=15) == 1
    assert len(store) == 1 and store.engines(KEY)[0].in_flight == 1


def test_engines_no_endpoint_names_are_forgotten_and_picks_on_them_are_harmless() -> None:
    store = Datastore()
    store.set_endpoints({KEY: [A, B]})
    store.picked("r1", B, now=0)
    store.set_endpoints({KEY: [A]})

    assert store.addresses() == [A]
    assert store.finished("r1") is True
    store.picked("r2", B, now=0)  # an engine that left the policy: not tracked
    assert len(store) == 0


# --- filters ----------------------------------------------------------------------------------


def test_healthy_drops_unscraped_and_failing_engines() -> None:
    never = EngineView(A)
    failing = view(B, failures=2)
    flaky = view(C, failures=1)

    assert Healthy(max_failures=2)([never, failing, flaky]) == [flaky]
    assert Healthy()([never]) == []  # strict: nothing left is nothing


def test_kv_cache_room_drops_full_engines_only_while_another_has_room() -> None:
    full, roomy = view(A, kv=0.95), view(B, kv=0.5)

    assert KvCacheRoom(0.9)([full, roomy]) == [roomy]
    assert KvCacheRoom(0.9)([full]) == [full]


def test_queue_room_drops_long_queues_only_while_another_engine_has_room() -> None:
    busy, burst, idle = view(A, waiting=8), view(B, waiting=2, unseen=20), view(C, waiting=7)

    assert QueueRoom(8)([busy, burst, idle]) == [burst, idle]  # our own quick picks do not count
    assert QueueRoom(8)([busy]) == [busy]


# --- scorers ----------------------------------------------------------------------------------


def test_queue_scorer_is_min_max_over_waiting_plus_unseen() -> None:
    engines = [view(A, waiting=0), view(B, waiting=5), view(C, waiting=6, unseen=4)]

    assert QueueScorer()(engines, PickRequest()) == [1.0, 0.5, 0.0]
    assert QueueScorer()([view(A, waiting=3), view(B, waiting=3)], PickRequest()) == [1.0, 1.0]


def test_a_load_the_engine_does_not_report_counts_as_idle() -> None:
    store = Datastore()
    store.set_endpoints({KEY: [A]})
    store.observe({A: EngineLoad("unknown")})  # e.g. no /metrics page

    assert store.engines(KEY) == [EngineView(A, scraped=True)]


def test_kv_cache_scorer_is_the_free_share() -> None:
    assert KvCacheScorer()([view(A, kv=0.25), EngineView(B)], PickRequest()) == [0.75, 1.0]


def test_prefix_scorer_is_the_share_of_blocks_held() -> None:
    request = PickRequest(blocks=4, matches={A: 4, B: 1})

    assert PrefixScorer()([view(A), view(B), view(C)], request) == [1.0, 0.25, 0.0]
    assert PrefixScorer()([view(A)], PickRequest()) == [0.0]


# --- picker -----------------------------------------------------------------------------------


def test_least_load_picks_the_shortest_queue_with_the_others_as_fallbacks_in_order() -> None:
    engines = [view(A, waiting=9), view(B, waiting=0), view(C, waiting=4)]

    assert hosts(engines) == (B, C, A)


def test_a_full_kv_cache_loses_to_a_longer_queue_but_stays_a_fallback() -> None:
    engines = [view(A, waiting=0, kv=0.97), view(B, waiting=3, kv=0.4)]

    assert hosts(engines) == (B, A)


def test_unhealthy_engines_are_neither_picked_nor_fallbacks() -> None:
    engines = [view(A, waiting=0, failures=3), view(B, waiting=5), EngineView(C)]

    assert hosts(engines) == (B,)


def test_no_eligible_engine_is_no_pick() -> None:
    ranked = pick([EngineView(A), view(B, failures=5)], LEAST_LOAD, PickRequest(), random.Random(1))

    assert ranked.hosts == () and ranked.scores == ()


def test_at_most_the_requested_number_of_fallbacks() -> None:
    engines = [view(f"10.0.0.{i}:80", waiting=i) for i in range(6)]

    ranked = pick(engines, LEAST_LOAD, PickRequest(), random.Random(1), fallbacks=2)

    assert ranked.hosts == ("10.0.0.0:80", "10.0.0.1:80", "10.0.0.2:80")
    assert list(ranked.scores) == sorted(ranked.scores, reverse=True)


def test_ties_are_broken_at_random_so_idle_engines_share_new_work() -> None:
    engines = [view(A), view(B), view(C)]
    rng = random.Random(3)

    firsts = {pick(engines, LEAST_LOAD, PickRequest(), rng).hosts[0] for _ in range(60)}

    assert firsts == {A, B, C}


PREFIX = Profile(
    Healthy(),
    (KvCacheRoom(0.9), QueueRoom(8)),
    ((PrefixScorer(), 4.0), (QueueScorer(), 1.0), (KvCacheScorer(), 0.5)),
)


def test_prefix_holder_wins_over_a_less_loaded_engine_while_it_has_room() -> None:
    engines = [view(A, waiting=5, kv=0.6), view(B, waiting=0), view(C, waiting=1)]

    assert hosts(engines, PickRequest(10, {A: 10}), PREFIX)[0] == A
    assert hosts(engines, PickRequest(10, {A: 3, C: 10}), PREFIX)[0] == C  # the longer prefix


def test_prefix_holder_without_room_loses_to_the_least_loaded() -> None:
    engines = [view(A, waiting=12), view(B, waiting=0), view(C, waiting=1)]

    assert hosts(engines, PickRequest(10, {A: 10}), PREFIX) == (B, C, A)


def test_without_a_held_prefix_prefix_picking_is_least_load() -> None:
    engines = [view(A, waiting=3), view(B, waiting=1), view(C, waiting=2)]

    assert hosts(engines, PickRequest(10, {}), PREFIX) == (B, C, A)


@pytest.mark.parametrize("waiting", [8, 50])
def test_when_every_engine_is_busy_the_prefix_holder_keeps_its_conversation(waiting: int) -> None:
    engines = [view(A, waiting=waiting + 5), view(B, waiting=waiting)]

    assert hosts(engines, PickRequest(4, {A: 4}), PREFIX)[0] == A


def test_scorer_and_filter_edges() -> None:
    # exactly at the threshold still has room
    at_edge, full = view(A, kv=0.9), view(B, kv=0.95)
    assert KvCacheRoom(0.9)([at_edge, full]) == [at_edge]
    # min-max never divides by the sum: queues 2 and 4 score 1 and 0, 3 is halfway
    assert QueueScorer()([view(A, 2), view(B, 3), view(C, 4)], PickRequest()) == [1.0, 0.5, 0.0]
    # a one-block prompt is scored; more matches than blocks still score at most 1
    one = PickRequest(blocks=1, matches={A: 1, B: 3})
    assert PrefixScorer()([view(A), view(B), view(C)], one) == [1.0, 1.0, 0.0]
