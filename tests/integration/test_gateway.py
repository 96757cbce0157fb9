"""The request path end to end: the openai client → real Envoy → extproc → simulated engines."""

from __future__ import annotations

import json
import socket
import urllib.parse

import httpx
import openai
import pytest

from arks.tokens import count_prompt
from launcher.sim import MAX_MODEL_LEN
from tests.support.stack import ALICE, BOB, DISABLED, EXPIRED, Stack, Usage
from tests.support.waiting import wait_for

MESSAGES = [{"role": "user", "content": "Tell me about the weather in Lisbon in spring."}]


def chat_body(model: str = "model-a", **extra: object) -> dict:
    return {"model": model, "messages": MESSAGES, **extra}


# --- the happy paths, with usage counted exactly -------------------------------------------


def test_chat_non_streamed_counts_engine_usage_exactly(stack: Stack) -> None:
    before = stack.usage("alice", "model-a")
    answer = stack.client().chat.completions.create(
        model="model-a", messages=MESSAGES, extra_headers={"x-sim-output-tokens": "7"}
    )
    assert answer.choices[0].message.content == " hello" * 7
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == count_prompt(chat_body())
    charged = stack.wait_usage("alice", "model-a", before)
    assert charged == Usage(
        requests=1, prompt=answer.usage.prompt_tokens, completion=7, estimated=0
    )


def test_chat_streamed_with_the_unchanged_openai_client_is_counted_exactly(stack: Stack) -> None:
    before = stack.usage("alice", "model-b")
    stream = stack.client().chat.completions.create(
        model="model-b", messages=MESSAGES, stream=True, extra_headers={"x-sim-output-tokens": "25"}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == " hello" * 25
    # The gateway asked for usage on the client's behalf, read it and cut its event: the client
    # sees the stream it asked for, every chunk with a choice.
    assert all(c.choices and c.usage is None for c in chunks)
    charged = stack.wait_usage("alice", "model-b", before)
    assert charged == Usage(
        requests=1, prompt=count_prompt(chat_body("model-b")), completion=25, estimated=0
    )


def test_chat_streamed_with_include_usage_from_the_client(stack: Stack) -> None:
    before = stack.usage("alice", "model-a")
    stream = stack.client().chat.completions.create(
        model="model-a",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-sim-output-tokens": "300"},
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1
    charged = stack.wait_usage("alice", "model-a", before)
    assert (charged.prompt, charged.completion, charged.estimated) == (
        usage[0].prompt_tokens,
        300,
        0,
    )


@pytest.mark.parametrize(
    "stream_options",
    [{}, {"continuous_usage_stats": False}, {"include_usage": None}],
    ids=["empty-object", "other-option", "null-include-usage"],
)
def test_include_usage_is_merged_into_the_clients_stream_options(
    stack: Stack, stream_options: dict
) -> None:
    before = stack.usage("alice", "model-a")
    body = chat_body(stream=True, stream_options=stream_options)
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {ALICE}", "x-sim-output-tokens": "4"},
        )
    assert resp.status_code == 200, resp.text  # the engine parsed the patched body
    events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
    # The engine reported usage (charged exactly below); its event, not asked for, was cut.
    assert events and all(e["choices"] for e in events)
    charged = stack.wait_usage("alice", "model-a", before)
    assert (charged.completion, charged.estimated) == (4, 0)


TOOL_WITH_A_STREAM_OPTIONS_PROPERTY = {
    "type": "function",
    "function": {
        "name": "configure",
        "parameters": {
            "type": "object",
            "properties": {"stream_options": {"type": "object", "description": 'a \\"quoted\\" {'}},
        },
    },
}


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [TOOL_WITH_A_STREAM_OPTIONS_PROPERTY]},
        {"tools": [TOOL_WITH_A_STREAM_OPTIONS_PROPERTY], "stream_options": None},
        {"stream_options": None},
        {"metadata": {"stream_options": {"include_usage": None}}, "stream_options": {}},
    ],
    ids=["nested-key-only", "nested-key-and-null", "null", "nested-include-usage"],
)
def test_the_usage_option_goes_into_the_top_level_object_only(stack: Stack, extra: dict) -> None:
    before = stack.usage("alice", "model-a")
    body = {**chat_body(stream=True), **extra}
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {ALICE}", "x-sim-output-tokens": "3"},
        )
    assert resp.status_code == 200, resp.text
    events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
    # The engine was asked at the top level (charged exactly below); its usage event was cut.
    assert events and all(e["choices"] for e in events)
    charged = stack.wait_usage("alice", "model-a", before)
    assert (charged.completion, charged.estimated) == (3, 0)


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "model-a", "stream": null, "stream_options": null, "messages": []}',
        # the same keys deeper down are not the request's own
        b'{"model": "model-a", "metadata": {"stream": {}, "stream_options": 1}, "messages": []}',
        b'{"model": "model-a", "messages": [{"role": "user", "content": "\\"stream\\": {}"}]}',
    ],
    ids=["nulls", "nested", "in-a-string"],
)
def test_stream_fields_envoy_cannot_read_are_accepted_when_valid(
    stack: Stack, content: bytes
) -> None:
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            content=content,
            headers={"authorization": f"Bearer {ALICE}", "content-type": "application/json"},
        )
    assert resp.status_code == 200, resp.text
    assert resp.json()["object"] == "chat.completion"


