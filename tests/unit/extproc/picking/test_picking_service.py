"""What the servicer asks of picking: a destination per request, its reason counted, fail open or
closed, and the pick written the Gateway API Inference Extension way."""

from __future__ import annotations

import random

from arks.api import LEAST_LOAD, PREFIX_CACHE
from arks.engine_metrics import EngineLoad, ScrapeFailure
from extproc.decision import Deny, Identity
from extproc.metrics import GatewayMetrics
from extproc.picking.prefix import prefix_text
from extproc.picking.service import Destination, Picking, PickSettings

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
QWEN = Identity("default", "alice", "qwen")
SYSTEM = "Answer as a pirate would, in full sentences. " * 30


def picking(fail_closed: bool = False, **loads: float) -> Picking:
    p = Picking(
        PickSettings(fail_closed=fail_closed),
        GatewayMetrics.create(),
        clock=lambda: 0.0,
        rng=random.Random(5),
    )
    p.store.set_endpoints({("default", "qwen"): [A, B, C]})
    p.store.observe(
        {
            A: EngineLoad("vllm", waiting=loads.get("a", 0)),
            B: EngineLoad("vllm", waiting=loads.get("b", 0)),
            C: EngineLoad("vllm", waiting=loads.get("c", 0)),
        }
    )
    return p


def picks(p: Picking, reason: str) -> float:
    labels = {"namespace": "default", "model": "qwen", "reason": reason}
    return p.metrics.registry.get_sample_value("arks_picks_total", labels) or 0.0


def conversation(*turns: str) -> str:
    return prefix_text(
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                *({"role": "user", "content": t} for t in turns),
            ]
        }
    )


def test_least_load_names_the_least_loaded_engine_and_two_fallbacks() -> None:
    p = picking(a=4, b=0, c=9)

    chosen = p.choose("r1", QWEN, LEAST_LOAD, None)

    assert chosen == Destination((B, A, C), "least_load")
    assert chosen.value == f"{B},{A},{C}"
    assert picks(p, "least_load") == 1
    assert p.metrics.registry.get_sample_value("arks_pick_seconds_count") == 1


def test_a_burst_between_scrapes_spreads_over_engines_with_equal_load() -> None:
    p = picking()

    firsts = [p.choose(f"r{i}", QWEN, LEAST_LOAD, None) for i in range(9)]

    served = [d.hosts[0] for d in firsts if isinstance(d, Destination)]
    assert sorted(served.count(h) for h in (A, B, C)) == [3, 3, 3]  # unseen picks count as queue


def test_finished_requests_stop_counting() -> None:
    p = picking()
    first = p.choose("r1", QWEN, LEAST_LOAD, None)
    assert isinstance(first, Destination)

    p.finished("r1")

    (engine,) = [e for e in p.store.engines(("default", "qwen")) if e.address == first.hosts[0]]
    assert (engine.in_flight, engine.unseen) == (0, 0)


def test_prefix_cache_keeps_a_conversation_where_it_started() -> None:
    p = picking()
    turns = [
        "Where is the treasure?",
        "Arr, under the palm.",
        "Which palm?",
        "The tallest one.",
        "Thanks!",
    ]

    destinations = [
        p.choose(f"r{i}", QWEN, PREFIX_CACHE, conversation(*turns[: i + 1]))
        for i in range(len(turns))
    ]

    first = destinations[0]
    assert isinstance(first, Destination) and first.reason == "prefix_miss"
    assert all(isinstance(d, Destination) and d.hosts[0] == first.hosts[0] for d in destinations)
    assert {d.reason for d in destinations[1:] if isinstance(d, Destination)} == {"prefix_hit"}
    assert picks(p, "prefix_hit") == 4 and picks(p, "prefix_miss") == 1


def test_prefix_cache_moves_a_conversation_off_an_engine_without_room() -> None:
    p = picking()
    start = p.choose("r0", QWEN, PREFIX_CACHE, conversation("hello"))
    assert isinstance(start, Destination)
    holder = start.hosts[0]
    p.store.observe({holder: EngineLoad("vllm", waiting=30)})

    moved = p.choose("r1", QWEN, PREFIX_CACHE, conversation("hello", "again"))
    stays = p.choose("r2", QWEN, PREFIX_CACHE, conversation("hello", "again", "and again"))

    assert isinstance(moved, Destination) and moved.hosts[0] != holder
    assert (
        isinstance(stays, Destination) and stays.hosts[0] == moved.hosts[0]
    )  # recorded where it went


def test_a_short_prompt_is_picked_by_load() -> None:
    p = picking(a=3, b=1, c=0)

    assert p.choose("r1", QWEN, PREFIX_CACHE, "hi") == Destination((C, B, A), "prefix_miss")
    assert p.choose("r2", QWEN, PREFIX_CACHE, None) == Destination((C, B, A), "prefix_miss")


def test_no_pickable_engine_fails_open_by_default() -> None:
    p = picking()
    for _ in range(2):
        p.store.observe({A: ScrapeFailure("x"), B: ScrapeFailure("x"), C: ScrapeFailure("x")})

    assert p.choose("r1", QWEN, LEAST_LOAD, None) is None
    assert picks(p, "fallback") == 1
    assert len(p.store) == 0


def test_no_pickable_engine_fails_closed_when_asked() -> None:
    p = picking(fail_closed=True)
    p.store.set_endpoints({("default", "qwen"): ["10.0.0.4:8000"]})  # a new engine, not scraped yet

    refused = p.choose("r1", QWEN, LEAST_LOAD, None)

    assert isinstance(refused, Deny)
    assert (refused.status, refused.code, refused.type) == (
        503,
        "no_backend",
        "service_unavailable",
    )
    assert picks(p, "refused") == 1


def test_an_endpoint_without_known_engines_is_left_to_envoy_even_when_failing_closed() -> None:
    p = picking(fail_closed=True)
    llama = Identity("default", "alice", "llama")  # e.g. routed to Services: Envoy Gateway balances

    assert p.choose("r1", llama, LEAST_LOAD, None) is None
    labels = {"namespace": "default", "model": "llama", "reason": "unmanaged"}
    assert p.metrics.registry.get_sample_value("arks_picks_total", labels) == 1
