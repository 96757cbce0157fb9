"""envoyproxy/ratelimit's Prometheus series: our figures named as its statsd stats, mapped by
statsd_exporter's rules (upstream's default ones, or PROMETHEUS_MAPPER_YAML's file as Envoy
Gateway writes it), served as valid exposition in both text formats."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from arks.metric_rules import declared_in, violations
from ratelimit.server import create_metrics
from ratelimit.statsd_mapping import (
    COUNTER,
    DEFAULT,
    OBSERVER,
    Mapped,
    MappingError,
    escape,
    parse,
    resolve,
)
from ratelimit.upstream_stats import RuleFile
from tests.support.exposition import sample

RULES = parse(DEFAULT)


def test_upstreams_default_rules_label_a_stats_key_by_domain_key1_and_key2() -> None:
    """`*.*` (domain.key1) by a glob rule; three parts or more by a regex rule, which keeps the
    second and third and drops the rest."""
    two = resolve(RULES, "ratelimit.service.rate_limit.rl.user_alice.total_hits", COUNTER)
    assert two == Mapped(
        "ratelimit_service_rate_limit_total_hits", (("domain", "rl"), ("key1", "user_alice"))
    )
    four = resolve(RULES, "ratelimit.service.rate_limit.rl.user.model_m.x_y.over_limit", COUNTER)
    assert four == Mapped(
        "ratelimit_service_rate_limit_over_limit",
        (("domain", "rl"), ("key1", "user"), ("key2", "model_m")),
    )
    timer = resolve(RULES, "ratelimit_server.ShouldRateLimit.response_time", OBSERVER)
    assert timer is not None and (timer.name, timer.scale) == (
        "ratelimit_service_response_time_seconds",
        0.001,
    )
    assert (
        resolve(
            parse(DEFAULT, response_time_ms=True), "ratelimit_server.X.response_time", OBSERVER
        ).scale
        == 1.0
    )  # type: ignore[union-attr]
    # a counter-only rule does not take a timer; what no rule takes keeps its escaped name
    assert resolve(RULES, "ratelimit.service.call.should_rate_limit.redis_error", OBSERVER) == (
        Mapped("ratelimit_service_call_should_rate_limit_redis_error", ())
    )
    assert escape("ratelimit.service.rate_limit.rl.1-a/b.near_limit") == (
        "ratelimit_service_rate_limit_rl_1_a_b_near_limit"
    )
    assert escape("9lives") == "_9lives"


# Rules of the shape Envoy Gateway writes into its statsd-exporter ConfigMap: a regex per
# rate-limit rule with its own labels, globs first whatever their place in the file, a drop.
GATEWAY_RULES = r"""
defaults:
  match_type: regex
mappings:
  - match: 'ratelimit\.service\.rate_limit\.default/ratelimit-all-ips\.(masked_remote_address_[^.]*)\.(.*)'
    name: ratelimit_service_rate_limit_${2}
    labels:
      ratelimit_policy_name: ratelimit-all-ips
      ratelimit_policy_namespace: default
      key1: $1
  - match: 'ratelimit\.service\.rate_limit\.noisy\..*'
    action: drop
  - match: ratelimit.service.call.should_rate_limit.*
    match_type: glob
    name: ratelimit_service_should_rate_limit_error
    match_metric_type: counter
    labels: {err_type: "$1"}
