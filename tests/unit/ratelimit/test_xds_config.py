"""RateLimitConfig resources to the configuration, and the xDS settings: pure, no stream."""

from __future__ import annotations

import argparse

import pytest
import yaml
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, struct_pb2

from arks.limits.config import ConfigError, parse_config
from arks.limits.model import Unit
from ratelimit.xds_config import (
    RATE_LIMIT_CONFIG,
    ResourceError,
    build_config,
    config_document,
    decode,
    go_duration,
    header_map,
    node_metadata,
)
from rls_protos import rls_conf_pb2 as rls

# The same configuration as a YAML file and as a resource.
YAML = """
domain: api
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 3, name: per_user}
    descriptors:
      - key: model
        value: big
        shadow_mode: true
        rate_limit: {unit: week, requests_per_unit: 100, replaces: [{name: per_user}]}
  - key: vip
    rate_limit: {unlimited: true}
  - key: tenant
    quota_mode: true
    detailed_metric: true
    metadata: {team: infra, weight: 2.0}  # a Struct number is a double
    rate_limit: {unit: day, requests_per_unit: 10}
"""


def resource(name: str = "api", domain: str = "api") -> rls.RateLimitConfig:
    metadata = struct_pb2.Struct()
    metadata.update({"team": "infra", "weight": 2})
    return rls.RateLimitConfig(
        name=name,
        domain=domain,
        descriptors=[
            rls.RateLimitDescriptor(
                key="user",
                rate_limit=rls.RateLimitPolicy(
                    unit=rls.MINUTE, requests_per_unit=3, name="per_user"
                ),
                descriptors=[
                    rls.RateLimitDescriptor(
                        key="model",
                        value="big",
                        shadow_mode=True,
                        rate_limit=rls.RateLimitPolicy(
                            unit=rls.WEEK,
                            requests_per_unit=100,
                            replaces=[rls.RateLimitReplace(name="per_user")],
                        ),
                    )
                ],
            ),
            rls.RateLimitDescriptor(key="vip", rate_limit=rls.RateLimitPolicy(unlimited=True)),
            rls.RateLimitDescriptor(
                key="tenant",
                quota_mode=True,
                detailed_metric=True,
                metadata=metadata,
                rate_limit=rls.RateLimitPolicy(unit=rls.DAY, requests_per_unit=10),
            ),
        ],
    )


def test_a_resource_reads_as_the_same_yaml_file_would() -> None:
    from_xds = build_config([resource()])
    from_yaml = parse_config([("RateLimitConfig 'api'", yaml.safe_load(YAML))])
    assert from_xds == from_yaml
    nested = from_xds.lookup("api", [("user", "u"), ("model", "big")])
    assert nested is not None
    assert (nested.unit, nested.shadow_mode, nested.replaces) == (Unit.WEEK, True, ("per_user",))
    vip = from_xds.lookup("api", [("vip", "x")])
    assert vip is not None and vip.unlimited
    tenant = from_xds.lookup("api", [("tenant", "t")])
    assert tenant is not None and (tenant.quota_mode, tenant.detailed_metric) == (True, True)
    assert tenant.metadata == '{"team":"infra","weight":2.0}'  # a Struct's numbers are doubles


def test_unset_fields_are_left_out_of_the_document() -> None:
    document = config_document(
        rls.RateLimitConfig(
            domain="d",
            descriptors=[
                rls.RateLimitDescriptor(key="k", rate_limit=rls.RateLimitPolicy(unlimited=True))
            ],
        )
    )
    assert document == {
        "domain": "d",
        "descriptors": [{"key": "k", "rate_limit": {"requests_per_unit": 0, "unlimited": True}}],
    }


