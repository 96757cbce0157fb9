"""envoyproxy/ratelimit's own unit tests replayed against our pure functions, where
test_upstream_config.py did not already: the lookups and metric names of its config tests, the
share_threshold cache keys of its base limiter test, the dumps of its xDS provider test and its
/json handler's answers. Each test names the upstream test it replays (upstream's commit and the
accounting: docs/ratelimit-compatibility.md).

Metric names: upstream's `Stats.Key` is our `RateLimit.stats_key`, and what the limiter counts
under our `key` label (`arks_ratelimit_*_total{key=...}`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from envoy.service.ratelimit.v3 import rls_pb2

from arks.limits.backends import MemoryBackend
from arks.limits.config import ConfigError, RateLimitConfig, load_config, parse_config
from arks.limits.decision import DescriptorRequest, LimitRequest, counter_key
from arks.limits.limiter import Limiter
from arks.limits.metrics import RateLimitMetrics
from arks.limits.model import RateLimit, Unit
from ratelimit.health import Health
from ratelimit.http import config_dump, service_app
from ratelimit.servicer import InvalidRequest
from ratelimit.xds_config import build_config
from rls_protos import rls_conf_pb2 as rls

CONFIG = Path(__file__).parent / "fixtures" / "upstream" / "test" / "config"
DOMAIN = "test-domain"
NOW = 1_700_000_000.0

Entries = list[tuple[str, str]]


def load(name: str) -> RateLimitConfig:
    return load_config([CONFIG / f"{name}.yaml"])


def inline(domain: str, *descriptors: dict[str, Any]) -> RateLimitConfig:
    return parse_config([("inline", {"domain": domain, "descriptors": list(descriptors)})])


def per(n: int, unit: str = "minute") -> dict[str, Any]:
    return {"unit": unit, "requests_per_unit": n}


def limit_of(config: RateLimitConfig, domain: str, entries: Entries) -> RateLimit:
    found = config.lookup(domain, entries)
    assert found is not None, entries
    return found


async def counted_key(config: RateLimitConfig, domain: str, entries: Entries) -> str:
    """The `key` label the limiter counts one call's hit under: what upstream's stats name."""
    metrics = RateLimitMetrics.create()
    limiter = Limiter(lambda: config, MemoryBackend(), metrics, lambda: NOW)
    await limiter.decide(LimitRequest(domain, (DescriptorRequest(tuple(entries)),)))
    (hits,) = (m for m in metrics.registry.collect() if m.name == "arks_ratelimit_hits")
    (counted,) = {s.labels["key"] for s in hits.samples if s.name.endswith("_total") and s.value}
    return counted


# --- test/config/config_test.go ------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([("key1", "something")], None),
        ([("key1", "value1")], None),  # no limit at the first level
        ([("key2", "value2"), ("subkey", "subvalue")], None),  # deeper than the tree
        ([("key5", "value5"), ("subkey5", "subvalue")], None),
        (
            [("key1", "value1"), ("subkey1", "something")],
            (5, Unit.SECOND, "", "key1_value1.subkey1"),
        ),
        (
            [("key1", "value1"), ("subkey1", "subvalue1")],
            (10, Unit.SECOND, "", "key1_value1.subkey1_subvalue1"),
        ),
        ([("key2", "something")], (20, Unit.MINUTE, "", "key2")),
        ([("key2", "value2")], (30, Unit.MINUTE, "", "key2_value2")),
        ([("key2", "value3")], None),  # a value without a limit: no limit, not the key's
        ([("key3", "foo")], (1, Unit.HOUR, "", "key3")),
        ([("key4", "foo")], (1, Unit.DAY, "key4_rate_limit", "key4")),
    ],
)
def test_basic_config_lookups_and_metric_names(
    entries: Entries, expected: tuple[int, Unit, str, str] | None
) -> None:
    """TestBasicConfig: each descriptor's limit (count, unit, name) and its stats key."""
    config = load("basic_config")
    assert config.lookup("foo_domain", []) is None and config.lookup(DOMAIN, []) is None
    found = config.lookup(DOMAIN, entries)
    if expected is None:
        assert found is None
        return
    assert found is not None
    count, unit, name, path = expected
    assert (found.requests_per_unit, found.unit, found.name) == (count, unit, name)
    assert found.stats_key == f"{DOMAIN}.{path}"


