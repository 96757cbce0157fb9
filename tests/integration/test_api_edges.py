"""The edges of the API through real Envoy, with the official openai client where it has a method:
the usage event a client did not ask for is cut from its stream (however the engine's writes
split it), every answer names its request (`x-request-id`, the usage record's id), every 405
says what is allowed, and a browser's preflight from an allowed origin is answered without a
token."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from arks.api import token_digest
from arks.tokens import count_prompt
from tests.support.objects import token
from tests.support.stack import ALICE, Stack, Usage, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

MESSAGES = [{"role": "user", "content": "Tell me about the weather in Lisbon in spring."}]
ONE_PER_MINUTE = "sk-arks-test-edges-rpm-1"
ORIGIN = "https://app.example.com"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    limited = token("edges-rpm", ["model-a"], tokenHash=token_digest(ONE_PER_MINUTE))
    limited["spec"]["qos"][0]["rateLimits"] = [{"type": "rpm", "value": 1}]
    with running_stack(
        tmp_path_factory.mktemp("edges"),
        [limited],
        ledger="sqlite:///{state_dir}/usage.db",
        cors_origins=(ORIGIN,),
    ) as running:
        yield running


def ledger_ids(stack: Stack) -> set[str]:
    url = stack.local.settings.ledger_url
    assert url is not None
    path = Path(url.removeprefix("sqlite:///"))
    if not path.exists():
        return set()
    try:
        with sqlite3.connect(path) as conn:
            return {row[0] for row in conn.execute("SELECT request_id FROM usage_records")}
    except sqlite3.OperationalError:  # not migrated yet
        return set()


def events(raw: str) -> list[str]:
    """The SSE events' data, in order."""
    return [e.removeprefix("data: ") for e in raw.split("\n\n") if e]


# --- the usage event the client did not ask for ----------------------------------------------


