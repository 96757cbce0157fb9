"""The autoscaler of an ArksApplication, pure: `spec.autoscaling` in, one object out.

provider `hpa`: an autoscaling/v2 HorizontalPodAutoscaler on Pods metrics that
prometheus-adapter serves under the names `arks.engine_series.adapter_metric` gives (our rules:
manifests/autoscaling/prometheus-adapter-rules.yaml). provider `keda`: a KEDA ScaledObject with
one Prometheus query per metric (KEDA makes the HPA). The series come from the engine and its
release (`arks.engine_series.generation`); both providers get the same `behavior`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from arks.crds.application import DEFAULT_AUTOSCALING_METRICS
from arks.engine_series import SERIES, EngineSeries, adapter_metric, generation
from controller.render.engines import UnsupportedApplication

KEDA_API_VERSION = "keda.sh/v1alpha1"
DEFAULT_PROVIDER = "hpa"
DEFAULT_QUANTILE = 90
# Latency quantiles are computed over this window of the engines' histograms (the adapter
# rules use the same one).
RATE_WINDOW = "2m"
# Labels the engine PodMonitor (manifests/autoscaling/podmonitor.yaml) puts on every series:
# Prometheus Operator's namespace label and the sanitized podTargetLabel arks.ai/application.
PROM_NAMESPACE = "namespace"
PROM_APPLICATION = "arks_ai_application"

# An engine takes minutes to load its weights: a replica removed in a lull is slow to get
# back. So removals wait for 10 minutes of lower recommendations (the HPA's default is 5) and
# go one pod per 2 minutes; additions keep the HPA's default (immediate, +100 % or +4 pods
# per 15 s).
DEFAULT_SCALE_DOWN: Mapping[str, Any] = {
    "stabilizationWindowSeconds": 600,
    "selectPolicy": "Max",
    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
}

LATENCY_TYPES = ("timeToFirstToken", "timePerOutputToken")


@dataclass(frozen=True)
class ScalingMetric:
    """One entry of `spec.autoscaling.metrics`."""

    type: str
    target: int
    quantile: int = DEFAULT_QUANTILE

    @classmethod
    def from_spec(cls, entry: Mapping[str, Any]) -> ScalingMetric:
        return cls(
            type=str(entry["type"]),
            target=int(entry["target"]),
            quantile=int(entry.get("quantile") or DEFAULT_QUANTILE),
        )


def engine_series(spec: Mapping[str, Any]) -> EngineSeries:
    """The series the application's engines export, by runtime, image and engineVersion."""
    scaling = spec.get("autoscaling") or {}
    return SERIES[
        generation(
            str(spec.get("runtime") or "vllm"),
            str(spec.get("image") or ""),
            str(scaling.get("engineVersion") or ""),
        )
    ]


def _metrics(spec: Mapping[str, Any]) -> list[ScalingMetric]:
    scaling = spec.get("autoscaling") or {}
    # Absent: the CRD's default (the API server fills it in; the renderer agrees). Empty:
    # refused, as the CRD does; an HPA without metrics would scale on CPU utilisation.
    entries = scaling.get("metrics", DEFAULT_AUTOSCALING_METRICS)
    if not entries:
        raise UnsupportedApplication("autoscaling.metrics is empty: name at least one metric")
    metrics = [ScalingMetric.from_spec(e) for e in entries]
    if any(m.type == "cpu" for m in metrics) and not _requests_cpu(spec):
        raise UnsupportedApplication(
            "autoscaling on cpu needs instanceSpec.resources.requests.cpu: utilisation is a "
            "share of the request, undefined without one"
        )
    return metrics


def _requests_cpu(spec: Mapping[str, Any]) -> bool:
    resources = (spec.get("instanceSpec") or {}).get("resources") or {}
    # A container's requests default to its limits.
    return any("cpu" in (resources.get(part) or {}) for part in ("requests", "limits"))


def _seconds(milliseconds: int) -> str:
    return f"{milliseconds / 1000:g}"


def _series_of(series: EngineSeries, metric: ScalingMetric) -> str:
    return {
        "waitingRequests": series.waiting,
        "kvCacheUsage": series.kv_cache,
        "timeToFirstToken": series.ttft,
        "timePerOutputToken": series.tpot,
    }[metric.type]


def behavior(scaling: Mapping[str, Any]) -> dict[str, Any]:
    """The user's behavior, with our scale-down default when scaleDown is not given."""
    given = copy.deepcopy(dict(scaling.get("behavior") or {}))
    given.setdefault("scaleDown", copy.deepcopy(dict(DEFAULT_SCALE_DOWN)))
    return given


# --------------------------------------------------------------------------- HPA


