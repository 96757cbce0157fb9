"""The cardinality rules, over every service's real registry and over deliberately bad ones."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

from arks.lifecycle import export_process_metrics
from arks.metric_rules import (
    Declared,
    MetricRulesViolated,
    declared_in,
    enforce,
    violations,
)
from controller.metrics import ControllerMetrics
from controller.standalone import StandaloneMetrics
from controller.xds.server import XdsMetrics
from extproc.server import create_metrics as extproc_metrics
from ratelimit.server import create_metrics as ratelimit_metrics


def test_the_gateways_registry_keeps_the_rules() -> None:
    created = extproc_metrics()  # enforce() ran inside; read it again to see what it saw
    declared = {d.name: d for d in declared_in(created.gateway.registry)}
    assert violations(declared.values()) == []
    # The checker saw the label names of metrics that have no series yet, and the gauges of the
    # custom collector: the rules were applied to them, not skipped.
    assert declared["arks_usage_cost"].labels == {"namespace", "user", "model"}
    assert declared["arks_gateway_decision_seconds"].labels == {"phase", "le"}
    assert declared["arks_rate_limit_remaining"].labels == {"namespace", "user", "model", "limit"}
    assert declared["arks_quota_used"].labels == {"namespace", "quota", "type", "period"}
    assert "user" not in declared["arks_request_duration_seconds"].labels


def test_the_rate_limit_services_registry_keeps_the_rules() -> None:
    metrics, _ = ratelimit_metrics()
    declared = {d.name: d for d in declared_in(metrics.registry)}
    assert violations(declared.values()) == []
    assert declared["arks_ratelimit_call_seconds"].labels == {"domain"}
    assert declared["arks_ratelimit_call_errors"].labels == {"type"}


def test_the_controllers_registries_keep_the_rules() -> None:
    cluster = ControllerMetrics()
    export_process_metrics(cluster.registry, "controller")
    enforce(cluster.registry, "controller")
    standalone = StandaloneMetrics()
    XdsMetrics(standalone.registry)
    export_process_metrics(standalone.registry, "controller")
    enforce(standalone.registry, "controller")
    names = {d.name for d in declared_in(standalone.registry)}
    assert {"arks_xds_pushes", "arks_engine_weight", "process_cpu_seconds"} <= names


def test_a_bad_registry_is_refused_with_every_broken_rule() -> None:
    registry = CollectorRegistry()
    Histogram("arks_per_user_seconds", "A histogram per user.", ("user",), registry=registry)
    Summary("arks_per_user_summary_seconds", "Per user.", ("user", "model"), registry=registry)
    Counter("requests", "Not ours by name.", registry=registry)
    Gauge("arks_free_text", "A label nobody decided on.", ("prompt",), registry=registry)
    found = violations(declared_in(registry))
    assert found == [
        "arks_per_user_seconds: a histogram with a 'user' label",
        "arks_per_user_summary_seconds: a summary with a 'user' label",
        "requests: the name does not start with 'arks_'",
        "arks_free_text: labels outside the vocabulary: prompt",
    ]
    with pytest.raises(MetricRulesViolated, match="arks_free_text"):
        enforce(registry, "test")


def test_counters_and_gauges_may_name_the_user_and_process_collectors_are_exempt() -> None:
    kept = [
        Declared("arks_usage_tokens", "counter", frozenset({"namespace", "user", "model", "type"})),
        Declared("arks_rate_limit_remaining", "gauge", frozenset({"user", "limit"})),
        Declared("process_cpu_seconds", "counter", frozenset()),
        Declared("python_info", "gauge", frozenset({"implementation", "major"})),
    ]
    assert violations(kept) == []
