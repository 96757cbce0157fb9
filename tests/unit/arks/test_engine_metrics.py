"""Engine /metrics text -> EngineLoad: vLLM and SGLang names, summing, garbage, windows."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from arks.engine_metrics import (
    EngineLoad,
    HistogramTotals,
    LoadWindow,
    MetricsParseError,
    parse_engine_metrics,
    window,
)

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
EXPOSITIONS = ("vllm_v1.txt", "vllm_dp2.txt", "vllm_v0_legacy.txt", "sglang.txt", "sglang_dp2.txt")


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --------------------------------------------------------------------------- real-looking expositions


def test_vllm_v1_one_engine() -> None:
    assert parse_engine_metrics(fixture("vllm_v1.txt")) == EngineLoad(
        runtime="vllm",
        waiting=3,
        running=7,
        kv_cache_usage=0.42,
        requests_total=155,  # stop 120 + length 30 + abort 4 + error 1
        errors_total=5,  # abort + error
        ttft=HistogramTotals(61.5, 155),
        e2e=HistogramTotals(930.25, 155),
    )


def test_vllm_data_parallel_engines_are_summed_and_kv_usage_averaged() -> None:
    load = parse_engine_metrics(fixture("vllm_dp2.txt"))
    assert (load.waiting, load.running) == (3 + 9, 7 + 5)
    assert load.kv_cache_usage == pytest.approx((0.42 + 0.8) / 2)
    assert load.requests_total == 155 + 72
    assert load.errors_total == 5 + 2
    assert load.ttft == HistogramTotals(61.5 + 88.0, 155 + 72)
    assert load.e2e == HistogramTotals(930.25 + 512.5, 155 + 72)


def test_vllm_v0_reads_the_legacy_gpu_cache_name() -> None:
    load = parse_engine_metrics(fixture("vllm_v0_legacy.txt"))
    assert load.runtime == "vllm"
    assert load.kv_cache_usage == pytest.approx(0.173)
    assert (load.waiting, load.running) == (0, 12)
    assert load.requests_total == 975 and load.errors_total == 0


def test_vllm_prefers_kv_cache_usage_over_the_legacy_name() -> None:
    text = (
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.9\n'
        'vllm:kv_cache_usage_perc{model_name="m"} 0.3\n'
    )
    assert parse_engine_metrics(text).kv_cache_usage == pytest.approx(0.3)


def test_sglang_one_rank() -> None:
    assert parse_engine_metrics(fixture("sglang.txt")) == EngineLoad(
        runtime="sglang",
        waiting=2826,
        running=162,
        kv_cache_usage=0.28,
        requests_total=11008,
        errors_total=12,
        ttft=HistogramTotals(2.3518979474117756e06, 11008),
        e2e=HistogramTotals(3.116093850019932e06, 11008),
    )


def test_sglang_dp_ranks_are_summed_and_token_usage_averaged() -> None:
    load = parse_engine_metrics(fixture("sglang_dp2.txt"))
    assert (load.waiting, load.running) == (3 + 5, 40 + 44)
    assert load.kv_cache_usage == pytest.approx(0.4)
    assert (load.requests_total, load.errors_total) == (1000, 4)


def reference_sums(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """The same sums through prometheus_client's parser, as an independent oracle."""
    sums = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in sums:
                sums[sample.name] += sample.value
    return sums


@pytest.mark.parametrize("name", EXPOSITIONS)
def test_agrees_with_prometheus_client(name: str) -> None:
    text = fixture(name)
    load = parse_engine_metrics(text)
    p = load.runtime
    assert p in ("vllm", "sglang")
    waiting, running, ttft = (
        (
            "vllm:num_requests_waiting",
            "vllm:num_requests_running",
            "vllm:time_to_first_token_seconds",
        )
        if p == "vllm"
        else (
            "sglang:num_queue_reqs",
            "sglang:num_running_reqs",
            "sglang:time_to_first_token_seconds",
        )
    )
    ref = reference_sums(text, (waiting, running, ttft + "_sum", ttft + "_count"))
    assert load.waiting == ref[waiting]
    assert load.running == ref[running]
    assert load.ttft == HistogramTotals(ref[ttft + "_sum"], ref[ttft + "_count"])


# --------------------------------------------------------------------------- missing and unknown


