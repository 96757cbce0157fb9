"""The engine load the controller exports: one series set per engine and model, replaced each
round so engines that went away leave nothing behind; the readings of both modes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from arks.api import SocketAddress
from arks.engine_metrics import EngineLoad, ScrapeFailure
from arks.policy import load_policy_file
from controller.load.cluster import PodTarget, pod_readings
from controller.load.metrics import EngineMetrics, EngineReading, gone, load_values
from controller.standalone import engine_readings, served_models
from launcher.cli import DEMO_POLICY

LOAD = EngineLoad("vllm", waiting=3, running=5, kv_cache_usage=0.25)
GAUGES = (
    "arks_engine_weight",
    "arks_engine_waiting_requests",
    "arks_engine_running_requests",
    "arks_engine_kv_cache_usage_ratio",
)


def value(registry: CollectorRegistry, name: str, engine: str, model: str = "qwen") -> float | None:
    labels = {"namespace": "team", "model": model, "engine": engine}
    return registry.get_sample_value(name, labels)


def series_count(registry: CollectorRegistry) -> int:
    return sum(
        len(family.samples)
        for family in registry.collect()
        if family.name.startswith("arks_engine_")
    )


def test_a_round_exports_load_and_weight_per_engine() -> None:
    registry = CollectorRegistry()
    EngineMetrics(registry).publish({("team", "qwen", "pod-a"): EngineReading(LOAD, 80)})
    assert value(registry, "arks_engine_weight", "pod-a") == 80
    assert value(registry, "arks_engine_waiting_requests", "pod-a") == 3
    assert value(registry, "arks_engine_running_requests", "pod-a") == 5
    assert value(registry, "arks_engine_kv_cache_usage_ratio", "pod-a") == 0.25
    errors = {"namespace": "team", "model": "qwen"}
    assert registry.get_sample_value("arks_engine_scrape_errors_total", errors) == 0


def test_a_failed_scrape_counts_an_error_drops_the_load_and_keeps_the_weight() -> None:
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    metrics.publish({("team", "qwen", "pod-a"): EngineReading(LOAD, 80)})
    metrics.publish({("team", "qwen", "pod-a"): EngineReading(ScrapeFailure("refused"), 0)})
    metrics.publish({("team", "qwen", "pod-a"): EngineReading(ScrapeFailure("timeout"), 0)})
    errors = {"namespace": "team", "model": "qwen"}
    assert registry.get_sample_value("arks_engine_scrape_errors_total", errors) == 2
    assert value(registry, "arks_engine_weight", "pod-a") == 0  # drained, and says so
    for name in GAUGES[1:]:
        assert value(registry, name, "pod-a") is None  # unknown, not the last value seen


def test_a_load_the_engine_does_not_report_has_no_series() -> None:
    registry = CollectorRegistry()
    unknown = EngineLoad("unknown")  # an engine without a metrics page (404)
    EngineMetrics(registry).publish({("team", "qwen", "e"): EngineReading(unknown, 100)})
    assert value(registry, "arks_engine_weight", "e") == 100
    assert value(registry, "arks_engine_waiting_requests", "e") is None
    errors = {"namespace": "team", "model": "qwen"}
    assert registry.get_sample_value("arks_engine_scrape_errors_total", errors) == 0


def test_churning_pods_do_not_grow_the_registry() -> None:
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    counts = []
    for rollout in range(50):  # every rollout: two new pod names, the old ones deleted
        metrics.publish(
            {("team", "qwen", f"qwen-{rollout}-{i}"): EngineReading(LOAD, 100) for i in range(2)}
        )
        counts.append(series_count(registry))
    assert set(counts) == {counts[0]}
    assert metrics.exported() == {("team", "qwen", "qwen-49-0"), ("team", "qwen", "qwen-49-1")}
    assert value(registry, "arks_engine_weight", "qwen-0-0") is None
    metrics.publish({})
    assert metrics.exported() == set()
    assert all(value(registry, name, "qwen-49-0") is None for name in GAUGES)


def test_gone_is_what_was_exported_and_is_not_anymore() -> None:
    a, b = ("n", "m", "a"), ("n", "m", "b")
    assert gone({a, b}, {b}) == {a}
    assert gone({a}, {a, b}) == set()


def test_load_values_of_a_failure_are_unknown() -> None:
    assert load_values(LOAD) == (3, 5, 0.25)
    assert load_values(ScrapeFailure("x")) == (None, None, None)


def test_pod_readings_name_the_pod_and_its_served_model() -> None:
    pod = PodTarget("team", "qwen-a-0", "uid", "qwen-a", "qwen-7b", "http://10.0.0.7:8000/metrics")
    readings = pod_readings({pod: LOAD}, {pod: 60})
    assert readings == {("team", "qwen-7b", "qwen-a-0"): EngineReading(LOAD, 60)}


def test_standalone_readings_are_per_model_an_engine_serves() -> None:
    policy = load_policy_file(DEMO_POLICY)
    served = served_models(policy)
    assert served, "the demo policy weighs its engines by load"
    engine = next(iter(served))
    readings = engine_readings({engine: LOAD}, {engine: 100}, served)
    name = f"{engine.address}:{engine.port}"
    assert set(readings) == {(ns, model, name) for ns, model in served[engine]}
    assert all(r == EngineReading(LOAD, 100) for r in readings.values())
    other = SocketAddress("127.0.0.1", 1)  # not in the policy: no series
    assert engine_readings({other: LOAD}, {}, served) == {}