def test_stream_options_of_another_type_is_a_400_and_charges_nothing(stack: Stack) -> None:
    before = stack.usage("alice", "model-a")
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            json={**chat_body(stream=True), "stream_options": "yes"},
            headers={"authorization": f"Bearer {ALICE}"},
        )
    assert resp.status_code == 400
    assert resp.json()["error"] == {
        "message": "'stream_options' must be an object.",
        "type": "invalid_request_error",
        "code": "invalid_type",
    }
    after = stack.usage("alice", "model-a")
    assert (after.prompt, after.completion, after.estimated) == (
        before.prompt,
        before.completion,
        before.estimated,
    )  # counted as a request that ended in 400, charged no token


def test_a_client_refusing_usage_is_respected_and_charged_an_estimate(stack: Stack) -> None:
    before = stack.usage("alice", "model-a")
    stream = stack.client().chat.completions.create(
        model="model-a",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": False},
        extra_headers={"x-sim-output-tokens": "30"},
    )
    assert all(chunk.usage is None for chunk in stream)
    charged = stack.wait_usage("alice", "model-a", before)
    assert charged.estimated == 1
    assert 25 <= charged.completion <= 35


def test_completions_non_streamed_and_streamed(stack: Stack) -> None:
    client = stack.client()
    prompt = "Once upon a time"
    before = stack.usage("alice", "model-a")
    answer = client.completions.create(model="model-a", prompt=prompt, max_tokens=5)
    assert answer.choices[0].text == " hello" * 5 and answer.choices[0].finish_reason == "length"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="model-a", prompt=prompt, stream=True, extra_headers={"x-sim-output-tokens": "9"}
        )
        if c.choices
    )
    assert streamed == " hello" * 9
    charged = stack.wait_usage("alice", "model-a", before, requests=2)
    assert charged == Usage(
        requests=2, prompt=2 * count_prompt({"prompt": prompt}), completion=14, estimated=0
    )


def test_embeddings_are_charged_their_reported_prompt_tokens(stack: Stack) -> None:
    before = stack.usage("alice", "model-a")
    result = stack.client().embeddings.create(
        model="model-a", input=["first text", "and a second one"]
    )
    assert len(result.data) == 2
    charged = stack.wait_usage("alice", "model-a", before)
    assert charged == Usage(
        requests=1, prompt=result.usage.prompt_tokens, completion=0, estimated=0
    )


def test_a_json_answer_over_the_buffer_limit_passes_whole_and_is_charged(stack: Stack) -> None:
    """A batch of embeddings larger than Envoy's 4 MiB buffer: the gateway must not hold the
    answer to read its usage (it used to, and turned the answer into an uncharged 500)."""
    inputs = [f"text {i}" for i in range(40_000)]
    before = stack.usage("alice", "model-a")
    with stack.http() as http:
        answer = http.post(
            "/v1/embeddings",
            json={"model": "model-a", "input": inputs},
            headers={"authorization": f"Bearer {ALICE}"},
        )
    assert answer.status_code == 200, answer.text[:300]
    assert len(answer.content) > 4 * 1024 * 1024
    body = answer.json()
    assert len(body["data"]) == len(inputs)
    charged = stack.wait_usage("alice", "model-a", before)
    assert charged == Usage(
        requests=1, prompt=body["usage"]["prompt_tokens"], completion=0, estimated=0
    )


