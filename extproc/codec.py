"""Envoy's protobuf messages to our types and back. The only module that knows the wire."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2
from google.rpc import code_pb2, status_pb2

from arks.wire import (
    CREDENTIAL_HEADERS,
    DESTINATION_HEADER,
    DESTINATION_METADATA_NAMESPACE,
    METADATA_NAMESPACE,
    PROMPT_METADATA_NAMESPACE,
    REQUEST_METADATA_NAMESPACE,
)
from extproc.decision import Deny, Forward, ReadBody, Reply
from extproc.request import PICKED_HEADERS, BodyFacts, RequestInfo
from extproc.reservation import Reservation
from extproc.usage import Finished

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_Mode = processing_mode_pb2.ProcessingMode
# Asking for the body must restate every other mode: 0 would mean "the default" (SEND).
READ_BODY_MODE = _Mode(
    request_body_mode=_Mode.BUFFERED,
    response_header_mode=_Mode.SKIP,
    response_body_mode=_Mode.NONE,
    request_trailer_mode=_Mode.SKIP,
    response_trailer_mode=_Mode.SKIP,
)


def _struct_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "number_value":
        return value.number_value
    if kind == "null_value":
        return None
    return json_format.MessageToDict(value)


def _text(header: base_pb2.HeaderValue) -> str:
    return header.raw_value.decode("utf-8", "replace") if header.raw_value else str(header.value)


# content-type: an audio upload must be multipart/form-data.
_KEPT_HEADERS = frozenset(
    {*CREDENTIAL_HEADERS, "x-request-id", "content-length", "content-type", *PICKED_HEADERS}
)


def request_info(headers: ep.HttpHeaders, metadata: base_pb2.Metadata) -> RequestInfo:
    """The headers the gateway decides on (credentials, request id, any x-arks-*), path, method,
    and the body facts Envoy lifted into metadata."""
    plain: dict[str, str] = {}
    method = path = ""
    for header in headers.headers.headers:
        key = header.key
        if key in _KEPT_HEADERS or key.startswith("x-arks-"):
            plain[key] = _text(header)
        elif key == ":path":
            path = _text(header).partition("?")[0]
        elif key == ":method":
            method = _text(header)
    fields = metadata.filter_metadata.get(REQUEST_METADATA_NAMESPACE)
    facts = (
        BodyFacts.from_metadata({k: _struct_value(v) for k, v in fields.fields.items()})
        if fields
        else BodyFacts()
    )
    return RequestInfo(method, path, plain, facts, headers.end_of_stream)


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode()), append_action=_OVERWRITE
    )


_SET_HEADERS: dict[tuple[str, str], base_pb2.HeaderValueOption] = {}
MAX_CACHED_HEADERS = 10_000


def _set_header(name: str, value: str) -> base_pb2.HeaderValueOption:
    """A routing header (a tenant's namespace, user, model): the same few values on every
    request, built once. Adding a message to a repeated field copies it, so one can be shared."""
    found = _SET_HEADERS.get((name, value))
    if found is None:
        if len(_SET_HEADERS) >= MAX_CACHED_HEADERS:
            _SET_HEADERS.clear()
        found = _SET_HEADERS[(name, value)] = _header(name, value)
    return found


_JSON_CONTENT_TYPE = _header("content-type", "application/json")


def _immediate(
    status: int,
    body: bytes,
    headers: tuple[tuple[str, str], ...],
    details: str,
    content_type: base_pb2.HeaderValueOption = _JSON_CONTENT_TYPE,
) -> ep.ProcessingResponse:
    mutation = ep.HeaderMutation(set_headers=[content_type, *(_header(k, v) for k, v in headers)])
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=mutation,
            body=body,
            details=details,
        )
    )


def deny(decision: Deny) -> ep.ProcessingResponse:
    return _immediate(decision.status, decision.body(), decision.headers, f"arks_{decision.code}")


def reply(decision: Reply) -> ep.ProcessingResponse:
    content_type = (
        _JSON_CONTENT_TYPE
        if decision.content_type == "application/json"
        else _header("content-type", decision.content_type)
    )
    return _immediate(decision.status, decision.body, (), "arks_reply", content_type)


def check_headers(request: authz.CheckRequest) -> dict[str, str]:
    """The credential headers of an early-auth check (Envoy sends only those)."""
    headers = request.attributes.request.http.headers
    return {name: headers[name] for name in CREDENTIAL_HEADERS if name in headers}


CHECK_OK = authz.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))


def check_denied(decision: Deny) -> authz.CheckResponse:
    return authz.CheckResponse(
        status=status_pb2.Status(code=code_pb2.UNAUTHENTICATED),
        denied_response=authz.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            # ext_authz reads `value`, not `raw_value`
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="content-type", value="application/json")
                )
            ],
            body=decision.body().decode(),
        ),
    )


def read_body(_: ReadBody) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(request_headers=ep.HeadersResponse(), mode_override=READ_BODY_MODE)


def _forward_common(decision: Forward, destination: str | None) -> ep.CommonResponse:
    # Envoy applies removals before sets: a client's destination header, removed, is replaced by ours.
    set_headers = [_set_header(k, v) for k, v in decision.set_headers]
    if destination is not None:
        set_headers.append(_header(DESTINATION_HEADER, destination))
    body_mutation = None
    if decision.body is not None:
        body_mutation = ep.BodyMutation(body=decision.body)
        set_headers.append(_header("content-length", str(len(decision.body))))
    return ep.CommonResponse(
        header_mutation=ep.HeaderMutation(
            set_headers=set_headers, remove_headers=list(decision.remove_headers)
        ),
        body_mutation=body_mutation,
        clear_route_cache=True,
    )


def _value(value: Any) -> struct_pb2.Value:
    # Explicit construction: Struct.update walks Python code per field, this stays in upb.
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, int | float):
        return struct_pb2.Value(number_value=value)
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    if isinstance(value, dict):
        return struct_pb2.Value(
            struct_value=struct_pb2.Struct(fields={k: _value(v) for k, v in value.items()})
        )
    raise TypeError(f"no protobuf Value for {type(value).__name__}")


def _metadata(decision: Forward, destination: str | None) -> struct_pb2.Struct:
    fields = {ns: _value(values) for ns, values in decision.metadata.items()}
    if decision.reservation is not None:
        ours = fields.setdefault(
            METADATA_NAMESPACE, struct_pb2.Value(struct_value=struct_pb2.Struct())
        )
        _reserve(ours.struct_value, decision.reservation)
    if destination is not None:  # the picked engines, Gateway API Inference Extension style
        picked = struct_pb2.Struct(
            fields={DESTINATION_HEADER: struct_pb2.Value(string_value=destination)}
        )
        fields[DESTINATION_METADATA_NAMESPACE] = struct_pb2.Value(struct_value=picked)
    return struct_pb2.Struct(fields=fields)


def _reserve(ours: struct_pb2.Struct, reservation: Reservation) -> None:
    """What admission took, in the request's metadata (`Reservation.FIELDS`)."""
    ours.fields["admitted_at"].number_value = reservation.admitted_at
    if reservation.quota:
        ours.fields["quota"].string_value = reservation.quota
    if reservation.concurrency:
        ours.fields["concurrency"].bool_value = True


@dataclass(frozen=True)
class Prebuilt:
    """The part of a forward answer that is the same for every request it is given to: the
    header mutation and the metadata without what admission took."""

    common: ep.CommonResponse
    metadata: struct_pb2.Struct


def prebuild(decision: Forward) -> Prebuilt:
    """`decision`'s answer without engines picked, its reservation left out (see `forward_prebuilt`)."""
    if decision.body is not None:
        raise ValueError("a rewritten body is not prebuilt")
    return Prebuilt(
        _forward_common(decision, None),
        _metadata(dataclasses.replace(decision, reservation=None), None),
    )


def forward_prebuilt(prebuilt: Prebuilt, reservation: Reservation | None) -> ep.ProcessingResponse:
    """The same answer as `forward_headers` gives the decision `prebuilt` was made from, with
    `reservation`, when no engine was picked. Messages given to a constructor are copied."""
    metadata = struct_pb2.Struct()
    metadata.CopyFrom(prebuilt.metadata)
    if reservation is not None:
        _reserve(metadata.fields[METADATA_NAMESPACE].struct_value, reservation)
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=prebuilt.common), dynamic_metadata=metadata
    )


