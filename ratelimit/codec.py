"""Envoy's rate-limit protobufs to our types and back."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import struct_pb2

from arks.limits.decision import Answer, DescriptorRequest, LimitRequest, Status, passed_metadata
from arks.limits.model import RateLimit, Unit

_Response = rls_pb2.RateLimitResponse
_OK, _OVER_LIMIT = _Response.OK, _Response.OVER_LIMIT
_UNIT_NUMBERS = {u.value: _Response.RateLimit.Unit.Value(u.name) for u in Unit}


def request(message: rls_pb2.RateLimitRequest) -> LimitRequest:
    descriptors = []
    for d in message.descriptors:
        override = None
        if d.HasField("limit"):
            unit_name = _Response.RateLimit.Unit.Name(d.limit.unit)
            if unit_name in Unit.__members__:
                # Unnamed, as upstream's (its stats keep one series for every override: our
                # metrics' cardinality rule, where upstream names one per descriptor value).
                override = RateLimit(d.limit.requests_per_unit, Unit[unit_name])
        hits = d.hits_addend.value if d.HasField("hits_addend") else None
        descriptors.append(
            DescriptorRequest(tuple((e.key, e.value) for e in d.entries), override, hits)
        )
    return LimitRequest(message.domain, tuple(descriptors), message.hits_addend)


UNLIMITED_REMAINING = 2**32 - 1  # envoyproxy/ratelimit's limit_remaining of an unlimited descriptor


@dataclass(frozen=True)
class HeaderNames:
    """envoyproxy/ratelimit's response headers (LIMIT_RESPONSE_HEADERS_ENABLED and the names
    LIMIT_LIMIT_HEADER, LIMIT_REMAINING_HEADER, LIMIT_RESET_HEADER; these are its defaults)."""

    limit: str = "RateLimit-Limit"
    remaining: str = "RateLimit-Remaining"
    reset: str = "RateLimit-Reset"


def _headers(answer: Answer, names: HeaderNames) -> list[base_pb2.HeaderValue]:
    """Upstream's choice: the descriptor with the least remaining, or the last one over its
    limit; its limit (the count alone), what remains, and the whole seconds to its reset."""
    chosen: Status | None = None
    least = UNLIMITED_REMAINING
    for status in answer.statuses:
        if status.limit is not None and status.remaining < least:
            chosen, least = status, status.remaining
        if status.over_limit and not status.quota_mode:
            chosen, least = status, 0
    if chosen is None or chosen.limit is None:
        return []
    return [
        base_pb2.HeaderValue(key=names.limit, value=str(chosen.limit.requests_per_unit)),
        base_pb2.HeaderValue(key=names.remaining, value=str(chosen.remaining)),
        base_pb2.HeaderValue(key=names.reset, value=str(max(1, math.ceil(chosen.reset_s)))),
    ]


def _override_text(limit: ratelimit_pb2.RateLimitDescriptor.RateLimitOverride) -> str:
    """A descriptor's limit override as Go's String() of it prints (its text format on one line:
    the fields not at their zero value, `name:value`)."""
    parts = []
    if limit.requests_per_unit:
        parts.append(f"requests_per_unit:{limit.requests_per_unit}")
    if limit.unit:
        names = limit.DESCRIPTOR.fields_by_name["unit"].enum_type.values_by_number
        parts.append(f"unit:{names[limit.unit].name if limit.unit in names else limit.unit}")
    return " ".join(parts)


def dynamic_metadata(message: rls_pb2.RateLimitRequest, answer: Answer) -> struct_pb2.Struct:
    """What envoyproxy/ratelimit's RESPONSE_DYNAMIC_METADATA puts in the response: the request's
    domain, its descriptors (entries as `key=value`, a limit override as text, a hits_addend),
    its hits_addend when not 0, and the merged `metadata` of the limits that passed, if any."""
    descriptors = []
    for d in message.descriptors:
        item: dict[str, object] = {"entries": [f"{e.key}={e.value}" for e in d.entries]}
        if d.HasField("limit"):
            item["limit"] = _override_text(d.limit)
        if d.HasField("hits_addend"):
            item["hitsAddend"] = float(d.hits_addend.value)
        descriptors.append(item)
    fields: dict[str, object] = {"domain": message.domain, "descriptors": descriptors}
    if message.hits_addend:
        fields["hitsAddend"] = float(message.hits_addend)
    merged = passed_metadata(answer)
    if merged:
        fields["metadata"] = merged
    out = struct_pb2.Struct()
    out.update(fields)
    return out


def response(
    answer: Answer,
    *,
    headers: HeaderNames | None = None,
    openai_body: bool = False,
    dynamic_metadata: struct_pb2.Struct | None = None,
) -> rls_pb2.RateLimitResponse:
    """The answer on the wire. As upstream by default: no headers, no body, no dynamic metadata.
    `headers`: upstream's rate-limit headers under these names; `openai_body`: an over-limit
    answer carries an OpenAI-shaped error body (Envoy answers the 429 with it) and a Retry-After
    (our extension); `dynamic_metadata`: set in the response (`dynamic_metadata` above)."""
    statuses = []
    for status in answer.statuses:
        # Nested messages given as dicts: built by upb in one go (half the CPU of setting fields).
        item: dict[str, Any] = {"code": _OVER_LIMIT if status.over_limit else _OK}
        limit = status.limit
        if limit is not None:
            item["current_limit"] = _current_limit(
                limit.name, limit.requests_per_unit, limit.unit.value
            )
            item["limit_remaining"] = status.remaining
            # Whole seconds, as upstream computes it (the window's length minus the whole seconds
            # of it gone: 1 to the window's length, never 0 for a window still open).
            item["duration_until_reset"] = {"seconds": max(1, math.ceil(status.reset_s))}
        elif status.unlimited:
            item["limit_remaining"] = UNLIMITED_REMAINING
        statuses.append(item)
    added = _headers(answer, headers) if headers is not None else []
    if openai_body and answer.over_limit:
        added += [
            base_pb2.HeaderValue(key=k, value=v)
            for k, v in answer.headers
            if k in ("retry-after", "content-type")
        ]
    out = _Response(overall_code=_OVER_LIMIT if answer.over_limit else _OK, statuses=statuses)
    if added:
        out.response_headers_to_add.extend(added)
    if openai_body and answer.body:
        out.raw_body = answer.body
    if dynamic_metadata is not None:
        out.dynamic_metadata.CopyFrom(dynamic_metadata)
    return out


@functools.lru_cache(maxsize=1024)
def _current_limit(
    name: str, requests_per_unit: int, unit: int
) -> rls_pb2.RateLimitResponse.RateLimit:
    """A status's `current_limit` (copied into each response, never changed)."""
    return _Response.RateLimit(
        name=name, requests_per_unit=requests_per_unit, unit=_UNIT_NUMBERS[unit]
    )