"""


def test_a_mapping_file_as_envoy_gateway_writes_it() -> None:
    rules = parse(GATEWAY_RULES)
    assert rules[0].glob  # globs are tried first
    mapped = resolve(
        rules,
        "ratelimit.service.rate_limit.default/ratelimit-all-ips.masked_remote_address_0_0_0_0/0.over_limit",
        COUNTER,
    )
    assert mapped == Mapped(
        "ratelimit_service_rate_limit_over_limit",
        (
            ("ratelimit_policy_name", "ratelimit-all-ips"),
            ("ratelimit_policy_namespace", "default"),
            ("key1", "masked_remote_address_0_0_0_0/0"),
        ),
    )
    assert resolve(rules, "ratelimit.service.rate_limit.noisy.k.total_hits", COUNTER) is None
    err = resolve(rules, "ratelimit.service.call.should_rate_limit.service_error", COUNTER)
    assert err == Mapped(
        "ratelimit_service_should_rate_limit_error", (("err_type", "service_error"),)
    )


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("mappings: [{match: a.*}]", "mappings[0]: a mapping needs a `name`"),
        ("mappings: [{name: x}]", "mappings[0]: a mapping needs a `match` string"),
        ("mappings: [{match: '(', match_type: regex, name: x}]", "mappings[0]"),
        ("mappings: [{match: a, match_type: fuzzy, name: x}]", "match_type 'fuzzy'"),
        ("mappings: {}", "a `mappings` list"),
        (": :", "not YAML"),
    ],
)
def test_rules_that_cannot_be_read_are_refused_with_the_rule_named(text: str, named: str) -> None:
    with pytest.raises(MappingError, match=named.replace("[", r"\[").replace("(", r"\(")):
        parse(text)


def test_series_are_ours_renamed_and_summed_where_the_mapping_merges_keys() -> None:
    metrics, calls = create_metrics(upstream_names=True)
    metrics.hits.labels("rl", "rl.a.b.c").inc(2)
    metrics.hits.labels("rl", "rl.a.b.d").inc(3)  # the same key1/key2: one upstream series
    metrics.over_limit.labels("rl", "rl.a").inc()
    metrics.shadow_mode.labels("rl", "rl.a").inc()
    metrics.hits.labels("rl", "override").inc(7)  # under its domain: rl.override
    metrics.over_limit_with_local_cache.labels("rl", "rl.a").inc()  # no default rule: escaped
    metrics.config_reloads.inc()
    metrics.config_reloads.inc()
    metrics.global_shadow_mode.inc()
    calls.errors.labels("redis_error").inc()
    for seconds in (0.0002, 0.003, 0.003):
        calls.called("rl", seconds)
    calls.called("other", 0.2)
    text = generate_latest(metrics.registry).decode()
    hits = "ratelimit_service_rate_limit_total_hits"
    assert sample(text, hits, domain="rl", key1="a", key2="b") == 5
    assert sample(text, hits, domain="rl", key1="override") == 7
    assert sample(text, "ratelimit_service_rate_limit_over_limit", domain="rl", key1="a") == 1
    assert sample(text, "ratelimit_service_rate_limit_shadow_mode", domain="rl", key1="a") == 1
    assert sample(text, "ratelimit_service_rate_limit_rl_a_over_limit_with_local_cache") == 1
    assert sample(text, "ratelimit_service_should_rate_limit_error", err_type="redis_error") == 1
    assert sample(text, "ratelimit_service_should_rate_limit_error", err_type="service_error") == 0
    assert sample(text, "ratelimit_service_config_load_success") == 2
    assert sample(text, "ratelimit_service_config_load_error") == 0
    assert sample(text, "ratelimit_service_global_shadow_mode") == 1  # no default rule: escaped
    method = {"grpc_method": "ShouldRateLimit"}
    assert sample(text, "ratelimit_service_total_requests", **method) == 4
    seconds = "ratelimit_service_response_time_seconds"
    assert sample(text, f"{seconds}_count", **method) == 4
    assert sample(text, f"{seconds}_bucket", le="0.005", **method) == 3
    total = sample(text, f"{seconds}_sum", **method)
    assert total is not None and abs(total - 0.2062) < 1e-9
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


def test_response_times_in_milliseconds_when_asked() -> None:
    metrics, calls = create_metrics(True, parse(DEFAULT, response_time_ms=True))
    calls.called("rl", 0.003)
    text = generate_latest(metrics.registry).decode()
    method = {"grpc_method": "ShouldRateLimit"}
    assert sample(text, "ratelimit_service_response_time_seconds_bucket", le="5.0", **method) == 1
    assert sample(text, "ratelimit_service_response_time_seconds_sum", **method) == 3.0


def test_no_rule_leaves_every_series_under_its_escaped_statsd_name() -> None:
    """A mapping file upstream cannot read leaves its sink without rules (it ignores the
    error): every stat under its escaped name."""
    metrics, _ = create_metrics(True, ())
    metrics.hits.labels("rl", "rl.a").inc()
    text = generate_latest(metrics.registry).decode()
    assert sample(text, "ratelimit_service_rate_limit_rl_a_total_hits") == 1
    assert sample(text, "ratelimit_server_ShouldRateLimit_total_requests") == 0


def test_without_upstream_names_only_ours() -> None:
    metrics, _ = create_metrics()
    metrics.hits.labels("rl", "rl.a").inc()
    assert "ratelimit_service_" not in generate_latest(metrics.registry).decode()


def test_a_mapping_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    """Envoy Gateway rewrites its ConfigMap as its rules change (a mounted ConfigMap is swapped
    through a symlink): the next scrape names the series by the new rules. Absent at start-up:
    no rule (escaped names), as upstream; a file that breaks later keeps the last good rules."""
    path = tmp_path / "conf.yaml"
    rules = RuleFile(path)
    metrics, _ = create_metrics(True, rules)
    metrics.hits.labels("rl", "rl.a").inc()

    def scrape() -> str:
        return generate_latest(metrics.registry).decode()

    assert sample(scrape(), "ratelimit_service_rate_limit_rl_a_total_hits") == 1
    path.write_text(
        "mappings: [{match: 'ratelimit.service.rate_limit.rl.*.total_hits', name: hits, "
        "labels: {who: $1}}]"
    )
    assert sample(scrape(), "hits", who="a") == 1
    fresh = tmp_path / "fresh.yaml"  # a ConfigMap update: a new file put in the old one's place
    fresh.write_text(
        "mappings: [{match: 'ratelimit.service.rate_limit.rl.*.total_hits', name: calls, "
        "labels: {user: $1}}]"
    )
    os.replace(fresh, path)
    assert sample(scrape(), "calls", user="a") == 1
    path.write_text("mappings: [{match: 'x'}]")  # no name: refused, the last rules stay
    assert sample(scrape(), "calls", user="a") == 1
