"""The generated Prometheus configuration: jobs, paths, honoured labels and Envoy's relabelling.

The relabel regexes are applied here the way Prometheus applies a `replace` rule (anchored at
both ends, `$n` from the groups, no match: label untouched); the real Prometheus applies them in
tests/integration/test_cli_up.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from arks.policy import build_policy
from arks.prometheus_config import (
    CONTROLLER_JOB,
    ENGINES_JOB,
    ENVOY_CLUSTER_RELABELINGS,
    ENVOY_JOB,
    ENVOY_STATS_PATH,
    GATEWAY_JOB,
    RATELIMIT_JOB,
    Relabel,
    Target,
    local_jobs,
    operator_relabelings,
    plain_rule_file,
    prometheus_config,
    relabel_configs,
)
from launcher.prometheus import rule_files
from launcher.stack import engine_targets
from tests.support.objects import backend, endpoint


def relabel(labels: dict[str, str], rules: tuple[Relabel, ...]) -> dict[str, str]:
    out = dict(labels)
    for rule in rules:
        value = ";".join(out.get(name, "") for name in rule.source_labels)
        match = re.fullmatch(rule.regex, value)
        if match:
            out[rule.target_label] = match.expand(re.sub(r"\$(\d+)", r"\\\1", rule.replacement))
    return out


@pytest.mark.parametrize(
    ("cluster", "namespace", "model"),
    [
        ("endpoint/default/qwen-7b", "default", "qwen-7b"),
        ("endpoint/team-a/org/model", "team-a", "org/model"),
        ("httproute/team-a/llama-8b/rule/0", "team-a", "llama-8b"),
        ("httproute/team-a/llama-8b/rule/12", "team-a", "llama-8b"),
    ],
)
def test_envoy_cluster_names_become_namespace_and_model(
    cluster: str, namespace: str, model: str
) -> None:
    labels = relabel({"envoy_cluster_name": cluster}, ENVOY_CLUSTER_RELABELINGS)
    assert (labels["namespace"], labels["model"]) == (namespace, model)


@pytest.mark.parametrize("cluster", ["xds_cluster", "extproc", "httproute/a/b/rule/x", ""])
def test_other_clusters_get_no_namespace_or_model(cluster: str) -> None:
    labels = relabel({"envoy_cluster_name": cluster}, ENVOY_CLUSTER_RELABELINGS)
    assert "namespace" not in labels and "model" not in labels


def test_both_spellings_of_a_rule_say_the_same() -> None:
    plain = relabel_configs(ENVOY_CLUSTER_RELABELINGS)
    operator = operator_relabelings(ENVOY_CLUSTER_RELABELINGS)
    assert len(plain) == len(operator) == 4
    for p, o in zip(plain, operator, strict=True):
        assert (p["source_labels"], p["regex"], p["target_label"], p["replacement"]) == (
            o["sourceLabels"],
            o["regex"],
            o["targetLabel"],
            o["replacement"],
        )
        assert p["action"] == o["action"] == "replace"


def test_the_local_stack_config_scrapes_every_part() -> None:
    jobs = local_jobs(
        gateway="127.0.0.1:9101",
        controller="127.0.0.1:9103",
        envoy_admin="127.0.0.1:9901",
        engines=[
            Target("127.0.0.1:18001", {"namespace": "default"}),
            Target("127.0.0.1:18002", {"namespace": "team-b"}),
        ],
    )
    config = prometheus_config(jobs, ["/rules/arks-rules.yaml"], scrape_interval_s=5)
    assert config["global"] == {"scrape_interval": "5s", "evaluation_interval": "5s"}
    assert config["rule_files"] == ["/rules/arks-rules.yaml"]
    by_job = {c["job_name"]: c for c in config["scrape_configs"]}
    assert list(by_job) == [GATEWAY_JOB, CONTROLLER_JOB, ENVOY_JOB, ENGINES_JOB]
    assert by_job[GATEWAY_JOB]["honor_labels"] and by_job[CONTROLLER_JOB]["honor_labels"]
    assert by_job[ENVOY_JOB]["metrics_path"] == ENVOY_STATS_PATH
    assert by_job[ENVOY_JOB]["metric_relabel_configs"] == relabel_configs(ENVOY_CLUSTER_RELABELINGS)
    assert "metric_relabel_configs" not in by_job[GATEWAY_JOB]
    assert by_job[ENGINES_JOB]["static_configs"] == [
        {"targets": ["127.0.0.1:18001"], "labels": {"namespace": "default"}},
        {"targets": ["127.0.0.1:18002"], "labels": {"namespace": "team-b"}},
    ]


def test_local_engines_are_labelled_with_their_endpoints_namespace() -> None:
    """Engine series carry no namespace of their own; the dashboards filter them by one, as a
    PodMonitor's target label gives it in a cluster."""
    objects = [
        backend("sim-a", 18001),
        backend("sim-b", 18002, namespace="team-b"),
        backend("remote", 18003),
        endpoint("model-a", "sim-a", "remote"),
        endpoint("model-b", "sim-b", namespace="team-b"),
        endpoint("model-empty"),
    ]
    objects[2]["spec"]["endpoints"][0]["ip"]["address"] = "10.0.0.7"  # not a local engine
    policy = build_policy((str(i), o) for i, o in enumerate(objects))
    assert engine_targets(policy) == [
        Target("127.0.0.1:18001", {"namespace": "default"}),
        Target("127.0.0.1:18002", {"namespace": "team-b"}),
    ]


def test_a_rate_limit_service_is_scraped_when_given() -> None:
    jobs = local_jobs(
        gateway="g:1", controller="c:1", envoy_admin="e:1", ratelimit="r:1", engines=[]
    )
    assert [j.name for j in jobs] == [GATEWAY_JOB, RATELIMIT_JOB, CONTROLLER_JOB, ENVOY_JOB]


def test_periods_are_whole_milliseconds() -> None:
    config = prometheus_config([], scrape_interval_s=0.5, evaluation_interval_s=1)
    assert config["global"] == {"scrape_interval": "500ms", "evaluation_interval": "1s"}
    with pytest.raises(ValueError):
        prometheus_config([], scrape_interval_s=0)


def test_only_plain_rule_files_are_loaded() -> None:
    assert plain_rule_file({"groups": []})
    prometheus_rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule"}
    assert not plain_rule_file({**prometheus_rule, "spec": {"groups": []}})
    assert not plain_rule_file({**prometheus_rule, "groups": []})
    assert not plain_rule_file(["groups"])


def test_the_launcher_loads_the_plain_rule_files_of_a_directory(tmp_path: Path) -> None:
    (tmp_path / "arks-rules.yaml").write_text("groups:\n- name: arks\n  rules: []\n")
    (tmp_path / "prometheusrule.yaml").write_text(
        "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nspec: {groups: []}\n"
    )
    (tmp_path / "notes.md").write_text("groups: not yaml rules\n")
    assert rule_files(tmp_path) == [tmp_path / "arks-rules.yaml"]
    assert rule_files(tmp_path / "absent") == []
