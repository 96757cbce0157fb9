"""manifests/monitoring's monitors: the Envoy Gateway proxy's PodMonitor with the one relabelling
of arks/prometheus_config.py, the engines' PodMonitor (autoscaling's, included), honorLabels on
our ServiceMonitors; and the Envoy stats inclusion list, the same locally and under Envoy Gateway.
(Every object is validated against its upstream CRD in tests/unit/manifests/test_manifests.py.)"""

from __future__ import annotations

import re

import pytest
import yaml

from arks import envoy_config
from arks.envoy_stats import envoy_gateway_matches, stats_matcher
from arks.prometheus_config import (
    ENVOY_CLUSTER_RELABELINGS,
    operator_relabelings,
    relabel_configs,
)
from tests.support.manifests import AUTOSCALING, MANIFESTS, MONITORING, of_kind, one


def relabel(labels: dict[str, str], rules: list[dict[str, object]]) -> dict[str, str]:
    """Prometheus's `replace` action: an anchored regex over the source label's value."""
    out = dict(labels)
    for rule in rules:
        (source,) = rule["sourceLabels"]  # type: ignore[misc]
        match = re.fullmatch(str(rule["regex"]), out.get(str(source), ""))
        if match:
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\\1", str(rule["replacement"]))
            out[str(rule["targetLabel"])] = match.expand(replacement)
    return out


@pytest.mark.parametrize(
    ("cluster", "namespace", "model"),
    [
        ("endpoint/team-a/llama-3.1-8b", "team-a", "llama-3.1-8b"),  # local
        ("httproute/team-a/llama-3.1-8b/rule/0", "team-a", "llama-3.1-8b"),  # Envoy Gateway
        ("httproute/t/m/rule/12", "t", "m"),
    ],
)
def test_envoy_cluster_names_become_namespace_and_model(
    cluster: str, namespace: str, model: str
) -> None:
    (monitor,) = [
        m for m in of_kind("PodMonitor", MONITORING) if m["metadata"]["name"] == "arks-envoy"
    ]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    labels = relabel(
        {"envoy_cluster_name": cluster, "namespace": "envoy-gateway-system"},
        endpoint["metricRelabelings"],
    )
    assert (labels["namespace"], labels["model"]) == (namespace, model)


def test_other_clusters_keep_their_labels() -> None:
    for cluster in (
        "arks_extproc",
        "arks_ratelimit",
        "envoyextensionpolicy/arks-system/x/extproc/0",
    ):
        labels = relabel(
            {"envoy_cluster_name": cluster, "namespace": "ns"},
            operator_relabelings(ENVOY_CLUSTER_RELABELINGS),
        )
        assert labels == {"envoy_cluster_name": cluster, "namespace": "ns"}


def test_both_syntaxes_carry_the_same_rules() -> None:
    assert (
        len(relabel_configs(ENVOY_CLUSTER_RELABELINGS))
        == len(operator_relabelings(ENVOY_CLUSTER_RELABELINGS))
        == len(ENVOY_CLUSTER_RELABELINGS)
    )
    for plain, operator in zip(
        relabel_configs(ENVOY_CLUSTER_RELABELINGS),
        operator_relabelings(ENVOY_CLUSTER_RELABELINGS),
        strict=True,
    ):
        assert plain["source_labels"] == operator["sourceLabels"]
        assert plain["target_label"] == operator["targetLabel"]
        assert (plain["regex"], plain["replacement"]) == (
            operator["regex"],
            operator["replacement"],
        )


def test_the_envoy_pod_monitor_selects_envoy_gateways_proxy_of_our_gateway() -> None:
    monitor = one("PodMonitor", "arks-envoy", MONITORING)
    gateway = one("Gateway", "arks-gateway")
    labels = monitor["spec"]["selector"]["matchLabels"]
    assert labels["gateway.envoyproxy.io/owning-gateway-name"] == gateway["metadata"]["name"]
    assert (
        labels["gateway.envoyproxy.io/owning-gateway-namespace"] == gateway["metadata"]["namespace"]
    )
    assert labels["app.kubernetes.io/component"] == "proxy"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/stats/prometheus")
    assert endpoint["metricRelabelings"] == operator_relabelings(ENVOY_CLUSTER_RELABELINGS)


def test_the_engine_pod_monitor_is_part_of_monitoring_and_of_autoscaling() -> None:
    assert one("PodMonitor", "arks-engines", MONITORING) == one(
        "PodMonitor", "arks-engines", AUTOSCALING
    )


def test_our_service_monitors_honor_the_tenant_namespace_label() -> None:
    for monitor in of_kind("ServiceMonitor", MONITORING):
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["honorLabels"] is True, monitor["metadata"]["name"]


def test_envoy_gateway_and_the_local_envoy_include_the_same_stats() -> None:
    docs = yaml.safe_load_all((MANIFESTS / "gateway" / "gateway.yaml").read_text())
    (proxy,) = [d for d in docs if d and d["kind"] == "EnvoyProxy"]
    assert proxy["spec"]["telemetry"]["metrics"]["matches"] == envoy_gateway_matches()
    settings = envoy_config.EnvoySettings(listen_port=1, admin_port=2, extproc_port=3)
    bootstrap = envoy_config.bootstrap(settings)
    assert bootstrap["stats_config"]["stats_matcher"] == stats_matcher()
    kinds = {next(iter(p)) for p in stats_matcher()["inclusion_list"]["patterns"]}
    assert kinds <= {"exact", "prefix", "safe_regex"}  # the ones Envoy Gateway renders