def test_basic_config_unlimited_key() -> None:
    """TestBasicConfig: key6 is unlimited (and counted under test-domain.key6)."""
    key6 = limit_of(load("basic_config"), DOMAIN, [("key6", "foo")])
    assert key6.unlimited and key6.stats_key == f"{DOMAIN}.key6"


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (
            [("key1", "value1"), ("subkey1", "something")],
            (5, Unit.SECOND, False, "key1_value1.subkey1"),
        ),
        (
            [("key1", "value1"), ("subkey1", "subvalue1")],
            (10, Unit.SECOND, True, "key1_value1.subkey1_subvalue1"),
        ),
        ([("key2", "something")], (20, Unit.MINUTE, True, "key2")),
        ([("key2", "value2")], (30, Unit.MINUTE, False, "key2_value2")),
    ],
)
def test_shadow_mode_is_per_descriptor(
    entries: Entries, expected: tuple[int, Unit, bool, str]
) -> None:
    """TestShadowModeConfig: shadow_mode belongs to the descriptor that sets it, not its
    siblings or children."""
    found = limit_of(load("shadowmode_config"), DOMAIN, entries)
    count, unit, shadow, path = expected
    assert (found.requests_per_unit, found.unit, found.shadow_mode) == (count, unit, shadow)
    assert found.stats_key == f"{DOMAIN}.{path}"


def test_metadata_values_travel_with_their_limits() -> None:
    """TestMetadata: the limits of metadata.yaml and the metadata each carries."""
    config = load("metadata")
    assert config.domains and config.lookup(DOMAIN, []) is None
    sub = limit_of(config, DOMAIN, [("key1", "value1"), ("subkey1", "something")])
    assert (sub.requests_per_unit, sub.unit, sub.stats_key) == (
        5,
        Unit.SECOND,
        f"{DOMAIN}.key1_value1.subkey1",
    )
    assert orjson.loads(sub.metadata)["name"] == "service_1"
    key2 = limit_of(config, DOMAIN, [("key2", "something")])
    assert (key2.requests_per_unit, key2.unit, key2.stats_key) == (
        20,
        Unit.MINUTE,
        f"{DOMAIN}.key2",
    )
    assert orjson.loads(key2.metadata)["service_with_quota"]["name"] == "service_2"


@pytest.mark.parametrize(
    ("name", "named"),
    [
        ("empty_domain", "domain"),
        ("empty_key", "key"),
        ("duplicate_key", "'key1', value 'value1'"),
        ("bad_limit_unit", "'foo'"),
        ("replaces_self", "'self'"),
        ("replaces_empty", "replaces[0].name"),
        ("bad_yaml", "unexpected end of stream"),
        ("misspelled_key", "ratelimit"),
        ("misspelled_key2", "requestsperunit"),
        ("non_string_key", "0.25"),
        ("non_map_list", "'a'"),
        ("unlimited_with_unit", "unlimited"),
    ],
)
def test_each_refusal_names_what_upstreams_message_names(name: str, named: str) -> None:
    """TestEmptyDomain … TestUnlimitedWithRateLimitUnit: upstream's panic message names the file
    and the culprit; ours is worded our way (file: path: problem) and names the same culprit."""
    with pytest.raises(ConfigError) as caught:
        load(name)
    assert caught.value.file.endswith(f"{name}.yaml")
    assert named in str(caught.value)