def forward_headers(decision: Forward, destination: str | None = None) -> ep.ProcessingResponse:
    """Forward with our headers and metadata; `destination`: the engines picked (`ip:port,...`)."""
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=_forward_common(decision, destination)),
        dynamic_metadata=_metadata(decision, destination),
    )


def forward_body(decision: Forward, destination: str | None = None) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(
        request_body=ep.BodyResponse(response=_forward_common(decision, destination)),
        dynamic_metadata=_metadata(decision, destination),
    )


def _float(fields: Any, key: str) -> float:
    value = fields.get(key)
    if value is None or value.WhichOneof("kind") != "number_value":
        return 0.0
    return max(0.0, float(value.number_value))


def _number(fields: Any, key: str) -> int | None:
    value = fields.get(key)
    if value is None or value.WhichOneof("kind") != "number_value":
        return None
    return int(value.number_value)


def _interruption(flags: accesslog_pb2.ResponseFlags) -> str | None:
    if flags.downstream_connection_termination:
        return "client_disconnected"
    if (
        flags.upstream_remote_reset
        or flags.upstream_connection_termination
        or flags.upstream_protocol_error
    ):
        return "upstream_reset"
    if flags.upstream_request_timeout or flags.stream_idle_timeout:
        return "timeout"
    return None


