"""Relabelling of Envoy's per-cluster series into the `namespace` and `model` labels: pure data.

Envoy names a model's cluster `endpoint/<namespace>/<model>` locally (arks/envoy_config.py) and
Envoy Gateway names it `httproute/<namespace>/<route>/rule/<n>` (its default `clusterStatName`;
the controller names an ArksEndpoint's HTTPRoute after the endpoint, i.e. the model). Dashboards
and alerts select on `namespace` and `model` only, so both spellings are turned into those labels
at scrape time. Defined once here: the Envoy PodMonitor (`python -m arks.monitoring`) and the
local Prometheus configuration render the same rules, each in its own syntax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ENVOY_CLUSTER_LABEL = "envoy_cluster_name"


@dataclass(frozen=True)
class Relabel:
    """One `replace` relabelling: if `regex` matches the source label (Prometheus anchors it at
    both ends), `target` is set to `replacement`; otherwise the series is left alone."""

    source: str
    regex: str
    target: str
    replacement: str


ENVOY_CLUSTER_RELABELS: tuple[Relabel, ...] = (
    Relabel(ENVOY_CLUSTER_LABEL, r"endpoint/([^/]+)/([^/]+)", "namespace", "${1}"),
    Relabel(ENVOY_CLUSTER_LABEL, r"endpoint/([^/]+)/([^/]+)", "model", "${2}"),
    Relabel(ENVOY_CLUSTER_LABEL, r"httproute/([^/]+)/([^/]+)/rule/[0-9]+", "namespace", "${1}"),
    Relabel(ENVOY_CLUSTER_LABEL, r"httproute/([^/]+)/([^/]+)/rule/[0-9]+", "model", "${2}"),
)


def prometheus_config(
    relabels: tuple[Relabel, ...] = ENVOY_CLUSTER_RELABELS,
) -> list[dict[str, Any]]:
    """As `metric_relabel_configs` of a Prometheus scrape config."""
    return [
        {
            "source_labels": [r.source],
            "regex": r.regex,
            "target_label": r.target,
            "replacement": r.replacement,
            "action": "replace",
        }
        for r in relabels
    ]


def operator_config(relabels: tuple[Relabel, ...] = ENVOY_CLUSTER_RELABELS) -> list[dict[str, Any]]:
    """As `metricRelabelings` of a Prometheus Operator PodMonitor or ServiceMonitor endpoint."""
    return [
        {
            "sourceLabels": [r.source],
            "regex": r.regex,
            "targetLabel": r.target,
            "replacement": r.replacement,
            "action": "replace",
        }
        for r in relabels
    ]