def test_unknown_metrics_only_is_an_unknown_runtime_with_no_figures() -> None:
    text = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 12.5\n"
    assert parse_engine_metrics(text) == EngineLoad(runtime="unknown")
    assert parse_engine_metrics("") == EngineLoad(runtime="unknown")


def test_missing_metrics_are_none() -> None:
    load = parse_engine_metrics('vllm:num_requests_waiting{model_name="m"} 4\n')
    assert load == EngineLoad(runtime="vllm", waiting=4)


def test_nan_samples_are_skipped_and_usage_clamped() -> None:
    text = 'vllm:num_requests_running{engine="0"} NaN\nvllm:kv_cache_usage_perc 1.0000001\n'
    load = parse_engine_metrics(text)
    assert load.running is None and load.kv_cache_usage == 1.0


def test_labels_timestamps_and_exemplars() -> None:
    text = (
        'vllm:num_requests_waiting{model_name="a } b",note="say \\"hi\\""} 2 1700000000000\n'
        "vllm:num_requests_waiting 3\n"
        'vllm:num_requests_running{model_name="m"} 1 # {trace_id="abc"} 0.5\n'
        'vllm:request_success_total{model_name="m",finished_reason="stop"} 9\n'
        'vllm:request_success_total{finished_reason="error",model_name="m"} 1\n'
        'vllm:request_success_total{model_name="m",xfinished_reason="error"} 5\n'
    )
    load = parse_engine_metrics(text)
    assert (load.waiting, load.running) == (5, 1)
    assert (load.requests_total, load.errors_total) == (15, 1)


def test_another_runtimes_stray_series_are_ignored() -> None:
    text = "vllm:num_requests_waiting 2\nsglang:num_queue_reqs 40\n"
    assert parse_engine_metrics(text) == EngineLoad(runtime="vllm", waiting=2)


@pytest.mark.parametrize(
    ("name", "line"),
    [("garbage_html.txt", 1), ("truncated.txt", 24), ("bad_value.txt", 2)],
)
def test_garbage_raises_a_parse_error_naming_the_line(name: str, line: int) -> None:
    with pytest.raises(MetricsParseError, match=f"line {line}:"):
        parse_engine_metrics(fixture(name))


def test_binary_garbage_raises() -> None:
    with pytest.raises(MetricsParseError):
        parse_engine_metrics("\x00\x01\x02 \xff\n")


# --------------------------------------------------------------------------- windows between scrapes


def load(requests: float, errors: float, ttft: tuple[float, float]) -> EngineLoad:
    return EngineLoad(
        runtime="vllm",
        requests_total=requests,
        errors_total=errors,
        ttft=HistogramTotals(*ttft),
        e2e=HistogramTotals(ttft[0] * 10, ttft[1]),
    )


def test_window_rates_come_from_counter_deltas() -> None:
    got = window(load(100, 2, (10.0, 100)), load(120, 7, (18.0, 120)))
    assert got.finished == 20
    assert got.error_ratio == pytest.approx(5 / 20)
    assert got.mean_ttft_s == pytest.approx(8.0 / 20)
    assert got.mean_e2e_s == pytest.approx(80.0 / 20)


def test_window_without_history_or_traffic_or_after_a_restart_is_empty() -> None:
    empty = LoadWindow(None, None, None, None)
    now = load(120, 7, (18.0, 120))
    assert window(None, now) == empty
    idle = window(now, now)
    assert idle.finished == 0 and idle.error_ratio is None and idle.mean_ttft_s is None
    restarted = window(now, load(3, 0, (0.3, 3)))  # counters went down
    assert restarted == empty
    no_counters = window(EngineLoad("sglang", waiting=1), EngineLoad("sglang", waiting=2))
    assert no_counters == empty


def test_an_engine_without_a_metrics_page_is_up_with_unknown_load() -> None:
    from arks.adapters.scrape import Scrape, observe
    from arks.engine_metrics import EngineLoad, ScrapeFailure

    assert observe(
        Scrape("http://e/metrics", False, 0.01, error="HTTP 404", status=404)
    ) == EngineLoad("unknown")
    failed = observe(Scrape("http://e/metrics", False, 0.01, error="HTTP 500", status=500))
    assert isinstance(failed, ScrapeFailure) and "500" in failed.reason