def test_the_quickstart_loop_over_a_stream_prints_every_token(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    before = stack.usage("alice", "model-a")
    stream = stack.client().chat.completions.create(
        model="model-a", messages=MESSAGES, stream=True, extra_headers={"x-sim-output-tokens": "5"}
    )
    for chunk in stream:  # OpenAI's quickstart: an empty `choices` would raise IndexError
        print(chunk.choices[0].delta.content)
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["", *[" hello"] * 5, "None"]  # the role, the tokens, the finish
    charged = stack.wait_usage("alice", "model-a", before)
    assert charged == Usage(
        requests=1,
        prompt=count_prompt({"model": "model-a", "messages": MESSAGES}),
        completion=5,
        estimated=0,
    )


def test_the_completions_quickstart_loop_prints_every_token(stack: Stack) -> None:
    before = stack.usage("alice", "model-a")
    stream = stack.client().completions.create(
        model="model-a", prompt="Say hello", stream=True, extra_headers={"x-sim-output-tokens": "4"}
    )
    texts = [chunk.choices[0].text for chunk in stream]
    assert texts == [" hello"] * 4
    charged = stack.wait_usage("alice", "model-a", before)
    assert (charged.requests, charged.completion, charged.estimated) == (1, 4, 0)


@pytest.mark.parametrize(
    ("tokens", "write_bytes"),
    [
        (6, 7),
        (6, 64),
        (6, 1000),
        # Long answers in frames larger than the part of them Lua reads: pieces of 8 KiB end
        # inside events; one write reaches Envoy as frames of up to hundreds of KiB.
        (1000, 8192),
        (1000, None),
    ],
)
def test_a_usage_event_split_across_data_frames_is_cut_whole(
    stack: Stack, tokens: int, write_bytes: int | None
) -> None:
    """The engine writes its stream in pieces: the usage event reaches Envoy in one data frame
    or several, small or large, and is still cut whole; every other event goes through intact."""
    before = stack.usage("alice", "model-a")
    headers = {"authorization": f"Bearer {ALICE}", "x-sim-output-tokens": str(tokens)}
    if write_bytes is not None:
        headers["x-sim-write-bytes"] = str(write_bytes)
    with stack.http() as http:
        answer = http.post(
            CHAT, json={"model": "model-a", "messages": MESSAGES, "stream": True}, headers=headers
        )
    assert answer.status_code == 200
    assert answer.text.endswith("\n\ndata: [DONE]\n\n")
    data = events(answer.text)
    chunks = [json.loads(d) for d in data[:-1]]  # each whole: it parses
    assert all(c["choices"] for c in chunks)
    assert all("usage" not in c or c["usage"] is None for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == " hello" * tokens
    charged = stack.wait_usage("alice", "model-a", before)
    assert (charged.requests, charged.completion, charged.estimated) == (1, tokens, 0)


def test_a_client_that_asked_for_usage_gets_the_usage_event_however_it_is_split(
    stack: Stack,
) -> None:
    stream = stack.client().chat.completions.create(
        model="model-a",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-sim-output-tokens": "3", "x-sim-write-bytes": "7"},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


# --- a request id on every answer -------------------------------------------------------------


def test_a_successful_answer_names_its_request_as_its_usage_record_does(stack: Stack) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model="model-a",
        messages=MESSAGES,
        extra_headers={"x-sim-output-tokens": "2", "x-request-id": "chosen-by-the-client"},
    )
    request_id = raw.headers.get("x-request-id")
    assert request_id and request_id != "chosen-by-the-client"  # Envoy's own at the edge
    assert raw.parse().choices[0].message.content == " hello" * 2
    wait_for(lambda: ledger_ids(stack), lambda ids: request_id in ids, timeout=15)


def test_a_streamed_answer_names_its_request_as_its_usage_record_does(stack: Stack) -> None:
    with stack.client().chat.completions.with_streaming_response.create(
        model="model-a", messages=MESSAGES, stream=True, extra_headers={"x-sim-output-tokens": "2"}
    ) as response:
        request_id = response.headers.get("x-request-id")
        assert len([c for c in response.parse() if c.choices]) == 4
    assert request_id
    wait_for(lambda: ledger_ids(stack), lambda ids: request_id in ids, timeout=15)


def test_behind_a_trusted_proxy_its_request_id_is_kept_to_the_usage_record(
    tmp_path: Path,
) -> None:
    chosen = f"front-proxy-{uuid.uuid4()}"
    with running_stack(
        tmp_path, ledger="sqlite:///{state_dir}/usage.db", trust_client_request_id=True
    ) as trusted:
        raw = trusted.client().chat.completions.with_raw_response.create(
            model="model-a", messages=MESSAGES, extra_headers={"x-request-id": chosen}
        )
        assert raw.headers["x-request-id"] == chosen
        wait_for(lambda: ledger_ids(trusted), lambda ids: chosen in ids, timeout=15)


def _refused(stack: Stack, api_key: str, model: str) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as refused:
        stack.client(api_key).chat.completions.create(model=model, messages=MESSAGES)
    return refused.value


def test_refusals_name_their_request(stack: Stack) -> None:
    unauthorized = _refused(stack, "sk-arks-nobody", "model-a")
    unknown = _refused(stack, ALICE, "model-ghost")
    _ = stack.client(ONE_PER_MINUTE).chat.completions.create(model="model-a", messages=MESSAGES)
    limited = _refused(stack, ONE_PER_MINUTE, "model-a")
    assert (unauthorized.status_code, unknown.status_code, limited.status_code) == (401, 404, 429)
    ids = [e.request_id for e in (unauthorized, unknown, limited)]
    assert all(ids) and len(set(ids)) == 3


def test_envoys_own_answers_name_their_request(stack: Stack) -> None:
    """Local replies too: no credential (the Lua filter), a body over the limit (Envoy)."""
    with stack.http() as http:
        no_key = http.post(CHAT, json={"model": "model-a"})
        too_large = http.post(
            CHAT,
            content=b"x" * (5 * 1024 * 1024),
            headers={"authorization": f"Bearer {ALICE}"},
        )
    assert (no_key.status_code, too_large.status_code) == (401, 413)
    assert no_key.headers.get("x-request-id") and too_large.headers.get("x-request-id")


# --- 405 with Allow ---------------------------------------------------------------------------


def test_every_405_says_what_is_allowed(stack: Stack) -> None:
    auth = {"authorization": f"Bearer {ALICE}"}
    with stack.http() as http:
        on_models = http.post("/v1/models", json={}, headers=auth)
        on_chat = http.get(CHAT, headers=auth)
        on_embeddings = http.put("/v1/embeddings", json={"model": "model-a"}, headers=auth)
    assert [r.status_code for r in (on_models, on_chat, on_embeddings)] == [405] * 3
    assert on_models.headers["allow"] == "GET"
    assert on_chat.headers["allow"] == on_embeddings.headers["allow"] == "POST"
    assert on_chat.json()["error"]["code"] == "method_not_allowed"


# --- CORS -------------------------------------------------------------------------------------


def _preflight(http: httpx.Client, origin: str) -> httpx.Response:
    return http.options(
        CHAT,
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )


def test_a_preflight_from_an_allowed_origin_is_answered_without_a_token(stack: Stack) -> None:
    with stack.http() as http:
        answer = _preflight(http, ORIGIN)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in answer.headers["access-control-allow-methods"]
    assert "authorization" in answer.headers["access-control-allow-headers"]


def test_another_origin_gets_no_cors_headers(stack: Stack) -> None:
    with stack.http() as http:
        preflight = _preflight(http, "https://evil.example")
        actual = http.post(
            CHAT,
            json={"model": "model-a", "messages": MESSAGES},
            headers={"authorization": f"Bearer {ALICE}", "origin": "https://evil.example"},
        )
    assert preflight.status_code == 401  # not a preflight Envoy answers: the credential check
    assert "access-control-allow-origin" not in preflight.headers
    assert actual.status_code == 200
    assert "access-control-allow-origin" not in actual.headers


def test_answers_to_an_allowed_origin_carry_its_cors_headers(stack: Stack) -> None:
    """Errors too: a browser's code can read why it was refused, and the request id."""
    with stack.http() as http:
        served = http.post(
            CHAT,
            json={"model": "model-a", "messages": MESSAGES},
            headers={"authorization": f"Bearer {ALICE}", "origin": ORIGIN},
        )
        refused = http.post(
            CHAT, json={"model": "model-a", "messages": MESSAGES}, headers={"origin": ORIGIN}
        )
    assert (served.status_code, refused.status_code) == (200, 401)
    for answer in (served, refused):
        assert answer.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in answer.headers["access-control-expose-headers"]


def test_request_ids_are_unique(stack: Stack) -> None:
    with stack.http() as http:
        ids = {
            http.get("/v1/models", headers={"authorization": f"Bearer {ALICE}"}).headers[
                "x-request-id"
            ]
            for _ in range(5)
        }
    assert len(ids) == 5 and all(uuid.UUID(i) for i in ids)
