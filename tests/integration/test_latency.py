"""Per-request latency histograms through the real stack: Envoy's access-log timings.

The simulator is told its time to first token and per output token (`x-sim-ttft-ms`,
`x-sim-tpot-ms`); the gateway's histograms must count each request once, in the buckets those
delays put it in.
"""

from __future__ import annotations

import httpx

from tests.support.stack import ALICE, Stack
from tests.support.waiting import wait_for

NS = "default"
AUTH = {"authorization": f"Bearer {ALICE}"}
SLOW = {"x-sim-ttft-ms": "600", "x-sim-tpot-ms": "40", "x-sim-output-tokens": "5"}


def _bucket(stack: Stack, name: str, le: str, **labels: str) -> float:
    return stack.metric(f"{name}_bucket", le=le, **labels)


def _count(stack: Stack, name: str, **labels: str) -> float:
    return stack.metric(f"{name}_count", **labels)


def _within(stack: Stack, name: str, low: str, high: str, **labels: str) -> float:
    """How many observations fell in (low, high]."""
    return _bucket(stack, name, high, **labels) - _bucket(stack, name, low, **labels)


def test_streamed_answer_is_timed_to_its_first_token_and_per_token(stack: Stack) -> None:
    body = {
        "model": "model-a",
        "messages": [{"role": "user", "content": "Time me."}],
        "stream": True,
    }
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers={**AUTH, **SLOW}) as r:
            assert r.status_code == 200
            r.read()
    ok = {"namespace": NS, "model": "model-a", "stream": "true", "status_class": "2xx"}
    wait_for(lambda: _count(stack, "arks_request_duration_seconds", **ok), lambda n: n == 1)
    # 600 ms to the first token, then 4 tokens 40 ms apart: 760 ms in all.
    assert _within(stack, "arks_request_duration_seconds", "0.5", "1.0", **ok) == 1
    assert _within(stack, "arks_upstream_duration_seconds", "0.5", "1.0", **ok) == 1
    model = {"namespace": NS, "model": "model-a"}
    assert _count(stack, "arks_time_to_first_token_seconds", **model) == 1
    assert _within(stack, "arks_time_to_first_token_seconds", "0.5", "1.0", **model) == 1
    assert _count(stack, "arks_time_per_output_token_seconds", **model) == 1
    assert _within(stack, "arks_time_per_output_token_seconds", "0.035", "0.05", **model) == 1


def test_a_stream_of_several_answers_has_no_time_per_output_token(stack: Stack) -> None:
    model = {"namespace": NS, "model": "model-b"}
    before = _count(stack, "arks_time_per_output_token_seconds", **model)
    body = {
        "model": "model-b",
        "messages": [{"role": "user", "content": "Twice."}],
        "stream": True,
        "n": 2,
    }
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers={**AUTH, **SLOW}) as r:
            assert r.status_code == 200
            r.read()
    wait_for(lambda: _count(stack, "arks_time_to_first_token_seconds", **model), lambda n: n == 1)
    assert _count(stack, "arks_time_per_output_token_seconds", **model) == before == 0


def test_unstreamed_answer_has_a_duration_and_no_first_token(stack: Stack) -> None:
    before = _count(stack, "arks_time_to_first_token_seconds", namespace=NS, model="model-a")
    body = {"model": "model-a", "messages": [{"role": "user", "content": "Time me."}]}
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        r = http.post("/v1/chat/completions", json=body, headers={**AUTH, **SLOW})
    assert r.status_code == 200
    ok = {"namespace": NS, "model": "model-a", "stream": "false", "status_class": "2xx"}
    wait_for(lambda: _count(stack, "arks_request_duration_seconds", **ok), lambda n: n == 1)
    assert _within(stack, "arks_request_duration_seconds", "0.5", "1.0", **ok) == 1
    assert _within(stack, "arks_upstream_duration_seconds", "0.5", "1.0", **ok) == 1
    after = _count(stack, "arks_time_to_first_token_seconds", namespace=NS, model="model-a")
    assert after == before


def test_engine_unreachable_is_timed_with_its_status_class_and_no_engine_time(
    stack: Stack,
) -> None:
    body = {"model": "model-down", "messages": [{"role": "user", "content": "Anyone?"}]}
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        r = http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 503
    failed = {"namespace": NS, "model": "model-down", "stream": "false", "status_class": "5xx"}
    wait_for(lambda: _count(stack, "arks_request_duration_seconds", **failed), lambda n: n == 1)
    assert _count(stack, "arks_upstream_duration_seconds", **failed) == 0
    # Envoy tried the engine three times (a connect failure is retried twice, NUM_RETRIES).
    assert stack.metric("arks_upstream_retries_total", namespace=NS, model="model-down") == 2


def test_latency_series_never_name_the_user(stack: Stack) -> None:
    for (name, labels), _ in stack.metrics().items():
        if name.startswith(
            (
                "arks_request_duration_seconds",
                "arks_upstream_duration_seconds",
                "arks_time_to_first_token_seconds",
                "arks_time_per_output_token_seconds",
            )
        ):
            assert "user" not in dict(labels)
