"""Cluster load, the pure parts: which pods are scraped where, pod weights per model, and
their sum per application."""

from __future__ import annotations

from typing import Any

import pytest

from arks.engine_metrics import EngineLoad, ScrapeFailure
from controller.load.cluster import (
    FULL,
    POD_SELECTOR,
    PodTarget,
    PodWeights,
    application_capacities,
    changed_keys,
    serving_target,
)
from controller.load.weights import WeightSettings
from tests.support.kube import labels_match, parse_label_selector


def make_pod(
    name: str = "qwen-a-0",
    app: str = "qwen-a",
    *,
    ip: str | None = "10.0.0.7",
    ready: bool = True,
    phase: str = "Running",
    ports: tuple[tuple[str, int], ...] = (("http", 8000),),
    role: str | None = None,
    component: str | None = None,
) -> dict[str, Any]:
    labels = {
        "app.kubernetes.io/managed-by": "arks",
        "arks.ai/application": app,
        "arks.ai/served-model-name": "qwen-7b",
    }
    if role is not None:
        labels["arks.ai/role"] = role
    if component is not None:
        labels["arks.ai/component"] = component
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip is not None:
        status["podIP"] = ip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "llm",
            "uid": f"uid-{name}",
            "labels": labels,
        },
        "spec": {
            "containers": [
                {"name": "engine", "ports": [{"name": n, "containerPort": p} for n, p in ports]}
            ]
        },
        "status": status,
    }


def target(name: str, app: str, served: str = "qwen-7b", ns: str = "llm") -> PodTarget:
    return PodTarget(ns, name, f"uid-{name}", app, served, f"http://{name}/metrics")


def test_a_ready_engine_pod_is_scraped_on_its_http_port() -> None:
    assert serving_target(make_pod()) == PodTarget(
        "llm", "qwen-a-0", "uid-qwen-a-0", "qwen-a", "qwen-7b", "http://10.0.0.7:8000/metrics"
    )
    ipv6 = serving_target(make_pod(ip="fd00::7"))
    assert ipv6 is not None and ipv6.url == "http://[fd00::7]:8000/metrics"


def test_a_multi_node_group_is_scraped_on_its_leader_only() -> None:
    assert serving_target(make_pod(role="leader")) is not None
    assert serving_target(make_pod(role="worker")) is None


def test_dynamo_is_scraped_on_its_workers_system_port_not_its_frontend() -> None:
    worker = make_pod(ports=(("system", 9090),), component="worker")
    found = serving_target(worker)
    assert found is not None and found.url == "http://10.0.0.7:9090/metrics"
    assert serving_target(make_pod(component="frontend")) is None
    assert serving_target(make_pod(component="prefill")) is None  # disaggregated


@pytest.mark.parametrize(
    "pod",
    [
        make_pod(ready=False),
        make_pod(phase="Pending"),
        make_pod(ip=None),
        make_pod(ports=(("metrics", 8000),)),  # no port of the expected name
        {
            **make_pod(),
            "metadata": {**make_pod()["metadata"], "deletionTimestamp": "2025-01-01T00:00:00Z"},
        },
        {**make_pod(), "metadata": {**make_pod()["metadata"], "labels": {"app": "other"}}},
    ],
    ids=["not-ready", "pending", "no-ip", "no-port", "terminating", "not-arks"],
)
def test_pods_that_do_not_serve_are_not_scraped(pod: dict[str, Any]) -> None:
    assert serving_target(pod) is None


def test_the_watch_selector_takes_leaders_and_single_pods_only() -> None:
    terms = parse_label_selector(POD_SELECTOR)
    assert labels_match(make_pod(), terms)
    assert labels_match(make_pod(role="leader"), terms)
    assert not labels_match(make_pod(role="worker"), terms)
    assert not labels_match({"metadata": {"labels": {"arks.ai/application": "x"}}}, terms)


def test_an_application_sums_its_pods_and_unscraped_pods_count_as_free() -> None:
    a0, a1, b0, c0 = target("a-0", "a"), target("a-1", "a"), target("b-0", "b"), target("c-0", "c")
    capacities = application_capacities([a0, a1, b0, c0], {a0: 100, a1: 40, b0: 0})
    assert capacities == {("llm", "a"): 140, ("llm", "b"): 0, ("llm", "c"): FULL}
    assert application_capacities([], {a0: 100}) == {}  # a gone pod no longer counts


def test_changed_keys_names_added_removed_and_moved_applications() -> None:
    before = {("n", "a"): 100, ("n", "b"): 50, ("n", "c"): 0}
    after = {("n", "a"): 100, ("n", "b"): 60, ("n", "d"): 100}
    assert changed_keys(before, after) == {("n", "b"), ("n", "c"), ("n", "d")}
    assert changed_keys(after, dict(after)) == set()


def idle() -> EngineLoad:
    return EngineLoad("vllm", waiting=0, running=0, kv_cache_usage=0)


def busy(waiting: int) -> EngineLoad:
    return EngineLoad("vllm", waiting=waiting, running=8, kv_cache_usage=0.5)


def test_pods_compete_only_with_pods_of_the_same_model() -> None:
    weights = PodWeights()
    qwen_idle, qwen_busy = target("q-0", "qa"), target("q-1", "qb")
    llama_busy = target("l-0", "la", served="llama")
    other_ns = target("q-0", "qa", ns="elsewhere")
    out: dict[PodTarget, int] = {}
    for _ in range(30):
        out = weights.update(
            {qwen_idle: idle(), qwen_busy: busy(20), llama_busy: busy(20), other_ns: busy(20)}
        )
    assert out[qwen_idle] == FULL
    assert out[qwen_busy] < 20  # far busier than its peer
    # Alone in their groups, busy pods are the freest there: nothing to shift traffic to.
    assert out[llama_busy] == FULL and out[other_ns] == FULL


def test_failing_pods_drain_and_a_group_without_pods_is_forgotten() -> None:
    weights = PodWeights(WeightSettings(failures_to_drain=2))
    a, b = target("a-0", "a"), target("b-0", "b")
    weights.update({a: idle(), b: idle()})
    weights.update({a: idle(), b: ScrapeFailure("refused")})
    assert weights.update({a: idle(), b: ScrapeFailure("refused")}) == {a: FULL, b: 0}
    assert weights.update({}) == {}
    assert weights.update({b: idle()}) == {b: FULL}  # a fresh start, not a recovery ramp


def test_pod_capacity_is_a_percentage_of_the_maximum_weight() -> None:
    weights = PodWeights(WeightSettings(max_weight=10))
    a, b = target("a-0", "a"), target("b-0", "b")
    out: dict[PodTarget, int] = {}
    for _ in range(30):
        out = weights.update({a: idle(), b: busy(2)})
    assert out[a] == FULL and out[b] % 10 == 0 and 0 < out[b] < FULL
