"""envoyproxy/ratelimit's Prometheus series (its statsd_exporter default mapping), computed from
ours: the labels a stats key maps to, sums where the mapping drops parts, valid exposition in
both text formats."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from arks.metric_rules import declared_in, violations
from ratelimit.server import create_metrics
from ratelimit.upstream_stats import key_labels
from tests.support.exposition import sample


def test_a_stats_key_maps_to_domain_key1_and_key2_as_the_default_mapping() -> None:
    """`*.*` (domain.key1) by the glob mapping; three parts or more by the regex one, which keeps
    the second and third and drops the rest."""
    assert key_labels("rl", "rl.user_alice") == (("domain", "rl"), ("key1", "user_alice"))
    assert key_labels("rl", "rl.user.model_m.extra_x") == (
        ("domain", "rl"),
        ("key1", "user"),
        ("key2", "model_m"),
    )
    assert key_labels("rl", "override") == (("domain", "rl"), ("key1", "override"))


def test_series_are_ours_renamed_and_summed_where_the_mapping_merges_keys() -> None:
    metrics, calls = create_metrics(upstream_names=True)
    metrics.hits.labels("rl", "rl.a.b.c").inc(2)
    metrics.hits.labels("rl", "rl.a.b.d").inc(3)  # the same key1/key2: one upstream series
    metrics.over_limit.labels("rl", "rl.a").inc()
    metrics.shadow_mode.labels("rl", "rl.a").inc()
    metrics.config_reloads.inc()
    metrics.config_reloads.inc()
    calls.errors.labels("redis_error").inc()
    for seconds in (0.0002, 0.003, 0.003):
        calls.called("rl", seconds)
    calls.called("other", 0.2)
    text = generate_latest(metrics.registry).decode()
    assert (
        sample(text, "ratelimit_service_rate_limit_total_hits", domain="rl", key1="a", key2="b")
        == 5
    )
    assert sample(text, "ratelimit_service_rate_limit_over_limit", domain="rl", key1="a") == 1
    assert sample(text, "ratelimit_service_rate_limit_shadow_mode", domain="rl", key1="a") == 1
    assert sample(text, "ratelimit_service_should_rate_limit_error", err_type="redis_error") == 1
    assert sample(text, "ratelimit_service_should_rate_limit_error", err_type="service_error") == 0
    assert sample(text, "ratelimit_service_config_load_success") == 2
    assert sample(text, "ratelimit_service_config_load_error") == 0
    method = {"grpc_method": "ShouldRateLimit"}
    assert sample(text, "ratelimit_service_total_requests", **method) == 4
    assert sample(text, "ratelimit_service_response_time_seconds_count", **method) == 4
    assert sample(text, "ratelimit_service_response_time_seconds_bucket", le="0.005", **method) == 3
    sum_ = sample(text, "ratelimit_service_response_time_seconds_sum", **method)
    assert sum_ is not None and abs(sum_ - 0.2062) < 1e-9
    # untyped in the text format: prometheus_client writes every counter with a _total suffix,
    # which upstream's names do not have
    assert "# TYPE ratelimit_service_rate_limit_over_limit untyped" in text
    # and valid OpenMetrics (what Prometheus asks for first)
    names = {
        f.name
        for f in text_string_to_metric_families(generate_openmetrics(metrics.registry).decode())
    }
    assert "ratelimit_service_rate_limit_over_limit" in names
    assert not violations(declared_in(metrics.registry))


def test_without_upstream_names_only_ours() -> None:
    metrics, _ = create_metrics()
    metrics.hits.labels("rl", "rl.a").inc()
    assert "ratelimit_service_" not in generate_latest(metrics.registry).decode()