def _hpa_metric(series: EngineSeries, metric: ScalingMetric) -> dict[str, Any]:
    if metric.type == "cpu":
        return {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": metric.target},
            },
        }
    name = _series_of(series, metric)
    if metric.type == "waitingRequests":
        api_name, value = adapter_metric(name), str(metric.target)
    elif metric.type == "kvCacheUsage":  # a percentage of the 0..1 gauge, as a quantity
        api_name, value = adapter_metric(name), f"{metric.target * 10}m"
    else:  # milliseconds of a metric in seconds
        api_name, value = adapter_metric(name, metric.quantile), f"{metric.target}m"
    return {
        "type": "Pods",
        "pods": {
            "metric": {"name": api_name},
            "target": {"type": "AverageValue", "averageValue": value},
        },
    }


def _scale_target(workload: Mapping[str, Any]) -> dict[str, str]:
    return {
        "apiVersion": str(workload["apiVersion"]),
        "kind": str(workload["kind"]),
        "name": str(workload["metadata"]["name"]),
    }


def hpa(
    spec: Mapping[str, Any], meta: Mapping[str, Any], workload: Mapping[str, Any]
) -> dict[str, Any]:
    scaling = spec["autoscaling"]
    series = engine_series(spec)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": dict(meta),
        "spec": {
            "scaleTargetRef": _scale_target(workload),
            "minReplicas": int(scaling.get("minReplicas", 1)),
            "maxReplicas": int(scaling["maxReplicas"]),
            "metrics": [_hpa_metric(series, m) for m in _metrics(spec)],
            "behavior": behavior(scaling),
        },
    }


# --------------------------------------------------------------------------- KEDA


def _selector(namespace: str, application: str) -> str:
    return f'{PROM_NAMESPACE}="{namespace}",{PROM_APPLICATION}="{application}"'


def keda_query(series: EngineSeries, metric: ScalingMetric, namespace: str, app: str) -> str:
    """The PromQL of one trigger: a total over the application's pods (AverageValue: KEDA's
    HPA divides it by the replicas) or, for latencies, one quantile over all of them (Value).
    An empty or NaN result (no engine yet, no request in the window) reads as 0."""
    sel = _selector(namespace, app)
    name = _series_of(series, metric)
    if metric.type == "waitingRequests":
        return f"sum({name}{{{sel}}}) or vector(0)"
    if metric.type == "kvCacheUsage":  # per pod the mean over its engines (data parallel)
        return f"sum(avg by (pod) ({name}{{{sel}}})) or vector(0)"
    q = metric.quantile / 100
    return (
        f"(histogram_quantile({q:g}, sum by (le) (rate({name}_bucket{{{sel}}}[{RATE_WINDOW}])))"
        " >= 0) or vector(0)"
    )


def _trigger(
    series: EngineSeries, metric: ScalingMetric, namespace: str, app: str, server: str
) -> dict[str, Any]:
    if metric.type == "cpu":
        return {
            "type": "cpu",
            "name": "cpu",
            "metricType": "Utilization",
            "metadata": {"value": str(metric.target)},
        }
    if metric.type == "waitingRequests":
        threshold, metric_type = str(metric.target), "AverageValue"
    elif metric.type == "kvCacheUsage":
        threshold, metric_type = f"{metric.target / 100:g}", "AverageValue"
    else:
        threshold, metric_type = _seconds(metric.target), "Value"
    return {
        "type": "prometheus",
        "name": metric.type.lower(),
        "metricType": metric_type,
        "metadata": {
            "serverAddress": server,
            "query": keda_query(series, metric, namespace, app),
            "threshold": threshold,
        },
    }


def scaled_object(
    spec: Mapping[str, Any],
    meta: Mapping[str, Any],
    workload: Mapping[str, Any],
    prometheus_url: str,
) -> dict[str, Any]:
    scaling = spec["autoscaling"]
    series = engine_series(spec)
    namespace, app = str(meta["namespace"]), str(meta["name"])
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": "ScaledObject",
        "metadata": dict(meta),
        "spec": {
            "scaleTargetRef": _scale_target(workload),
            "minReplicaCount": int(scaling.get("minReplicas", 1)),
            "maxReplicaCount": int(scaling["maxReplicas"]),
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior(scaling)}},
            "triggers": [
                _trigger(series, m, namespace, app, prometheus_url) for m in _metrics(spec)
            ],
        },
    }


def autoscaler(
    spec: Mapping[str, Any],
    meta: Mapping[str, Any],
    workload: Mapping[str, Any],
    prometheus_url: str,
) -> dict[str, Any]:
    """The HPA or the ScaledObject for `spec.autoscaling`, with metadata `meta`."""
    provider = str(spec["autoscaling"].get("provider") or DEFAULT_PROVIDER)
    if provider == "hpa":
        return hpa(spec, meta, workload)
    if provider == "keda":
        return scaled_object(spec, meta, workload, prometheus_url)
    raise UnsupportedApplication(f"unknown autoscaling provider {provider!r}")
