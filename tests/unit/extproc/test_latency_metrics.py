"""The gateway's latency histograms: what each finished request observes, and under which labels."""

from __future__ import annotations

import dataclasses

import pytest

from extproc.metrics import GatewayMetrics, status_class
from extproc.usage import Finished

STREAM = Finished(
    request_id="r1",
    namespace="team-a",
    user="alice",
    model="qwen",
    path="/v1/chat/completions",
    stream=True,
    status=200,
    prompt_tokens=10,
    completion_tokens=11,
    prompt_estimate=None,
    request_body_bytes=100,
    response_body_bytes=1000,
    duration_s=1.5,
    first_byte_s=0.5,
    upstream_s=1.4,
)


def sample(m: GatewayMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_a_stream_observes_duration_engine_time_first_token_and_per_token() -> None:
    m = GatewayMetrics.create()
    m.latency(STREAM)

    series = {"namespace": "team-a", "model": "qwen", "stream": "true", "status_class": "2xx"}
    assert sample(m, "arks_request_duration_seconds_sum", **series) == 1.5
    assert sample(m, "arks_upstream_duration_seconds_sum", **series) == pytest.approx(1.4)
    model = {"namespace": "team-a", "model": "qwen"}
    assert sample(m, "arks_time_to_first_token_seconds_sum", **model) == 0.5
    # (1.5 - 0.5) / (11 - 1)
    assert sample(m, "arks_time_per_output_token_seconds_sum", **model) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "change",
    [
        {"stream": False},  # an answer sent whole: its first byte is its last
        {"status": 429},  # an error answer has no first token
        {"first_byte_s": None},  # no content byte came
    ],
)
def test_no_first_token_without_a_successful_stream(change: dict[str, object]) -> None:
    m = GatewayMetrics.create()
    m.latency(dataclasses.replace(STREAM, **change))  # type: ignore[arg-type]

    model = {"namespace": "team-a", "model": "qwen"}
    assert sample(m, "arks_time_to_first_token_seconds_count", **model) in (None, 0.0)
    assert sample(m, "arks_time_per_output_token_seconds_count", **model) in (None, 0.0)


@pytest.mark.parametrize(
    "change",
    [
        {"completion_tokens": 1},
        {"completion_tokens": None},
        {"interrupted": "client_disconnected"},
        {"choices": 2},  # n = 2: usage sums two answers written side by side
    ],
)
def test_no_per_token_time_without_two_reported_tokens_of_a_whole_stream(
    change: dict[str, object],
) -> None:
    m = GatewayMetrics.create()
    m.latency(dataclasses.replace(STREAM, **change))  # type: ignore[arg-type]

    model = {"namespace": "team-a", "model": "qwen"}
    assert sample(m, "arks_time_to_first_token_seconds_count", **model) == 1
    assert sample(m, "arks_time_per_output_token_seconds_count", **model) in (None, 0.0)


def test_no_engine_time_when_the_engine_was_never_reached() -> None:
    m = GatewayMetrics.create()
    m.latency(dataclasses.replace(STREAM, status=503, upstream_s=None, first_byte_s=None))

    series = {"namespace": "team-a", "model": "qwen", "stream": "true", "status_class": "5xx"}
    assert sample(m, "arks_request_duration_seconds_count", **series) == 1
    assert sample(m, "arks_upstream_duration_seconds_count", **series) in (None, 0.0)


def test_status_class() -> None:
    assert [status_class(s) for s in (200, 204, 404, 503, 0, 999)] == [
        "2xx",
        "2xx",
        "4xx",
        "5xx",
        "none",
        "none",
    ]


def test_latency_labels_never_name_the_user() -> None:
    m = GatewayMetrics.create()
    m.latency(STREAM)
    for family in m.registry.collect():
        if "duration" in family.name or "token_seconds" in family.name:
            for s in family.samples:
                assert "user" not in s.labels


def test_retries_are_the_attempts_beyond_the_first() -> None:
    m = GatewayMetrics.create()
    m.latency(STREAM)  # no attempt recorded: nothing
    m.latency(dataclasses.replace(STREAM, attempts=1))
    m.latency(dataclasses.replace(STREAM, attempts=3))

    assert sample(m, "arks_upstream_retries_total", namespace="team-a", model="qwen") == 2
