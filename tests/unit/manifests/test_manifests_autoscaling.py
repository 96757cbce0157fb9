"""manifests/autoscaling: the PodMonitor finds the engine pods the controller renders, and the
prometheus-adapter rules serve exactly the names the rendered HPAs ask for.

(The rules' queries run against a real Prometheus in tests/integration/test_autoscaling_metrics.py.)
"""

from __future__ import annotations

from typing import Any

import pytest

from arks.engine_series import ADAPTER_QUANTILES, GENERATIONS, SERIES, adapter_metric
from controller.render import render_application
from tests.support.manifests import AUTOSCALING, INSTALL, of_kind
from tests.support.objects import RENDER_DEFAULTS, model_on_claim
from tests.support.prometheus_adapter import load_rules, resolve

RULES = load_rules()


def every_series() -> list[str]:
    """What engines of every generation export that the rules may see (histograms whole)."""
    names: set[str] = set()
    for s in SERIES.values():
        names |= {s.waiting, s.kv_cache}
        for histogram in (s.ttft, s.tpot):
            names |= {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"}
    return sorted(names)


DISCOVERED = [(rule, name) for rule in RULES for name in every_series() if rule.selects(name)]


def hpa_names(generation: str) -> set[str]:
    s = SERIES[generation]  # type: ignore[index]
    return {
        adapter_metric(s.waiting),
        adapter_metric(s.kv_cache),
        *(adapter_metric(h, q) for h in (s.ttft, s.tpot) for q in ADAPTER_QUANTILES),
    }


@pytest.mark.parametrize("generation", GENERATIONS)
def test_every_name_an_hpa_may_ask_for_is_served_by_exactly_one_rule(generation: str) -> None:
    for name in hpa_names(generation):
        rule, series = resolve(DISCOVERED, name)
        assert rule.resources == {
            "overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        }
        assert series.split(":")[0] in ("vllm", "sglang")


def test_the_rules_serve_nothing_else() -> None:
    served = {rule.api_name(name) for rule, name in DISCOVERED} - {None}
    wanted = set().union(*(hpa_names(g) for g in GENERATIONS))
    assert served == wanted


def test_rules_only_see_series_of_arks_engines_with_pod_labels() -> None:
    for rule in RULES:
        for label in ('namespace!=""', 'pod!=""', 'arks_ai_application!=""'):
            assert label in rule.series_query
        assert "<<.LabelMatchers>>" in rule.metrics_query
        assert "by (<<.GroupBy>>)" in rule.metrics_query or "<<.GroupBy>>)" in rule.metrics_query


# --- the PodMonitor ---------------------------------------------------------------------------


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels, matchExpressions: In, NotIn, Exists)."""
    if not selector["matchLabels"].items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        key, op = e["key"], e["operator"]
        if op == "Exists" and key not in labels:
            return False
        if op == "In" and labels.get(key) not in e["values"]:
            return False
        if op == "NotIn" and key in labels and labels[key] in e["values"]:
            return False
    return True


def pod_templates(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for o in objects:
        if o["kind"] == "Deployment":
            out.append(o["spec"]["template"])
        elif o["kind"] == "LeaderWorkerSet":
            lwt = o["spec"]["leaderWorkerTemplate"]
            out += [lwt["leaderTemplate"], lwt["workerTemplate"]]
    return out


def app(runtime: str, size: int) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksApplication",
        "metadata": {"name": "chat", "namespace": "llm"},
        "spec": {
            "runtime": runtime,
            "model": {"name": "qwen"},
            "size": size,
            "tensorParallelSize": size,
            "autoscaling": {
                "maxReplicas": 2,
                "metrics": [{"type": "waitingRequests", "target": 5}],
            },
        },
    }


@pytest.mark.parametrize("runtime", ["vllm", "sglang", "dynamo"])
@pytest.mark.parametrize("size", [1, 2])
def test_podmonitor_scrapes_the_engine_pods_that_serve_metrics(runtime: str, size: int) -> None:
    (monitor,) = of_kind("PodMonitor", AUTOSCALING)
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    assert spec["podTargetLabels"] == ["arks.ai/application"]  # -> arks_ai_application
    ports = {e["port"] for e in spec["podMetricsEndpoints"]}
    assert all(e["path"] == "/metrics" for e in spec["podMetricsEndpoints"])
    scraped = 0
    for template in pod_templates(
        render_application(app(runtime, size), model_on_claim("c"), defaults=RENDER_DEFAULTS)
    ):
        labels = template["metadata"]["labels"]
        (container,) = template["spec"]["containers"]
        declared = {p["name"] for p in container.get("ports", [])}
        selected = matches(spec["selector"], labels)
        if container["name"] == "engine" and declared:
            assert selected and declared & ports, labels
            scraped += 1
        elif selected:  # a LeaderWorkerSet worker: no port, so no target
            assert not declared & ports, labels
        else:
            assert container["name"] == "router", labels  # a frontend: not an engine
    assert scraped == 1


def test_autoscaling_manifests_are_not_part_of_the_default_install() -> None:
    assert not of_kind("PodMonitor")
    assert not of_kind("PodMonitor", INSTALL)