def test_models_are_listed_per_token(stack: Stack) -> None:
    alice = sorted(m.id for m in stack.client(ALICE).models.list())
    bob = [m.id for m in stack.client(BOB).models.list()]
    # alice is also granted "model-ghost", which has no ArksEndpoint: it is not listed.
    assert alice == ["model-a", "model-b", "model-down", "model-empty"]
    assert bob == ["model-a"]
    assert stack.client(BOB).models.retrieve("model-a").id == "model-a"
    # What the engines publish at their /v1/models (fetched at start, then each 60 s); model-down
    # and model-empty have no engine that answers: the field is left out.
    lens = wait_for(
        lambda: {
            m.id: getattr(m, "max_model_len", None) for m in stack.client(ALICE).models.list()
        },
        lambda listed: listed["model-a"] is not None and listed["model-b"] is not None,
    )
    assert lens == {"model-a": MAX_MODEL_LEN, "model-b": MAX_MODEL_LEN, "model-down": None,
                    "model-empty": None}  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        stack.client(BOB).models.retrieve("model-b")  # exists, but not for bob


def test_x_api_key_header_is_accepted(stack: Stack) -> None:
    with stack.http() as http:
        resp = http.post("/v1/chat/completions", json=chat_body(), headers={"x-api-key": BOB})
    assert resp.status_code == 200, resp.text


def test_a_json_body_sent_as_form_data_still_works(stack: Stack) -> None:
    """`curl -d '{…}'` sends application/x-www-form-urlencoded; the gateway still reads the JSON."""
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            content=json.dumps(chat_body()),
            headers={
                "authorization": f"Bearer {ALICE}",
                "content-type": "application/x-www-form-urlencoded",
            },
        )
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 16


# --- spoofing ------------------------------------------------------------------------------


def test_spoofed_routing_headers_are_ignored(stack: Stack) -> None:
    before_bob = stack.usage("bob", "model-a")
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            json=chat_body("model-a"),
            headers={
                "authorization": f"Bearer {BOB}",
                "x-arks-model": "model-b",  # bob may not use model-b
                "x-arks-user": "alice",
                "x-arks-namespace": "other",
            },
        )
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-sim-instance"] == "sim-a"  # routed by the body's model, not the header
    assert stack.wait_usage("bob", "model-a", before_bob).requests == 1


# --- usage without engine-reported numbers -------------------------------------------------


def test_answer_without_usage_is_charged_an_estimate(stack: Stack) -> None:
    before = stack.usage("alice", "model-a")
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            json=chat_body(),
            headers={
                "authorization": f"Bearer {ALICE}",
                "x-sim-omit-usage": "1",
                "x-sim-output-tokens": "40",
            },
        )
    assert resp.status_code == 200 and "usage" not in resp.json()
    charged = stack.wait_usage("alice", "model-a", before)
    assert charged.estimated == 1
    assert charged.prompt > 0
    assert 20 <= charged.completion <= 60  # 40 tokens of " hello", estimated from the bytes
    assert (
        stack.metric(
            "arks_usage_estimated_requests_total",
            namespace="default",
            user="alice",
            model="model-a",
            reason="no_usage_reported",
        )
        >= 1
    )


def test_engine_dropping_a_stream_is_charged_an_estimate(stack: Stack) -> None:
    before = stack.usage("alice", "model-a")
    stream = stack.client().chat.completions.create(
        model="model-a",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-sim-output-tokens": "200", "x-sim-disconnect-after": "50"},
    )
    received = 0
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].delta.content)
    assert received == 50
    charged = stack.wait_usage("alice", "model-a", before)
    assert charged.estimated == 1
    # Estimated from the body's size (Envoy added include_usage; Python never read the body).
    assert count_prompt(chat_body()) <= charged.prompt <= 3 * count_prompt(chat_body())
    assert 40 <= charged.completion <= 60
    assert (
        stack.metric(
            "arks_usage_estimated_requests_total",
            namespace="default",
            user="alice",
            model="model-a",
            reason="upstream_reset",
        )
        >= 1
    )


def test_client_disconnecting_mid_stream_is_charged_an_estimate(stack: Stack) -> None:
    before = stack.usage("alice", "model-b")
    with (
        stack.http() as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json=chat_body("model-b", stream=True),
            headers={
                "authorization": f"Bearer {ALICE}",
                "x-sim-output-tokens": "400",
                "x-sim-tpot-ms": "10",
            },
        ) as resp,
    ):
        assert resp.status_code == 200
        events = 0
        for line in resp.iter_lines():
            events += line.startswith("data: {")
            if events == 20:
                break  # leaving the block closes the connection
    charged = stack.wait_usage("alice", "model-b", before)
    assert charged.estimated == 1
    assert 10 <= charged.completion < 400
    assert (
        stack.metric(
            "arks_usage_estimated_requests_total",
            namespace="default",
            user="alice",
            model="model-b",
            reason="client_disconnected",
        )
        >= 1
    )


# --- every error, with its OpenAI-shaped body ----------------------------------------------


