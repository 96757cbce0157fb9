"""Envoy's rate-limit protobufs to our types and back."""

from __future__ import annotations

import math

from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import duration_pb2

from arks.limits.decision import Answer, DescriptorRequest, LimitRequest
from arks.limits.model import RateLimit, Unit

_Response = rls_pb2.RateLimitResponse
_UNIT_NAMES = {u: u.name for u in Unit}


def request(message: rls_pb2.RateLimitRequest) -> LimitRequest:
    descriptors = []
    for d in message.descriptors:
        override = None
        if d.HasField("limit"):
            unit_name = _Response.RateLimit.Unit.Name(d.limit.unit)
            if unit_name in Unit.__members__:
                override = RateLimit(d.limit.requests_per_unit, Unit[unit_name], name="override")
        hits = d.hits_addend.value if d.HasField("hits_addend") else None
        descriptors.append(
            DescriptorRequest(tuple((e.key, e.value) for e in d.entries), override, hits)
        )
    return LimitRequest(message.domain, tuple(descriptors), message.hits_addend)


UNLIMITED_REMAINING = 2**32 - 1  # envoyproxy/ratelimit's limit_remaining of an unlimited descriptor


def _duration(seconds: float) -> duration_pb2.Duration:
    """Whole seconds, as upstream computes it (the window's length minus the whole seconds of
    it gone: 1 to the window's length, never 0 for a window still open)."""
    return duration_pb2.Duration(seconds=max(1, math.ceil(seconds)))


def response(answer: Answer) -> rls_pb2.RateLimitResponse:
    statuses = []
    for status in answer.statuses:
        item = _Response.DescriptorStatus(
            code=_Response.OVER_LIMIT if status.over_limit else _Response.OK
        )
        if status.unlimited:
            item.limit_remaining = UNLIMITED_REMAINING
        if status.limit is not None:
            item.current_limit.CopyFrom(
                _Response.RateLimit(
                    name=status.limit.name,
                    requests_per_unit=status.limit.requests_per_unit,
                    unit=_Response.RateLimit.Unit.Value(_UNIT_NAMES[status.limit.unit]),
                )
            )
            item.limit_remaining = status.remaining
            item.duration_until_reset.CopyFrom(_duration(status.reset_s))
        statuses.append(item)
    return _Response(
        overall_code=_Response.OVER_LIMIT if answer.over_limit else _Response.OK,
        statuses=statuses,
        response_headers_to_add=[base_pb2.HeaderValue(key=k, value=v) for k, v in answer.headers],
        raw_body=answer.body,
    )
