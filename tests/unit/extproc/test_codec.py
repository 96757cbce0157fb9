"""Envoy's protobuf messages to our types and back, with the real `envoy` (xds-protos) messages."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import json_format, struct_pb2, wrappers_pb2

from arks.api import ArksToken, ObjectKey, token_digest
from arks.policy import build_policy
from extproc import codec
from extproc.decision import Deny, Forward, Identity, ReadBody, Reply
from extproc.gateway import decide_headers
from extproc.request import BodyFacts
from extproc.usage import Finished
from tests.support import objects

Mode = processing_mode_pb2.ProcessingMode
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _struct(fields: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(fields)
    return out


def headers_message(
    headers: list[tuple[str, str]],
    body_facts: dict[str, Any] | None = None,
    end_of_stream: bool = False,
) -> ep.ProcessingRequest:
    """A request-headers message as Envoy sends it: values in `raw_value`, facts in metadata."""
    metadata = base_pb2.Metadata()
    if body_facts is not None:
        metadata.filter_metadata[codec.REQUEST_METADATA_NAMESPACE].CopyFrom(_struct(body_facts))
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers]
            ),
            end_of_stream=end_of_stream,
        ),
        metadata_context=metadata,
    )


ENVOY_HEADERS = [
    (":authority", "gateway.local"),
    (":path", "/v1/chat/completions?debug=1&x=2"),
    (":method", "POST"),
    (":scheme", "http"),
    ("content-type", "application/json"),
    ("authorization", "Bearer sk-alice"),
    ("x-request-id", "7f1c0d9e"),
]


def info_of(message: ep.ProcessingRequest) -> Any:
    return codec.request_info(message.request_headers, message.metadata_context)


def header_options(options: Any) -> dict[str, tuple[str, int]]:
    return {o.header.key: (o.header.raw_value.decode(), o.append_action) for o in options}


def forward(body: bytes | None = None, prompt_estimate: int | None = None) -> Forward:
    metadata: dict[str, Any] = {
        "namespace": "default",
        "user": "alice",
        "model": "qwen",
        "stream": True,
    }
    if prompt_estimate is not None:
        metadata["prompt_estimate"] = prompt_estimate
    return Forward(
        identity=Identity("default", "alice", "qwen"),
        set_headers=(
            ("x-arks-model", "qwen"),
            ("x-arks-namespace", "default"),
            ("x-arks-user", "alice"),
        ),
        remove_headers=("authorization", "x-arks-tier"),
        metadata={"io.arks": metadata},
        body=body,
        prompt_estimate=prompt_estimate,
    )


def wire(message: Any) -> Any:
    """Through the wire and back: what Envoy would actually receive."""
    return type(message).FromString(message.SerializeToString())


# --- request headers -> RequestInfo -----------------------------------------------------------


def test_request_info_reads_method_path_without_query_and_the_headers_decisions_need() -> None:
    info = info_of(headers_message(ENVOY_HEADERS))

    assert info.method == "POST"
    assert info.path == "/v1/chat/completions"
    # Only credentials, the request id, the content type and x-arks-* matter to a decision; the
    # rest is not copied.
    assert info.headers == {
        "authorization": "Bearer sk-alice",
        "x-request-id": "7f1c0d9e",
        "content-type": "application/json",
    }
    assert info.request_id == "7f1c0d9e"
    assert not info.end_of_stream


def test_request_info_falls_back_to_value_when_raw_value_is_empty() -> None:
    headers = ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[
                base_pb2.HeaderValue(key=":path", value="/v1/models"),
                base_pb2.HeaderValue(key="x-api-key", value="k"),
            ]
        )
    )

    info = codec.request_info(headers, base_pb2.Metadata())

    assert (info.path, info.headers) == ("/v1/models", {"x-api-key": "k"})


def test_request_info_survives_non_utf8_header_bytes() -> None:
    message = headers_message([(":path", "/v1/models")])
    message.request_headers.headers.headers.add(key="x-arks-odd", raw_value=b"\xff\xfeok")

    assert info_of(message).headers["x-arks-odd"] == "\ufffd\ufffdok"


def test_request_info_reads_body_facts_from_request_metadata() -> None:
    facts = {"model": "qwen", "stream": True, "include_usage": False, "max_tokens": 64}

    info = info_of(headers_message(ENVOY_HEADERS, facts))

    assert info.body == BodyFacts(model="qwen", stream=True, include_usage=False, max_tokens=64)
    assert info.body.known


def test_request_info_prefers_max_completion_tokens() -> None:
    info = info_of(
        headers_message(
            ENVOY_HEADERS, {"model": "qwen", "max_tokens": 64, "max_completion_tokens": 32}
        )
    )

    assert info.body.max_tokens == 32


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({"model_missing": True}, BodyFacts(model_missing=True)),
        ({"invalid_json": True}, BodyFacts(invalid_json=True)),
        ({"model": 7}, BodyFacts(model=7.0)),  # a number stays a number, for the gateway to reject
        ({"model": "qwen", "stream": "yes"}, BodyFacts(model="qwen", stream="yes")),
        ({"model": {"name": "qwen"}}, BodyFacts(model={"name": "qwen"})),
    ],
    ids=["missing", "invalid-json", "number", "string-stream", "object"],
)
def test_request_info_keeps_body_facts_as_sent(facts: dict[str, Any], expected: BodyFacts) -> None:
    assert info_of(headers_message(ENVOY_HEADERS, facts)).body == expected


def test_request_info_without_metadata_has_unknown_body_facts() -> None:
    info = info_of(headers_message(ENVOY_HEADERS))

    assert info.body == BodyFacts()
    assert not info.body.known


def test_request_info_ignores_other_metadata_namespaces() -> None:
    message = headers_message(ENVOY_HEADERS)
    message.metadata_context.filter_metadata["io.arks"].CopyFrom(_struct({"model": "spoofed"}))

    assert not info_of(message).body.known


def test_request_info_notes_a_request_without_body() -> None:
    info = info_of(
        headers_message([(":method", "POST"), (":path", "/v1/completions")], end_of_stream=True)
    )

    assert info.end_of_stream


# --- Forward -> header (and body) mutations ---------------------------------------------------


def test_forward_headers_overwrites_our_headers_and_removes_the_rest() -> None:
    response = wire(codec.forward_headers(forward()))

    assert response.WhichOneof("response") == "request_headers"
    common = response.request_headers.response
    assert header_options(common.header_mutation.set_headers) == {
        "x-arks-model": ("qwen", OVERWRITE),
        "x-arks-namespace": ("default", OVERWRITE),
        "x-arks-user": ("alice", OVERWRITE),
    }
    assert list(common.header_mutation.remove_headers) == ["authorization", "x-arks-tier"]
    assert common.clear_route_cache
    assert not common.HasField("body_mutation")


def test_forward_headers_sets_dynamic_metadata_under_io_arks() -> None:
    response = wire(codec.forward_headers(forward()))

    assert json_format.MessageToDict(response.dynamic_metadata) == {
        "io.arks": {"namespace": "default", "user": "alice", "model": "qwen", "stream": True}
    }


def test_forward_carries_the_picked_engines_in_header_and_envoy_lb() -> None:
    value = "10.0.0.1:8000,10.0.0.2:8000"

    response = wire(codec.forward_headers(forward(), value))

    assert header_options(response.request_headers.response.header_mutation.set_headers)[
        "x-gateway-destination-endpoint"
    ] == (value, OVERWRITE)
    metadata = json_format.MessageToDict(response.dynamic_metadata)
    assert metadata["envoy.lb"] == {"x-gateway-destination-endpoint": value}
    assert metadata["io.arks"]["user"] == "alice"
    body = wire(codec.forward_body(forward(), value))
    assert json_format.MessageToDict(body.dynamic_metadata)["envoy.lb"] == {
        "x-gateway-destination-endpoint": value
    }


def test_request_info_keeps_a_client_sent_destination_so_it_can_be_stripped() -> None:
    info = codec.request_info(
        headers_message(
            [*ENVOY_HEADERS, ("x-gateway-destination-endpoint", "10.9.9.9:80")]
        ).request_headers,
        base_pb2.Metadata(),
    )

    assert info.headers["x-gateway-destination-endpoint"] == "10.9.9.9:80"
    assert "x-gateway-destination-endpoint" in info.spoofed_headers


def test_forward_body_replaces_the_body_and_its_length() -> None:
    body = orjson.dumps(
        {"model": "qwen", "stream": True, "stream_options": {"include_usage": True}}
    )

    response = wire(codec.forward_body(forward(body, prompt_estimate=12)))

    assert response.WhichOneof("response") == "request_body"
    common = response.request_body.response
    assert common.body_mutation.body == body
    headers = header_options(common.header_mutation.set_headers)
    assert headers["content-length"] == (str(len(body)), OVERWRITE)
    assert headers["x-arks-model"] == ("qwen", OVERWRITE)
    assert common.clear_route_cache
    assert json_format.MessageToDict(response.dynamic_metadata)["io.arks"]["prompt_estimate"] == 12


def test_forward_body_without_rewrite_leaves_the_body_alone() -> None:
    response = wire(codec.forward_body(forward(prompt_estimate=12)))

    common = response.request_body.response
    assert not common.HasField("body_mutation")
    assert "content-length" not in header_options(common.header_mutation.set_headers)


def test_envoy_headers_to_forwarded_mutations() -> None:
    alice = objects.token("alice", ["qwen"], tokenHash=token_digest("sk-alice"))
    qwen = objects.endpoint("qwen")
    policy = build_policy([("token", alice), ("endpoint", qwen)])
    message = wire(
        headers_message(
            [*ENVOY_HEADERS, ("x-arks-user", "root")], {"model": "qwen", "stream": False}
        )
    )

    decision = decide_headers(info_of(message), policy, datetime(2030, 1, 1, tzinfo=UTC))
    assert isinstance(decision, Forward)
    common = wire(codec.forward_headers(decision)).request_headers.response

    assert header_options(common.header_mutation.set_headers)["x-arks-user"] == ("alice", OVERWRITE)
    assert list(common.header_mutation.remove_headers) == ["authorization"]


# --- answers made by the gateway --------------------------------------------------------------


def test_deny_is_an_immediate_openai_shaped_error() -> None:
    deny = Deny(
        403,
        "model_not_allowed",
        "This API key may not use the model 'mistral'.",
        type="permission_denied",
    )

    response = wire(codec.deny(deny))

    assert response.WhichOneof("response") == "immediate_response"
    immediate = response.immediate_response
    assert immediate.status.code == 403
    assert orjson.loads(immediate.body) == {
        "error": {
            "message": "This API key may not use the model 'mistral'.",
            "type": "permission_denied",
            "code": "model_not_allowed",
        }
    }
    assert header_options(immediate.headers.set_headers) == {
        "content-type": ("application/json", OVERWRITE)
    }
    assert immediate.details == "arks_model_not_allowed"


def test_deny_carries_extra_headers() -> None:
    deny = Deny(429, "rate_limit_exceeded", "Slow down.", headers=(("retry-after", "3"),))

    immediate = wire(codec.deny(deny)).immediate_response

    assert header_options(immediate.headers.set_headers)["retry-after"] == ("3", OVERWRITE)
    assert immediate.status.code == 429


def test_reply_is_an_immediate_json_answer() -> None:
    body = orjson.dumps({"object": "list", "data": []})

    immediate = wire(codec.reply(Reply(body))).immediate_response

    assert immediate.status.code == 200
    assert immediate.body == body
    assert header_options(immediate.headers.set_headers)["content-type"] == (
        "application/json",
        OVERWRITE,
    )


def test_read_body_asks_for_the_buffered_body_and_restates_other_modes() -> None:
    alice = ArksToken(ObjectKey("default", "alice"), qos=())

    response = wire(codec.read_body(ReadBody("the body was not lifted into metadata", alice)))

    assert response.WhichOneof("response") == "request_headers"
    assert not response.request_headers.HasField("response")
    mode = response.mode_override
    assert mode.request_body_mode == Mode.BUFFERED
    assert mode.response_header_mode == Mode.SKIP
    assert mode.response_body_mode == Mode.NONE
    assert (mode.request_trailer_mode, mode.response_trailer_mode) == (Mode.SKIP, Mode.SKIP)


# --- access-log entries -> Finished -----------------------------------------------------------


def log_entry(arks: dict[str, Any] | None, **flags: bool) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry(
        common_properties=accesslog_pb2.AccessLogCommon(
            response_flags=accesslog_pb2.ResponseFlags(**flags)
        ),
        request=accesslog_pb2.HTTPRequestProperties(
            request_id="7f1c0d9e", path="/v1/chat/completions?debug=1", request_body_bytes=321
        ),
        response=accesslog_pb2.HTTPResponseProperties(
            response_code=wrappers_pb2.UInt32Value(value=200), response_body_bytes=4567
        ),
    )
    if arks is not None:
        entry.common_properties.metadata.filter_metadata["io.arks"].CopyFrom(_struct(arks))
    return wire(entry)


ARKS = {"namespace": "default", "user": "alice", "model": "qwen", "stream": True}


def test_finished_reads_an_admitted_request_with_usage() -> None:
    done = codec.finished(
        log_entry(
            {
                **ARKS,
                "prompt_tokens": 12,
                "completion_tokens": 34,
                "total_tokens": 46,
                "prompt_estimate": 11,
            }
        )
    )

    assert done == Finished(
        request_id="7f1c0d9e",
        namespace="default",
        user="alice",
        model="qwen",
        path="/v1/chat/completions",
        stream=True,
        status=200,
        prompt_tokens=12,
        completion_tokens=34,
        prompt_estimate=11,
        request_body_bytes=321,
        response_body_bytes=4567,
        interrupted=None,
    )


def test_finished_without_usage_has_none_tokens() -> None:
    done = codec.finished(log_entry({k: v for k, v in ARKS.items() if k != "stream"}))

    assert done is not None
    assert (done.prompt_tokens, done.completion_tokens, done.prompt_estimate) == (None, None, None)
    assert done.stream is False


def test_finished_ignores_usage_that_is_not_a_number() -> None:
    done = codec.finished(log_entry({**ARKS, "prompt_tokens": "12", "completion_tokens": 34}))

    assert done is not None
    assert (done.prompt_tokens, done.completion_tokens) == (None, 34)


@pytest.mark.parametrize(
    "arks", [None, {"namespace": "default", "model": "qwen"}], ids=["no-io-arks", "no-user"]
)
def test_entries_of_requests_not_admitted_are_skipped(arks: dict[str, Any] | None) -> None:
    assert codec.finished(log_entry(arks)) is None


@pytest.mark.parametrize(
    ("flag", "reason"),
    [
        ("downstream_connection_termination", "client_disconnected"),
        ("upstream_remote_reset", "upstream_reset"),
        ("upstream_connection_termination", "upstream_reset"),
        ("upstream_protocol_error", "upstream_reset"),
        ("upstream_request_timeout", "timeout"),
        ("stream_idle_timeout", "timeout"),
    ],
)
def test_response_flags_tell_why_a_request_was_interrupted(flag: str, reason: str) -> None:
    done = codec.finished(log_entry(ARKS, **{flag: True}))

    assert done is not None and done.interrupted == reason


def test_other_response_flags_are_not_interruptions() -> None:
    done = codec.finished(log_entry(ARKS, rate_limited=True))

    assert done is not None and done.interrupted is None


def test_finished_reads_envoys_timings_and_the_first_content_byte() -> None:
    entry = log_entry({**ARKS, "first_byte_ms": 1_700_000_000_250})
    common = entry.common_properties
    common.start_time.FromMilliseconds(1_700_000_000_000)
    common.duration.FromMilliseconds(900)
    common.time_to_first_downstream_tx_byte.FromMilliseconds(3)  # the headers, not the token
    common.time_to_first_upstream_tx_byte.FromMilliseconds(2)
    common.time_to_last_upstream_rx_byte.FromMilliseconds(880)
    common.upstream_request_attempt_count = 2

    done = codec.finished(wire(entry))

    assert done is not None
    assert done.duration_s == pytest.approx(0.9)
    assert done.first_byte_s == pytest.approx(0.25)
    assert done.upstream_s == pytest.approx(0.878)
    assert done.attempts == 2


def test_finished_without_timings_has_none() -> None:
    done = codec.finished(log_entry(ARKS))

    assert done is not None
    assert (done.duration_s, done.first_byte_s, done.upstream_s) == (None, None, None)
    assert done.choices == 1


def test_finished_reads_the_answers_the_engine_writes() -> None:
    done = codec.finished(log_entry({**ARKS, "choices": 3}))

    assert done is not None
    assert done.choices == 3