def error_of(resp: httpx.Response) -> dict:
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    return body["error"]


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "invalid_api_key"),
        ({"authorization": "Basic dXNlcjpwYXNz"}, "invalid_api_key"),
        ({"authorization": "Bearer sk-arks-nobody-knows-this"}, "invalid_api_key"),
        ({"authorization": f"Bearer {EXPIRED}"}, "invalid_api_key"),
        ({"authorization": f"Bearer {DISABLED}"}, "invalid_api_key"),
    ],
    ids=["missing", "not-bearer", "unknown", "expired", "disabled"],
)
def test_bad_credentials_are_401(stack: Stack, headers: dict, code: str) -> None:
    with stack.http() as http:
        resp = http.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert resp.status_code == 401
    assert error_of(resp)["code"] == code


def test_openai_client_sees_typed_errors(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError):
        stack.client("sk-arks-wrong").chat.completions.create(model="model-a", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        stack.client(BOB).chat.completions.create(model="model-b", messages=MESSAGES)
    assert denied.value.code == "model_not_allowed"
    with pytest.raises(openai.NotFoundError) as missing:
        stack.client().chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert missing.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b'{"model": "model-a", "messages": [', 400, "invalid_json"),
        (b"[1, 2, 3]", 400, "invalid_json"),  # valid JSON, but not an object
        (b'{"messages": []}', 400, "missing_model"),
        (b'{"model": 42, "messages": []}', 400, "invalid_type"),
        (b'{"model": "model-a", "stream": "yes", "messages": []}', 400, "invalid_type"),
        (
            b'{"model": "model-a", "messages": [], "max_tokens": 9223372036854775808}',
            400,
            "invalid_type",
        ),
        (b'{"model": "model-a", "messages": [], "max_tokens": 1e400}', 400, "invalid_type"),
        (b'{"model": "model-a", "messages": [], "n": 0}', 400, "invalid_type"),
        (b'{"model": "model-a", "stream": {}, "messages": []}', 400, "invalid_type"),
        (b'{"model": "model-a", "stream": [true], "messages": []}', 400, "invalid_type"),
        (
            b'{"model": "model-a", "stream": false, "stream_options": 1, "messages": []}',
            400,
            "invalid_type",
        ),
        (b'{"model": "model-a", "stream_options": [], "messages": []}', 400, "invalid_type"),
        (
            b'{"model": "model-a", "stream": true, "messages": [{"role": "user", "content": "\\ud800"}]}',
            400,
            "invalid_json",
        ),
        (b"", 400, "missing_body"),
        (b'{"model": "model-ghost", "messages": []}', 404, "model_not_found"),
        (b'{"model": "model-empty", "messages": []}', 503, "no_backend"),
        (b'{"model": "model-down", "messages": []}', 503, "no_backend"),
    ],
    ids=[
        "truncated",
        "array",
        "no-model",
        "model-number",
        "stream-string",
        "max-tokens-2^63",
        "max-tokens-1e400",
        "n-zero",
        "stream-object",
        "stream-array",
        "stream-options-number",
        "stream-options-array",
        "lone-surrogate",
        "empty",
        "ghost",
        "empty-endpoint",
        "backend-down",
    ],
)
def test_bad_requests_get_the_documented_status(
    stack: Stack, content: bytes, status: int, code: str
) -> None:
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            content=content,
            headers={"authorization": f"Bearer {ALICE}", "content-type": "application/json"},
        )
    assert resp.status_code == status, resp.text
    assert error_of(resp)["code"] == code


def test_forbidden_model_is_403(stack: Stack) -> None:
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            json=chat_body("model-b"),
            headers={"authorization": f"Bearer {BOB}"},
        )
    assert resp.status_code == 403
    assert error_of(resp)["code"] == "model_not_allowed"


def test_unknown_path_and_wrong_method(stack: Stack) -> None:
    auth = {"authorization": f"Bearer {ALICE}"}
    with stack.http() as http:
        unknown = http.post("/v1/images/generations", json={"model": "model-a"}, headers=auth)
        wrong = http.get("/v1/chat/completions", headers=auth)
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "not_found"
    assert wrong.status_code == 405 and error_of(wrong)["code"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"


def test_huge_body_is_413_and_the_gateway_keeps_serving(stack: Stack) -> None:
    huge = (
        b'{"model": "model-a", "messages": [{"role": "user", "content": "'
        + b"a" * (5 * 1024 * 1024)
        + b'"}]}'
    )
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            content=huge,
            headers={"authorization": f"Bearer {ALICE}", "content-type": "application/json"},
        )
        assert resp.status_code == 413
        assert error_of(resp)["code"] == "request_too_large"
        after = http.post(
            "/v1/chat/completions", json=chat_body(), headers={"authorization": f"Bearer {ALICE}"}
        )
    assert after.status_code == 200


