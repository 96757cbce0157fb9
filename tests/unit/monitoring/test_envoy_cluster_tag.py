"""The `envoy.cluster_name` tag of arks/envoy_stats.py: run through Python's `re` the way Envoy
applies a custom tag regex (search; group 1 cut from the stat name, group 2 the value), over
both spellings of a model's cluster with dots in the name; the same extractor in the local
bootstrap and in EnvoyProxy arks-proxy's bootstrap patch. (Through real Envoys:
tests/integration/test_envoy_stats.py.)"""

from __future__ import annotations

import re

import pytest

from arks import envoy_config
from arks.envoy_stats import (
    CLUSTER_NAME_REGEX,
    CLUSTER_NAME_TAG,
    INCLUSIONS,
    envoy_gateway_bootstrap,
    stats_config,
    stats_tags,
)
from tests.support.envoy_gateway import eg_bootstrap
from tests.support.manifests import INSTALL, one

CLUSTERS = (
    "endpoint/default/llama-3.1-8b",
    "endpoint/team-a/qwen2.5-7b-instruct",
    "endpoint/team-a/a.b.c",
    "endpoint/default/model-a",
    "httproute/team-a/llama-3.1-8b/rule/0",
    "httproute/team-a/qwen2.5-7b/rule/12",
    "httproute/team-a/foo.external/rule/0",  # a route's `/rule/<n>` ends it, whatever it holds
    "arks_extproc",
    "xds_cluster",
    "envoyextensionpolicy/arks-system/arks-extproc/extproc/0",
)
# Stats Envoy keeps per cluster that the inclusion list lets exist, with and without a scope.
STATS = (
    "upstream_rq_total",
    "upstream_rq_2xx",
    "upstream_rq_503",
    "upstream_rq_time",
    "upstream_rq_per_try_timeout",
    "upstream_cx_connect_fail",
    "external.upstream_rq_200",
    "external.upstream_rq_2xx",
    "internal.upstream_rq_completed",
    "canary.upstream_rq_2xx",
    "zone.us-east-1a.us-east-1b.upstream_rq_200",
    "membership_healthy",
    "outlier_detection.ejections_active",
    "update_rejected",
    "ratelimit.over_limit",
    "circuit_breakers.default.rq_open",
    "circuit_breakers.high.cx_pool_open",
)


def extract(stat_name: str) -> tuple[str, str] | None:
    """Envoy's TagExtractorStdRegexImpl: (tag value, the name with group 1 cut out), or None."""
    match = re.search(CLUSTER_NAME_REGEX, stat_name)
    if match is None:
        return None
    start, end = match.span(1)
    return match.group(2), stat_name[:start] + stat_name[end:]


def included(stat_name: str) -> bool:
    """Whether the inclusion list (arks/envoy_stats.py) lets Envoy create the stat."""
    for m in INCLUSIONS:
        if m.kind == "prefix" and stat_name.startswith(m.value):
            return True
        if m.kind == "exact" and stat_name == m.value:
            return True
        if m.kind == "regex" and re.fullmatch(m.value, stat_name):
            return True
    return False


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("stat", STATS)
def test_the_whole_cluster_name_is_the_tag_and_the_stat_is_left(cluster: str, stat: str) -> None:
    name = f"cluster.{cluster}.{stat}"
    assert included(name)
    assert extract(name) == (cluster, f"cluster.{stat}")


@pytest.mark.parametrize(
    "stat",
    ["upstream_rq_total", "external.upstream_rq_200", "circuit_breakers.default.rq_open"],
)
def test_every_name_form_reads_to_the_model_the_relabelling_wants(stat: str) -> None:
    """The value is what ENVOY_CLUSTER_RELABELINGS turns into `model`: the name up to the
    stat, dots and all."""
    local = extract(f"cluster.endpoint/default/llama-3.1-8b.{stat}")
    eg = extract(f"cluster.httproute/default/llama-3.1-8b/rule/0.{stat}")
    assert local is not None and local[0] == "endpoint/default/llama-3.1-8b"
    assert eg is not None and eg[0] == "httproute/default/llama-3.1-8b/rule/0"


@pytest.mark.parametrize(
    "stat_name",
    [
        "cluster_manager.cds.update_rejected",  # not a cluster's stat
        "http.ingress.downstream_rq_2xx",
        "cluster.endpoint/default/llama-3.1-8b.lb_healthy_panic",  # not included: never exists
    ],
)
def test_other_stats_are_not_read(stat_name: str) -> None:
    assert extract(stat_name) is None


def test_the_regex_keeps_to_what_re2_and_std_regex_share() -> None:
    """No lookaround, backreference, named group or possessive/atomic form: Envoy compiles a
    custom tag regex with std::regex (ECMAScript) today, RE2 has none of these either."""
    for construct in ("(?=", "(?!", "(?<", "(?P", "(?>", "\\1", "\\2", "++", "*+", "?+"):
        assert construct not in CLUSTER_NAME_REGEX, construct


def test_the_local_bootstrap_replaces_the_default_cluster_name_tag() -> None:
    settings = envoy_config.EnvoySettings(listen_port=1, admin_port=2, extproc_port=3)
    config = envoy_config.bootstrap(settings)["stats_config"]
    assert config == stats_config()
    assert config["allow_default_tag_overrides"] is True
    assert config["stats_tags"] == [{"tag_name": CLUSTER_NAME_TAG, "regex": CLUSTER_NAME_REGEX}]
    assert "use_all_default_tags" not in config  # the other default tags stay


def test_envoy_gateway_gets_the_same_extractor_after_its_own_tags() -> None:
    proxy = one("EnvoyProxy", "arks-proxy", INSTALL)
    assert proxy["spec"]["bootstrap"] == envoy_gateway_bootstrap()
    config = eg_bootstrap(proxy["spec"])["stats_config"]
    assert config["allow_default_tag_overrides"] is True
    assert config["use_all_default_tags"] is True
    own = ["from_zone", "to_zone", "socket_match_name", "priority"]  # Envoy Gateway's
    assert [t["tag_name"] for t in config["stats_tags"]] == [*own, CLUSTER_NAME_TAG]
    assert config["stats_tags"][-1:] == stats_tags()


def test_envoy_gateway_without_the_patch_keeps_only_its_own_tags() -> None:
    """The rendered bootstrap the patch is applied to holds no override of its own."""
    spec = {k: v for k, v in one("EnvoyProxy", "arks-proxy", INSTALL)["spec"].items()}
    del spec["bootstrap"]
    config = eg_bootstrap(spec)["stats_config"]
    assert "allow_default_tag_overrides" not in config
    assert CLUSTER_NAME_TAG not in [t["tag_name"] for t in config["stats_tags"]]


def test_a_local_name_ending_in_an_origin_scope_is_read_short() -> None:
    """The one ambiguity, Envoy's own naming: `foo.external` + `upstream_rq_total` and `foo` +
    `external.upstream_rq_total` are the same stat name; the shorter cluster name wins."""
    name = "cluster.endpoint/default/foo.external.upstream_rq_total"
    assert extract(name) == ("endpoint/default/foo", "cluster.external.upstream_rq_total")
