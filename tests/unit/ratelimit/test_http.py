"""The debug port's `/rlconfig` text and `/json`'s protojson, as upstream prints them."""

from __future__ import annotations

import yaml
from envoy.service.ratelimit.v3 import rls_pb2

from arks.limits.config import RateLimitConfig, parse_config
from ratelimit.http import config_dump, protojson

FILES = [
    """
domain: foo
descriptors:
  - key: k1
    value: v1
    rate_limit: {unit: minute, requests_per_unit: 10}
    descriptors:
      - key: k2
        rate_limit: {unlimited: true}
      - key: k2
        value: v2
        rate_limit: {unit: hour, requests_per_unit: 15}
  - key: j1
    value: v2
    descriptors:
      - key: j2
        value: v2
        shadow_mode: true
        quota_mode: true
        rate_limit: {unit: day, requests_per_unit: 15}
  - key: path
    value: files/*
    rate_limit: {unit: second, requests_per_unit: 1}
""",
    """
domain: bar
descriptors:
  - key: k1
    value: v1
    rate_limit: {unit: minute, requests_per_unit: 100}
""",
]


def test_rlconfig_prints_a_line_per_limit_as_upstreams_dump() -> None:
    """Upstream's own expectation of Dump() (test/provider/xds_grpc_sotw_provider_test.go), for
    the same limits: a descriptor without a limit (j1_v2) has no line here, as in its Dump."""
    config = parse_config([(f"f{i}.yaml", yaml.safe_load(text)) for i, text in enumerate(FILES)])
    dump = config_dump(config)
    assert dump.endswith("\n")
    assert dump.splitlines() == [
        "foo.k1_v1: unit=MINUTE requests_per_unit=10, shadow_mode: false, quota_mode: false",
        "foo.k1_v1.k2_v2: unit=HOUR requests_per_unit=15, shadow_mode: false, quota_mode: false",
        "foo.k1_v1.k2: unit=UNKNOWN requests_per_unit=0, shadow_mode: false, quota_mode: false",
        "foo.j1_v2.j2_v2: unit=DAY requests_per_unit=15, shadow_mode: true, quota_mode: true",
        "foo.path_files/*: unit=SECOND requests_per_unit=1, shadow_mode: false, quota_mode: false",
        "bar.k1_v1: unit=MINUTE requests_per_unit=100, shadow_mode: false, quota_mode: false",
    ]


def test_rlconfig_of_no_configuration_is_empty() -> None:
    assert config_dump(RateLimitConfig()) == ""


def test_protojson_as_upstreams_json_handler_writes_it() -> None:
    """test/server/server_impl_test.go's bodies, and a full status."""
    response = rls_pb2.RateLimitResponse
    assert protojson(response()) == b"{}"
    assert protojson(response(overall_code=response.OK)) == b'{"overallCode":"OK"}'
    assert protojson(response(overall_code=response.OVER_LIMIT)) == b'{"overallCode":"OVER_LIMIT"}'
    status = response.DescriptorStatus(
        code=response.OK,
        current_limit=response.RateLimit(requests_per_unit=3, unit=response.RateLimit.MINUTE),
        limit_remaining=2,
    )
    status.duration_until_reset.seconds = 42
    assert protojson(response(overall_code=response.OK, statuses=[status])) == (
        b'{"overallCode":"OK","statuses":[{"code":"OK","currentLimit":{"requestsPerUnit":3,'
        b'"unit":"MINUTE"},"limitRemaining":2,"durationUntilReset":"42s"}]}'
    )