def test_duplicate_domain_names_the_domain_and_the_second_file() -> None:
    """TestDuplicateDomain: the second file of a domain is the one refused, naming the domain."""
    with pytest.raises(ConfigError) as caught:
        load_config([CONFIG / "basic_config.yaml", CONFIG / "duplicate_domain.yaml"])
    assert caught.value.file.endswith("duplicate_domain.yaml")
    assert "duplicate domain 'test-domain'" in caught.value.problem


NESTED = {
    "key": "key-1",
    "rate_limit": per(100),
    "descriptors": [{"key": "key-2", "rate_limit": per(5)}],
}


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([("key-1", "value-1")], "nested.key-1"),
        ([("key-1", "value-1"), ("key-2", "value-2")], "nested.key-1.key-2"),
    ],
)
async def test_without_detailed_metric_the_key_names_no_value(
    entries: Entries, expected: str
) -> None:
    """TestDetailedMetric, its cases without detailed_metric: the name has keys only."""
    assert await counted_key(inline("nested", NESTED), "nested", entries) == expected


def test_value_to_metric_at_the_top_names_its_value() -> None:
    """TestValueToMetric_DefaultKeyIncludesValueAtThatLevel."""
    config = inline(
        "d",
        {
            "key": "k1",
            "value_to_metric": True,
            "descriptors": [{"key": "k2", "rate_limit": per(1)}],
        },
    )
    assert limit_of(config, "d", [("k1", "A"), ("k2", "foo")]).stats_key == "d.k1_A.k2"


@pytest.mark.parametrize(
    ("route", "method", "expected"),
    [
        ("", "GET", "domain.route.http_method_GET.subject_id"),
        ("draw", "", "domain.route_draw.http_method.subject_id"),
        ("", "", "domain.route.http_method.subject_id"),
    ],
)
async def test_value_to_metric_leaves_an_empty_value_out(
    route: str, method: str, expected: str
) -> None:
    """TestValueToMetric_WithEmptyValue: no `_` and no value for an empty value."""
    config = inline(
        "domain",
        {
            "key": "route",
            "value_to_metric": True,
            "descriptors": [
                {
                    "key": "http_method",
                    "value_to_metric": True,
                    "descriptors": [{"key": "subject_id", "rate_limit": per(60)}],
                }
            ],
        },
    )
    entries = [("route", route), ("http_method", method), ("subject_id", "123")]
    assert limit_of(config, "domain", entries).stats_key == expected
    assert await counted_key(config, "domain", entries) == expected


@pytest.mark.parametrize(
    ("value", "flags", "asked", "expected"),
    [
        ("foo*", {}, ["foo1"], "wild_foo*"),
        ("foo*", {"value_to_metric": True}, ["foo1"], "wild_foo1"),
        ("foo*", {"share_threshold": True}, ["foo1"], "wild_foo*"),
        ("foo*", {"share_threshold": True, "value_to_metric": True}, ["foo1"], "wild_foo*"),
        ("foo*bar*", {}, ["foo123bar456", "fooXbarY"], "wild_foo*bar*"),
        ("foo*bar*", {"value_to_metric": True}, ["foo123bar456"], "wild_foo123bar456"),
    ],
)
async def test_wildcard_metric_names_by_flag(
    value: str, flags: dict[str, bool], asked: list[str], expected: str
) -> None:
    """TestWildcardStatsBehavior: a wildcard names its pattern, value_to_metric the request's
    value, share_threshold the pattern over value_to_metric; trailing or middle `*` alike."""
    config = inline(DOMAIN, {"key": "wild", "value": value, "rate_limit": per(20), **flags})
    for asked_value in asked:
        assert limit_of(config, DOMAIN, [("wild", asked_value)]).stats_key == f"{DOMAIN}.{expected}"
        assert await counted_key(config, DOMAIN, [("wild", asked_value)]) == f"{DOMAIN}.{expected}"


