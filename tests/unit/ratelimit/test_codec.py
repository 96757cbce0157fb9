"""Envoy's rate-limit messages: the response dynamic metadata (upstream's
RESPONSE_DYNAMIC_METADATA, its service/ratelimit.go `ratelimitToMetadata`)."""

from __future__ import annotations

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common
from envoy.service.ratelimit.v3 import rls_pb2
from envoy.type.v3 import ratelimit_unit_pb2 as units
from google.protobuf import json_format

from arks.limits.decision import Answer, Status
from arks.limits.model import RateLimit, Unit
from ratelimit import codec


def descriptor(*entries: tuple[str, str]) -> common.RateLimitDescriptor:
    return common.RateLimitDescriptor(
        entries=[common.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )


def test_the_request_is_echoed_with_overrides_as_gos_text_and_hits() -> None:
    overridden = descriptor(("user", "a"), ("model", "m"))
    overridden.limit.requests_per_unit = 10
    overridden.limit.unit = units.MINUTE
    overridden.hits_addend.value = 0  # set, even at 0: echoed
    unit_only = descriptor(("k", ""))
    unit_only.limit.unit = units.DAY  # requests_per_unit at 0: left out of the text, as Go's
    message = rls_pb2.RateLimitRequest(domain="d", descriptors=[overridden, unit_only])
    got = json_format.MessageToDict(codec.dynamic_metadata(message, Answer(False, ())))
    assert got == {
        "domain": "d",
        "descriptors": [
            {
                "entries": ["user=a", "model=m"],
                "limit": "requests_per_unit:10 unit:MINUTE",
                "hitsAddend": 0.0,
            },
            {"entries": ["k="], "limit": "unit:DAY"},
        ],
    }


def test_the_metadata_of_passing_limits_is_merged_and_set_only_when_asked() -> None:
    gold = RateLimit(1, Unit.MINUTE, metadata='{"tier":{"name":"gold"}}')
    eu = RateLimit(1, Unit.MINUTE, metadata='{"tier":{"name":"x","region":"eu"}}')
    answer = Answer(False, (Status(False, gold), Status(False, eu)))
    message = rls_pb2.RateLimitRequest(domain="d", descriptors=[descriptor(("a", "1"))] * 2)
    meta = codec.dynamic_metadata(message, answer)
    assert json_format.MessageToDict(meta)["metadata"] == {"tier": {"name": "gold", "region": "eu"}}
    assert codec.response(answer, dynamic_metadata=meta).dynamic_metadata == meta
    assert not codec.response(answer).HasField("dynamic_metadata")  # off by default, as upstream