def finished(entry: accesslog_pb2.HTTPAccessLogEntry) -> Finished | None:
    """An access-log entry of an admitted request; None for anything else."""
    common = entry.common_properties
    ours = common.metadata.filter_metadata.get(METADATA_NAMESPACE)
    if ours is None or "user" not in ours.fields:
        return None
    fields = ours.fields
    return Finished(
        request_id=entry.request.request_id,
        namespace=fields["namespace"].string_value,
        user=fields["user"].string_value,
        model=fields["model"].string_value,
        path=entry.request.path.partition("?")[0],
        stream=fields["stream"].bool_value if "stream" in fields else False,
        status=entry.response.response_code.value,
        prompt_tokens=_number(fields, "prompt_tokens"),
        completion_tokens=_number(fields, "completion_tokens"),
        prompt_estimate=_number(fields, "prompt_estimate"),
        audio_seconds=_float(fields, "audio_seconds"),
        request_body_bytes=entry.request.request_body_bytes,
        response_body_bytes=entry.response.response_body_bytes,
        interrupted=_interruption(common.response_flags),
        prompt_sample=_sample(common.metadata.filter_metadata.get(PROMPT_METADATA_NAMESPACE)),
        answer_sample=_sample(ours, "answer_sample"),
        answer_head=_sample(ours, "answer_head"),
        limits=_limits(fields),
        reservation=Reservation.from_metadata(
            {k: _struct_value(fields[k]) for k in Reservation.FIELDS if k in fields}
        ),
        duration_s=_seconds(common, "duration"),
        first_byte_s=_first_byte_seconds(common, _number(fields, "first_byte_ms")),
        upstream_s=_upstream_seconds(common),
        choices=_number(fields, "choices") or 1,
        attempts=common.upstream_request_attempt_count,
        upstream_host=_upstream_host(common),
        started_at=_epoch_seconds(common),
        response_id=fields["response_id"].string_value if "response_id" in fields else "",
    )


def _upstream_host(common: accesslog_pb2.AccessLogCommon) -> str:
    """The engine's `host:port` (Envoy's upstream remote address: the last attempt's); "" when
    the request reached none."""
    if not common.HasField("upstream_remote_address"):
        return ""
    socket = common.upstream_remote_address.socket_address
    if not socket.address:
        return ""
    return f"{socket.address}:{socket.port_value}"


def _epoch_seconds(common: accesslog_pb2.AccessLogCommon) -> float | None:
    if not common.HasField("start_time"):
        return None
    return float(common.start_time.seconds + common.start_time.nanos / 1e9)


def _seconds(common: accesslog_pb2.AccessLogCommon, name: str) -> float | None:
    if not common.HasField(name):
        return None
    value = getattr(common, name)
    return float(value.seconds + value.nanos / 1e9)


def _first_byte_seconds(
    common: accesslog_pb2.AccessLogCommon, first_byte_ms: int | None
) -> float | None:
    """usage.lua's clock (ms since the epoch) at a stream's first content byte, from the request's
    start: Envoy's time_to_first_downstream_tx_byte is the headers', sent before the first token."""
    if first_byte_ms is None or not common.HasField("start_time"):
        return None
    start = float(common.start_time.seconds + common.start_time.nanos / 1e9)
    return max(0.0, first_byte_ms / 1000 - start)


def _upstream_seconds(common: accesslog_pb2.AccessLogCommon) -> float | None:
    """The engine's time: the request's first byte sent to it until its answer's last byte came
    back (Envoy's timings count from the downstream request's first byte)."""
    sent = _seconds(common, "time_to_first_upstream_tx_byte")
    received = _seconds(common, "time_to_last_upstream_rx_byte")
    if sent is None or received is None:
        return None
    return max(0.0, received - sent)


def _sample(namespace: struct_pb2.Struct | None, key: str = "sample") -> str | None:
    """usage.lua's sample, if it left one (it blanks those of answers that report usage)."""
    if namespace is None or key not in namespace.fields:
        return None
    return namespace.fields[key].string_value or None


def _limits(fields: Any) -> dict[str, int]:
    value = fields.get("limits")
    if value is None or value.WhichOneof("kind") != "struct_value":
        return {}
    return {
        k: int(v.number_value)
        for k, v in value.struct_value.fields.items()
        if v.WhichOneof("kind") == "number_value"
    }