def test_a_wildcard_keeps_its_pattern_when_value_to_metric_is_on_another_level() -> None:
    """TestWildcardStatsBehavior: value_to_metric in other descriptor."""
    config = inline(
        DOMAIN,
        {
            "key": "wild",
            "value": "foo*",
            "descriptors": [
                {
                    "key": "other",
                    "value_to_metric": True,
                    "descriptors": [{"key": "limit", "rate_limit": per(20)}],
                }
            ],
        },
    )
    entries = [("wild", "foo1"), ("other", "bar"), ("limit", "X")]
    assert limit_of(config, DOMAIN, entries).stats_key == f"{DOMAIN}.wild_foo*.other_bar.limit"


# --- test/limiter/base_limiter_test.go ------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "other_values"),
    [
        ([("files", "files/a.pdf")], ["files/c.txt", "files/subdir/f.txt"]),
        ([("nested", "parent"), ("files", "nested/file1.txt")], ["nested/file2.csv"]),
        ([("files", "top/file1.txt"), ("files", "nested/sub1.txt")], ["nested/sub2.csv"]),
    ],
)
def test_share_threshold_values_share_one_counter_key(
    entries: Entries, other_values: list[str]
) -> None:
    """TestGenerateCacheKeysWithShareThreshold: every value a share_threshold wildcard matches,
    at any level, gives one counter key (the pattern in place of the value)."""
    config = load("share_threshold")
    first = counter_key(DOMAIN, entries, limit_of(config, DOMAIN, entries))
    assert "*" in first
    for value in other_values:
        other = [*entries[:-1], (entries[-1][0], value)]
        assert counter_key(DOMAIN, other, limit_of(config, DOMAIN, other)) == first


# --- test/provider/xds_grpc_sotw_provider_test.go -------------------------------------------


def policy(unit: int, count: int) -> rls.RateLimitPolicy:
    return rls.RateLimitPolicy(unit=unit, requests_per_unit=count)  # type: ignore[arg-type]


UNLIMITED = rls.RateLimitPolicy(unlimited=True)


def resource(name: str, domain: str, *descriptors: rls.RateLimitDescriptor) -> rls.RateLimitConfig:
    return rls.RateLimitConfig(name=name, domain=domain, descriptors=descriptors)


def limited(key: str, value: str, unit: int, count: int) -> rls.RateLimitDescriptor:
    return rls.RateLimitDescriptor(key=key, value=value, rate_limit=policy(unit, count))


def dump_lines(*resources: rls.RateLimitConfig, merge: bool = False) -> list[str]:
    return sorted(config_dump(build_config(resources, merge_domains=merge)).splitlines())


def line(path: str, unit: str, count: int, shadow: bool = False, quota: bool = False) -> str:
    return (
        f"{path}: unit={unit} requests_per_unit={count}, "
        f"shadow_mode: {str(shadow).lower()}, quota_mode: {str(quota).lower()}"
    )


def test_xds_initial_and_updated_configs_dump_as_upstreams() -> None:
    """TestXdsProvider: the initial config, a new one, then two domains."""
    assert config_dump(
        build_config([resource("foo", "foo", limited("k1", "v1", rls.MINUTE, 3))])
    ) == (line("foo.k1_v1", "MINUTE", 3) + "\n")
    assert dump_lines(resource("foo", "foo", limited("k2", "v2", rls.MINUTE, 5))) == [
        line("foo.k2_v2", "MINUTE", 5)
    ]
    assert dump_lines(
        resource("foo", "foo", limited("k1", "v1", rls.MINUTE, 10)),
        resource("bar", "bar", limited("k1", "v1", rls.MINUTE, 100)),
    ) == sorted([line("foo.k1_v1", "MINUTE", 10), line("bar.k1_v1", "MINUTE", 100)])


