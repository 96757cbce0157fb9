"""envoyproxy/ratelimit's own configuration tests (test/config/config_test.go at the commit in
fixtures/upstream/README.md), replayed against our loader with upstream's fixtures, byte for
byte: which files load and which are refused, wildcards anywhere in a value, share_threshold,
value_to_metric's metric names, metadata, and merging a domain's files.

Where our names differ in shape: upstream's `Stats.Key` is our `RateLimit.stats_key`; its
`ShareThresholdKeyPattern` is our `shared_values` (None where upstream has ""; () where nil).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from arks.limits.config import ConfigError, RateLimitConfig, load_config, parse_config
from arks.limits.decision import counter_key
from arks.limits.model import RateLimit

UPSTREAM = Path(__file__).parent / "fixtures" / "upstream"
CONFIG = UPSTREAM / "test" / "config"
DOMAIN = "test-domain"


def load(*names: str, merge: bool = False) -> RateLimitConfig:
    return load_config([CONFIG / f"{name}.yaml" for name in names], merge_domains=merge)


def found(config: RateLimitConfig, *entries: tuple[str, str]) -> RateLimit:
    limit = config.lookup(DOMAIN, list(entries))
    assert limit is not None, entries
    return limit


def test_the_fixtures_are_upstreams_byte_for_byte() -> None:
    listed = dict(
        reversed(line.split(None, 1))
        for line in re.findall(r"^[0-9a-f]{64}  \S+$", (UPSTREAM / "README.md").read_text(), re.M)
    )
    files = sorted(p.relative_to(UPSTREAM).as_posix() for p in (UPSTREAM / "test").rglob("*.yaml"))
    assert files == sorted(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((UPSTREAM / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize(
    "name", ["basic_config", "shadowmode_config", "wildcard", "share_threshold", "metadata"]
)
def test_what_upstream_loads_loads(name: str) -> None:
    assert load(name).domains


@pytest.mark.parametrize(
    "name",
    [
        "empty_domain",
        "empty_key",
        "duplicate_key",
        "bad_limit_unit",
        "replaces_self",
        "replaces_empty",
        "bad_yaml",
        "misspelled_key",
        "misspelled_key2",
        "non_string_key",
        "non_map_list",
        "unlimited_with_unit",
    ],
)
def test_what_upstream_refuses_is_refused(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(name)
    assert caught.value.file.endswith(f"{name}.yaml")


def test_the_integration_tests_runtime_directory_loads() -> None:
    runtime = UPSTREAM / "test" / "integration" / "runtime" / "current" / "ratelimit"
    assert load_config([runtime / "config"]).domains
    assert load_config([runtime / "reload.yaml"]).domains


# --- a domain in several files (TestDuplicateDomain, TestDomainMerge, TestDuplicateKeyDomainMerge)


def test_a_domain_in_two_files_is_refused_unless_merging() -> None:
    with pytest.raises(ConfigError, match="duplicate domain 'test-domain'"):
        load("basic_config", "duplicate_domain")
    with pytest.raises(ConfigError, match="duplicate domain 'test-domain'"):
        load("merge_domain_key1", "merge_domain_key2")


def test_merged_files_of_one_domain_give_one_tree() -> None:
    config = load("merge_domain_key1", "merge_domain_key2", merge=True)
    assert config.lookup("foo_domain", []) is None
    assert config.lookup(DOMAIN, []) is None
    assert found(config, ("key1", "value1")).requests_per_unit == 10
    assert found(config, ("key2", "value2")).requests_per_unit == 20


def test_a_descriptor_in_two_merged_files_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load("merge_domain_key1", "merge_domain_key1", merge=True)
    assert "duplicate of" in caught.value.problem
    assert "key 'key1', value 'value1'" in caught.value.problem


# --- TestWildcardConfig --------------------------------------------------------------------


def test_wildcards_match_like_upstreams() -> None:
    config = load("wildcard")
    no_value = found(config, ("noVal", "foo1"))
    assert no_value == found(config, ("noVal", "foo2"))
    assert no_value.stats_key == "test-domain.noVal"
    wild = found(config, ("wild", "foo1"))
    assert wild == found(config, ("wild", "foo2"))
    assert wild.stats_key == "test-domain.wild_foo*"
    nested = found(config, ("nestedWild", "val1"), ("wild", "goo2"))
    assert nested.stats_key == "test-domain.nestedWild_val1.wild_goo*"
    assert config.lookup(DOMAIN, [("wild", "bar")]) is None
    assert config.lookup(DOMAIN, [("noWild", "foo1")]) is None  # no eager match

    middle = found(config, ("midWild", "barab"))
    assert middle == found(config, ("midWild", "bar123b"))
    assert middle.stats_key == "test-domain.midWild_bar*b"
    assert found(config, ("midWild", "barb")) == middle  # `*` matches the empty string
    assert config.lookup(DOMAIN, [("midWild", "bara")]) is None
    assert config.lookup(DOMAIN, [("midWild", "xbarb")]) is None

    multi = found(config, ("multiWild", "foo123bar456baz"))
    assert multi == found(config, ("multiWild", "foobarbaz"))
    assert multi.stats_key == "test-domain.multiWild_foo*bar*baz"
    assert config.lookup(DOMAIN, [("multiWild", "foo123baz")]) is None
    assert config.lookup(DOMAIN, [("multiWild", "bar456baz")]) is None


def test_a_plain_wildcard_counts_each_value_apart() -> None:
    config = load("wildcard")
    one, two = (("wild", "foo1"),), (("wild", "foo2"),)
    assert counter_key(DOMAIN, one, found(config, *one)) != counter_key(
        DOMAIN, two, found(config, *two)
    )


# --- TestShareThreshold --------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> RateLimitConfig:
    return load("share_threshold")


def test_share_threshold_values_share_one_counter(shared: RateLimitConfig) -> None:
    keys = set()
    for value in ("files/a.pdf", "files/b.csv", "files/c.txt"):
        limit = found(shared, ("files", value))
        assert limit.shared_values == ("files/*",)
        assert limit.requests_per_unit == 100
        assert limit.stats_key == "test-domain.files_files/*"
        keys.add(counter_key(DOMAIN, [("files", value)], limit))
    assert keys == {"test-domain_files_files/*_60"}


def test_share_threshold_before_value_to_metric_and_detailed_metric(
    shared: RateLimitConfig,
) -> None:
    route = found(shared, ("route", "api/v1"), ("method", "GET"))
    assert route.shared_values == ("api/*", None)
    assert route.stats_key == "test-domain.route_api/*.method"
    service = found(shared, ("service", "svc/user"), ("endpoint", "get"))
    assert service.shared_values == ("svc/*", None)
    assert service.detailed_metric  # its metric is named by svc/* then endpoint_get (limiter)


def test_nested_share_thresholds(shared: RateLimitConfig) -> None:
    nested = found(shared, ("nested", "parent"), ("files", "nested/file1.txt"))
    assert nested.shared_values == (None, "nested/*")
    assert nested.requests_per_unit == 200
    assert nested.stats_key == "test-domain.nested_parent.files_nested/*"
    both = found(shared, ("files", "top/file1.txt"), ("files", "nested/file1.txt"))
    assert both.shared_values == ("top/*", "nested/*")
    assert both.stats_key == "test-domain.files_top/*.files_nested/*"
    mixed = found(shared, ("path", "path/foo"), ("file", "file/doc1"), ("type", "pdf"))
    assert mixed.shared_values == ("path/*", None, None)
    assert mixed.stats_key == "test-domain.path_path/*.file_file/*.type"
    users = found(shared, ("user", "user/alice"), ("resource", "res/file1"), ("action", "read"))
    assert users.shared_values == ("user/*", "res/*", None)
    assert users.stats_key == "test-domain.user_user/*.resource_res/*.action"


def test_an_exact_value_keeps_its_own_limit_beside_a_shared_wildcard(
    shared: RateLimitConfig,
) -> None:
    exact = found(shared, ("file", "test1"))
    assert (exact.requests_per_unit, exact.shared_values) == (50, ())
    assert exact.stats_key == "test-domain.file_test1"
    for value in ("test2", "test3", "testing"):
        limit = found(shared, ("file", value))
        assert (limit.requests_per_unit, limit.shared_values) == (100, ("test*",))
        assert limit.stats_key == "test-domain.file_test*"


def test_middle_and_multiple_wildcards_share_too(shared: RateLimitConfig) -> None:
    for value in ("/api/v1", "/apiv1", "/api/internal/v1"):
        limit = found(shared, ("midpath", value))
        assert (limit.shared_values, limit.requests_per_unit) == (("/api*v1",), 100)
        assert limit.stats_key == "test-domain.midpath_/api*v1"
    assert shared.lookup(DOMAIN, [("midpath", "/api/v2")]) is None
    for value in ("svc1ep2rpc", "svcepirpc", "svc-users-ep-get-rpc"):
        limit = found(shared, ("multiroute", value))
        assert (limit.shared_values, limit.requests_per_unit) == (("svc*ep*rpc",), 50)
        assert limit.stats_key == "test-domain.multiroute_svc*ep*rpc"
    assert shared.lookup(DOMAIN, [("multiroute", "svcABCrpc")]) is None
    first = found(shared, ("midroute", "/api/v2"))
    assert (
        first.stats_key
        == "test-domain.midroute_/api*v2"
        == found(shared, ("midroute", "/api-beta-v2")).stats_key
    )
    tenant = found(shared, ("tenant", "t1prod"), ("resource", "resAv2"))
    assert tenant.shared_values == ("t*prod", "res*v2")
    assert tenant.stats_key == "test-domain.tenant_t*prod.resource_res*v2"
    again = found(shared, ("tenant", "t99prod"), ("resource", "resBBBv2"))
    assert again.stats_key == tenant.stats_key


# --- TestMetadata --------------------------------------------------------------------------


def test_a_descriptors_metadata_travels_with_its_limit() -> None:
    config = load("metadata")
    with_metadata = [
        limit
        for domain in config.domains
        for limit in _limits(config.domains[domain])
        if limit.metadata
    ]
    assert with_metadata
    for limit in with_metadata:
        assert isinstance(json.loads(limit.metadata), dict)


def _limits(node: object) -> list[RateLimit]:
    from arks.limits.config import DescriptorNode

    assert isinstance(node, DescriptorNode)
    out = [node.limit] if node.limit is not None else []
    for child in node.children():
        out += _limits(child)
    return out


# --- TestValueToMetric_* (upstream's inline configurations) --------------------------------


def tree(domain: str, *descriptors: dict) -> RateLimitConfig:
    return parse_config([("inline", {"domain": domain, "descriptors": list(descriptors)})])


def node(key: str, *children: dict, value: str | None = None, **flags: object) -> dict:
    out: dict = {"key": key, **flags}
    if value is not None:
        out["value"] = value
    if children:
        out["descriptors"] = list(children)
    return out


def leaf(key: str, rpu: int, unit: str = "minute", **flags: object) -> dict:
    return {"key": key, "rate_limit": {"unit": unit, "requests_per_unit": rpu}, **flags}


def test_value_to_metric_names_the_metric_by_the_requests_values() -> None:
    config = tree(
        "domain",
        node(
            "route",
            node("http_method", leaf("subject_id", 60), value_to_metric=True),
            value_to_metric=True,
        ),
    )
    limit = config.lookup(
        "domain", [("route", "draw"), ("http_method", "GET"), ("subject_id", "123")]
    )
    assert limit is not None
    assert limit.stats_key == "domain.route_draw.http_method_GET.subject_id"


def test_value_to_metric_at_one_level_only() -> None:
    config = tree("d", node("k1", node("k2", leaf("k3", 1, "second"), value_to_metric=True)))
    limit = config.lookup("d", [("k1", "X"), ("k2", "Y"), ("k3", "Z")])
    assert limit is not None and limit.stats_key == "d.k1.k2_Y.k3"


def test_without_value_to_metric_the_name_is_unchanged() -> None:
    config = tree("d", node("k1", node("k2", leaf("k3", 1, "second"))))
    limit = config.lookup("d", [("k1", "X"), ("k2", "Y"), ("k3", "Z")])
    assert limit is not None and limit.stats_key == "d.k1.k2.k3"


def test_value_to_metric_leaves_a_detailed_metric_alone() -> None:
    config = tree(
        "domain",
        node(
            "route",
            node("http_method", leaf("subject_id", 60, detailed_metric=True), value_to_metric=True),
            value_to_metric=True,
        ),
    )
    limit = config.lookup(
        "domain", [("route", "draw"), ("http_method", "GET"), ("subject_id", "1")]
    )
    assert limit is not None and limit.detailed_metric
    assert (
        limit.stats_key == "domain.route.http_method.subject_id"
    )  # the limiter names it by values


def test_value_to_metric_with_configured_values_and_wildcards() -> None:
    config = tree(
        "test-domain",
        node(
            "route",
            node("http_method", leaf("subject_id", 60), value="GET", value_to_metric=True),
            node("http_method", leaf("subject_id", 30), value="POST", value_to_metric=True),
            value_to_metric=True,
        ),
        node(
            "user",
            node("action", leaf("resource", 100), value="read*", value_to_metric=True),
            value_to_metric=True,
        ),
    )
    get = config.lookup(
        "test-domain", [("route", "api"), ("http_method", "GET"), ("subject_id", "u1")]
    )
    post = config.lookup(
        "test-domain", [("route", "api"), ("http_method", "POST"), ("subject_id", "u2")]
    )
    assert get is not None and post is not None
    assert (get.requests_per_unit, get.stats_key) == (
        60,
        "test-domain.route_api.http_method_GET.subject_id",
    )
    assert (post.requests_per_unit, post.stats_key) == (
        30,
        "test-domain.route_api.http_method_POST.subject_id",
    )
    read = config.lookup(
        "test-domain", [("user", "alice"), ("action", "readfile"), ("resource", "docs")]
    )
    assert read is not None
    assert read.stats_key == "test-domain.user_alice.action_readfile.resource"