@pytest.mark.parametrize(
    ("broken", "error"),
    [
        (
            rls.RateLimitDescriptor(key="k", rate_limit=rls.RateLimitPolicy(requests_per_unit=1)),
            "RateLimitConfig 'r': descriptors[0].rate_limit.unit: required",
        ),
        (
            rls.RateLimitDescriptor(
                key="k", rate_limit=rls.RateLimitPolicy(unit=rls.SECOND, unlimited=True)
            ),
            "RateLimitConfig 'r': descriptors[0].rate_limit.unit: must not be set when unlimited",
        ),
        (
            rls.RateLimitDescriptor(key="", rate_limit=rls.RateLimitPolicy(unlimited=True)),
            "RateLimitConfig 'r': descriptors[0].key: must not be empty",
        ),
        (
            rls.RateLimitDescriptor(
                key="k",
                rate_limit=rls.RateLimitPolicy(unit=9, requests_per_unit=1),  # type: ignore[arg-type]
            ),
            "RateLimitConfig 'r': descriptors[0].rate_limit.unit: unknown unit '9'",
        ),
        (
            rls.RateLimitDescriptor(
                key="k",
                rate_limit=rls.RateLimitPolicy(
                    unit=rls.SECOND, requests_per_unit=1, replaces=[rls.RateLimitReplace()]
                ),
            ),
            "RateLimitConfig 'r': descriptors[0].rate_limit.replaces[0].name: must not be empty",
        ),
    ],
    ids=["no-unit", "unlimited-with-unit", "empty-key", "unknown-unit", "empty-replaces"],
)
def test_a_bad_resource_is_an_error_naming_it_and_the_path(
    broken: rls.RateLimitDescriptor, error: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config([rls.RateLimitConfig(name="r", domain="d", descriptors=[broken])])
    assert str(caught.value).startswith(error)


def test_a_domain_in_two_resources_is_an_error_unless_merged() -> None:
    first = resource("first")
    second = rls.RateLimitConfig(
        name="second",
        domain="api",
        descriptors=[
            rls.RateLimitDescriptor(key="other", rate_limit=first.descriptors[1].rate_limit)
        ],
    )
    with pytest.raises(ConfigError, match="RateLimitConfig 'second': domain: duplicate domain"):
        build_config([first, second])
    merged = build_config([first, second], merge_domains=True)
    assert merged.lookup("api", [("other", "x")]) is not None
    assert merged.lookup("api", [("user", "u")]) is not None


def test_no_resource_is_an_empty_configuration() -> None:
    assert build_config([]).domains == {}


def packed(message: rls.RateLimitConfig | struct_pb2.Struct) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


def test_a_response_is_decoded_only_when_every_resource_is_a_rate_limit_config() -> None:
    good = discovery_pb2.DiscoveryResponse(
        type_url=RATE_LIMIT_CONFIG, resources=[packed(resource())]
    )
    assert decode(good) == [resource()]
    mixed = discovery_pb2.DiscoveryResponse(
        type_url=RATE_LIMIT_CONFIG, resources=[packed(resource()), packed(struct_pb2.Struct())]
    )
    with pytest.raises(ResourceError, match=r"resources\[1\] is a type.googleapis.com/google"):
        decode(mixed)
    with pytest.raises(ResourceError, match="a response of type"):
        decode(discovery_pb2.DiscoveryResponse(type_url="type.googleapis.com/x.Y"))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3s", 3.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("2", 2.0),
        ("250us", 0.00025),
    ],
)
def test_upstream_durations_read_as_go_writes_them(text: str, seconds: float) -> None:
    assert go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["s", "3 s", "3sec", "-", "1m30", ""])
def test_a_malformed_duration_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        go_duration(text)


def test_node_metadata_and_headers_as_upstream_reads_them() -> None:
    # getClientNode splits on "=" once and skips an entry without one.
    assert node_metadata("a=1,b=x=y,bad,c=") == (("a", "1"), ("b", "x=y"), ("c", ""))
    assert node_metadata("") == ()
    # envconfig's map: k:v pairs.
    assert header_map("X-Token:abc, b:c:d") == (("x-token", "abc"), ("b", "c:d"))
    with pytest.raises(argparse.ArgumentTypeError):
        header_map("novalue")