def test_xds_deeper_limits_dump_as_upstreams() -> None:
    """TestXdsProvider, "limits with deeper xDS config update": unlimited limits dump as UNKNOWN
    and 0; shadow and quota mode per line."""
    d = rls.RateLimitDescriptor
    foo = resource(
        "foo",
        "foo",
        d(
            key="k1",
            value="v1",
            rate_limit=policy(rls.MINUTE, 10),
            descriptors=[d(key="k2", rate_limit=UNLIMITED), limited("k2", "v2", rls.HOUR, 15)],
        ),
        d(
            key="j1",
            value="v2",
            rate_limit=UNLIMITED,
            descriptors=[
                d(key="j2", rate_limit=UNLIMITED),
                d(
                    key="j2",
                    value="v2",
                    rate_limit=policy(rls.DAY, 15),
                    shadow_mode=True,
                    quota_mode=True,
                ),
            ],
        ),
    )
    bar = resource("bar", "bar", limited("k1", "v1", rls.MINUTE, 100))
    assert dump_lines(foo, bar) == sorted(
        [
            line("foo.k1_v1", "MINUTE", 10),
            line("foo.k1_v1.k2", "UNKNOWN", 0),
            line("foo.k1_v1.k2_v2", "HOUR", 15),
            line("foo.j1_v2", "UNKNOWN", 0),
            line("foo.j1_v2.j2", "UNKNOWN", 0),
            line("foo.j1_v2.j2_v2", "DAY", 15, shadow=True, quota=True),
            line("bar.k1_v1", "MINUTE", 100),
        ]
    )


def test_xds_one_domain_in_two_resources_merges_when_asked() -> None:
    """TestXdsProvider, "same domain multiple times" (with MERGE_DOMAIN_CONFIG)."""
    first = resource("foo-1", "foo", limited("k1", "v1", rls.MINUTE, 10))
    second = resource("foo-2", "foo", limited("k1", "v2", rls.MINUTE, 100))
    assert dump_lines(first, second, merge=True) == sorted(
        [line("foo.k1_v1", "MINUTE", 10), line("foo.k1_v2", "MINUTE", 100)]
    )


# --- test/server/server_impl_test.go --------------------------------------------------------

Answerer = Callable[[rls_pb2.RateLimitRequest], Awaitable[rls_pb2.RateLimitResponse]]
_Response = rls_pb2.RateLimitResponse


def answering(response: _Response | Exception, asked: list[rls_pb2.RateLimitRequest]) -> Answerer:
    async def answer(request: rls_pb2.RateLimitRequest) -> _Response:
        asked.append(request)
        if isinstance(response, Exception):
            raise response
        return response

    return answer


@pytest.mark.parametrize(
    ("body", "response", "status", "content_type", "text"),
    [
        ("", _Response(), 400, "text/plain; charset=utf-8", "Bad Request\n"),
        ("}", _Response(), 400, "text/plain; charset=utf-8", "Bad Request\n"),
        ('{"domain": "foo"}', _Response(), 500, "application/json", "{}"),  # no overall code
        (
            '{"domain": "foo"}',
            InvalidRequest("rate limit descriptor list must not be empty"),
            400,
            "text/plain; charset=utf-8",
            "Bad Request\n",
        ),
        (
            '{"domain": "foo"}',
            RuntimeError("a failure of our own"),
            500,
            "text/plain; charset=utf-8",
            "Internal Server Error\n",
        ),
        (
            '{"domain": "foo"}',
            _Response(overall_code=_Response.OK),
            200,
            "application/json",
            '{"overallCode":"OK"}',
        ),
        (
            '{"domain": "foo"}',
            _Response(overall_code=_Response.OVER_LIMIT),
            429,
            "application/json",
            '{"overallCode":"OVER_LIMIT"}',
        ),
    ],
    ids=["no-body", "not-json", "unknown-code", "service-error", "own-failure", "ok", "over"],
)
async def test_json_handler_answers_as_upstreams(
    body: str, response: _Response | Exception, status: int, content_type: str, text: str
) -> None:
    """TestJsonHandler: each case's status, content type and body; the service is asked with the
    request the body holds. Upstream answers 500 for a nil response or one it cannot marshal
    (Go's); ours for a failure of its own ("own-failure")."""
    asked: list[rls_pb2.RateLimitRequest] = []
    client = TestClient(TestServer(service_app(Health(), answering(response, asked))))
    await client.start_server()
    try:
        answer = await client.post("/json", data=body)
        assert (answer.status, answer.headers["Content-Type"], await answer.text()) == (
            status,
            content_type,
            text,
        )
    finally:
        await client.close()
    if body.startswith("{"):
        assert asked == [rls_pb2.RateLimitRequest(domain="foo")]