def test_engine_errors_pass_through_and_are_not_charged(stack: Stack) -> None:
    before = stack.usage("alice", "model-a")
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            json=chat_body(),
            headers={"authorization": f"Bearer {ALICE}", "x-sim-status": "503"},
        )
    assert resp.status_code == 503
    assert error_of(resp)["code"] == 503  # the engine's own body
    charged = stack.wait_usage("alice", "model-a", before)
    assert (charged.prompt, charged.completion) == (0, 0)
    assert (
        stack.metric(
            "arks_requests_total", namespace="default", user="alice", model="model-a", code="503"
        )
        >= 1
    )


# --- Envoy's own refusals are OpenAI-shaped too -------------------------------------------------


def raw_exchange(stack: Stack, request: bytes) -> tuple[int, dict]:
    """Send bytes no HTTP client would send; the status and JSON error of the answer."""
    parsed = urllib.parse.urlsplit(stack.url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    return status, json.loads(body[: _length(answer)])


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
            431,
            "request_headers_too_large",
        ),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            400,
            "bad_request",
        ),
        (b"GET /v1/models HTTP/1.0\r\nHost: x\r\n\r\n", 426, "upgrade_required"),
        (
            b"POST /v1/chat/completions#frag HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + ALICE.encode()
            + b"\r\nContent-Encoding: gzip\r\nContent-Length: 36\r\n\r\n"
            + b'{"model": "model-a", "messages": []}',
            415,
            "unsupported_content_encoding",
        ),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + ALICE.encode()
            + b"\r\nExpect: 100-continue\r\nExpect: 100-continue\r\nContent-Length: 36\r\n\r\n"
            + b'{"model": "model-a", "messages": []}',
            417,
            "expectation_failed",
        ),
    ],
    ids=[
        "headers-too-large",
        "bad-framing",
        "http-1.0",
        "fragment-in-path",
        "compressed-body",
        "duplicate-expect",
    ],
)
def test_envoys_own_refusals_have_the_openai_error_shape(
    stack: Stack, request_bytes: bytes, status: int, code: str
) -> None:
    got, body = raw_exchange(stack, request_bytes)
    assert got == status
    assert body["error"]["code"] == code and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]


def test_the_gateways_own_400s_keep_their_message(stack: Stack) -> None:
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"authorization": f"Bearer {ALICE}", "content-type": "application/json"},
        )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_json"


def test_a_request_without_credentials_is_refused_before_its_body_is_read(stack: Stack) -> None:
    """Headers announcing 4 MB and no credential, then nothing: answered 401 at once (it used to
    wait for the whole body, holding the connection and Envoy's buffer)."""
    parsed = urllib.parse.urlsplit(stack.url)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 4000000\r\n\r\n"
    )
    with socket.create_connection((parsed.hostname, parsed.port), timeout=3) as conn:
        conn.sendall(head)
        answer = conn.recv(65536)  # socket.timeout (the old behaviour) fails the test
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 401 " in status_line, answer
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "invalid_api_key"
    assert "No API key provided" in body["error"]["message"]


def test_no_credentials_get_the_same_answer_as_before(stack: Stack) -> None:
    with stack.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": "model-a", "messages": []})
        health = http.get("/healthz")
    assert resp.status_code == 401
    assert resp.json() == {
        "error": {
            "message": "No API key provided: send 'Authorization: Bearer <token>' or 'x-api-key'.",
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        }
    }
    assert health.status_code == 200  # Envoy's own health answer needs no credential


def test_a_client_that_closes_on_done_is_charged_the_reported_usage(stack: Stack) -> None:
    """The client hangs up as soon as it reads [DONE], while the engine has not ended the stream
    yet (it lingers here; under load Envoy may simply not have seen the end): the usage that
    came before [DONE] is what is charged, not an estimate."""
    before = stack.usage("alice", "model-a")
    body = chat_body(stream=True)
    headers = {"authorization": f"Bearer {ALICE}", "x-sim-linger-ms": "1500"}
    with (
        stack.http() as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp,
    ):
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                break  # and close the connection, mid-stream for Envoy
    charged = stack.wait_usage("alice", "model-a", before)
    assert (charged.requests, charged.estimated) == (1, 0)
    assert charged.completion == 16 and charged.prompt == count_prompt(body)