# detailed_metric: the stats key names the domain and the request's values -----------------------

DETAILED_NESTED = {**NESTED, "detailed_metric": True}
DETAILED_NESTED["descriptors"] = [{"key": "key-2", "rate_limit": per(5), "detailed_metric": True}]
REALISTIC = [
    {"key": "key_1", "rate_limit": per(500), "detailed_metric": True},
    {"key": "key_1", "value": "some-value-for-key-1", "rate_limit": per(500)},
    *(
        {
            "key": "key_2",
            **({"value": value} if value else {}),
            "rate_limit": per(top),
            "detailed_metric": True,
            "descriptors": [
                {"key": "key_3", "detailed_metric": True},
                {
                    "key": "key_3",
                    "value": "requested-key3-value",
                    "rate_limit": per(inner),
                    "detailed_metric": True,
                },
            ],
        }
        for value, top, inner in (("", 5000, 5), ("specific-id", 50000, 100))
    ),
]


@pytest.mark.parametrize(
    ("descriptors", "entries", "expected"),
    [
        ([DETAILED_NESTED], [("key-1", "value-1")], "nested.key-1_value-1"),
        (
            [DETAILED_NESTED],
            [("key-1", "value-1"), ("key-2", "value-2")],
            "nested.key-1_value-1.key-2_value-2",
        ),
        (REALISTIC, [("key_1", "value-for-key-1")], "nested.key_1_value-for-key-1"),
        (REALISTIC, [("key_2", "key-2-value")], "nested.key_2_key-2-value"),
        (
            REALISTIC,
            [("key_2", "key-2-value"), ("key_3", "requested-key3-value")],
            "nested.key_2_key-2-value.key_3_requested-key3-value",
        ),
    ],
)
async def test_detailed_metric_names_the_domain_and_every_value(
    descriptors: list[dict[str, Any]], entries: Entries, expected: str
) -> None:
    """TestDetailedMetric, its cases with detailed_metric."""
    assert await counted_key(inline("nested", *descriptors), "nested", entries) == expected


async def test_basic_config_detailed_metric_key() -> None:
    """TestBasicConfig: key7 (detailed_metric) counts under test-domain.key7_<value>."""
    for value in ("unspecified_value", "another_value"):
        assert await counted_key(load("basic_config"), DOMAIN, [("key7", value)]) == (
            f"{DOMAIN}.key7_{value}"
        )


async def test_value_to_metric_leaves_a_detailed_metric_alone_in_the_name() -> None:
    """TestValueToMetric_DoesNotOverrideDetailedMetric."""
    config = inline(
        "domain",
        {
            "key": "route",
            "value_to_metric": True,
            "descriptors": [
                {
                    "key": "http_method",
                    "value_to_metric": True,
                    "descriptors": [
                        {"key": "subject_id", "detailed_metric": True, "rate_limit": per(60)}
                    ],
                }
            ],
        },
    )
    entries = [("route", "draw"), ("http_method", "GET"), ("subject_id", "123")]
    assert await counted_key(config, "domain", entries) == (
        "domain.route_draw.http_method_GET.subject_id_123"
    )


async def test_share_threshold_names_its_pattern_in_a_detailed_metric() -> None:
    """TestShareThreshold, "share_threshold with metrics" (detailed_metric)."""
    entries = [("service", "svc/user"), ("endpoint", "get")]
    assert await counted_key(load("share_threshold"), DOMAIN, entries) == (
        f"{DOMAIN}.service_svc/*.endpoint_get"
    )
