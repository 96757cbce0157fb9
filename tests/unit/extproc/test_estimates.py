"""Estimates within ±20 % of the tokenizer's count, for prompts and answers of every shape.

The truth is what the engine simulator reports (`arks.tokens`, the same tokenizer); the samples
are what usage.lua keeps (the body's head, an answer's head or tail), escaped as it does.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import orjson
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import wrappers_pb2

from arks.api import token_digest
from arks.policy import build_policy
from arks.tokens import count_prompt, count_text, encoding
from arks.wire import PROMPT_METADATA_NAMESPACE
from extproc import codec
from extproc.decision import Forward
from extproc.estimate import (
    EXACT_BYTES,
    PROMPT_SAMPLE_BYTES,
    answer_estimate,
    prompt_estimate,
    prompt_tokens,
    text_tokens,
    unescape,
)
from extproc.gateway import decide_body, decide_headers
from extproc.request import BodyFacts, RequestInfo
from extproc.usage import Finished, usage_of

PROSE = (
    "The gateway admits each request against its tenant's budgets before the engine sees it, "
    "and charges the tokens the engine reports once the answer ends. When no usage comes back, "
    "because a stream was cut or an engine left it out, an estimate is charged instead. "
)
CODE = (
    "def settle(request_id: str, charges: list[Charge]) -> None:\n"
    "    for charge in charges:\n        store.add(charge.key, charge.tokens)  # tpm, tpd\n"
)
ACCENTED = "Crème brûlée, façade, naïve café — déjà vu à São Paulo; 東京の天気は晴れです。 "
SHORT = ("Hi", "Say hello", "What is 2+2?", "Tell me about the weather in Lisbon in spring.")
TEXTS = (
    *SHORT,
    PROSE,
    PROSE * 8,
    CODE * 20,
    ACCENTED * 10,
    (PROSE + CODE) * 30,
    (PROSE + ACCENTED) * 80,  # text that changes kind every 300 characters: windows can alias
    " hello" * 3000,
)


def escape(raw: bytes) -> str:
    """What usage.lua keeps: `%` and bytes above 0x7f written `%XX`."""
    return "".join(f"%{b:02X}" if b == 0x25 or b >= 0x80 else chr(b) for b in raw)


def lua_head(raw: bytes, size: int) -> bytes:
    """What usage.lua keeps of a body or a stream's start: `size` bytes, cut to whole UTF-8
    characters (of valid UTF-8, only a character cut at the end is dropped)."""
    return raw[:size].decode("utf-8", "ignore").encode()


def close(estimate: int | None, truth: int) -> bool:
    """Within ±20 % (±1 token for the shortest texts, where one token is more than 20 %)."""
    assert estimate is not None
    return abs(estimate - truth) <= max(1, 0.2 * truth)


# --- text ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS, ids=lambda t: f"{len(t)}ch")
def test_text_is_counted_within_20_percent(text: str) -> None:
    assert close(text_tokens(text), count_text(text))


def test_short_text_is_counted_exactly() -> None:
    text = (PROSE * 10)[: EXACT_BYTES - 1]
    assert text_tokens(text) == count_text(text)
    assert text_tokens("") == 0


def test_escaping_round_trips_any_bytes() -> None:
    raw = (ACCENTED + "100% sure").encode()[:-3] + b"\xff\x00"
    assert unescape(escape(raw)) == raw


# --- prompts -----------------------------------------------------------------------------------


def chat(*contents: object) -> dict:
    roles = ("system", "user", "assistant")
    return {
        "model": "qwen",
        "messages": [{"role": roles[i % 3], "content": c} for i, c in enumerate(contents)],
        "max_tokens": 64,
        "temperature": 0.7,
    }


BODIES = {
    "chat, one short message": chat("Say hello"),
    "chat, 4 tokens": chat("Hello, world!"),
    "chat, multi-message": chat(PROSE, "Summarise that.", "It says usage is estimated.", CODE),
    "chat, multi-part content": chat(
        [{"type": "text", "text": PROSE}, {"type": "image_url", "image_url": {"url": "x"}}],
        [{"type": "text", "text": "and "}, {"type": "text", "text": ACCENTED}],
    ),
    "chat, long": chat(PROSE * 40, CODE * 40),
    "chat, non-ASCII": chat(ACCENTED * 30),
    "chat, long, alternating kinds": chat("You are terse.", (PROSE + ACCENTED) * 80),
    "completions, one prompt": {"model": "qwen", "prompt": "Once upon a time"},
    "completions, a list of prompts": {"model": "qwen", "prompt": [PROSE, "Say hi", CODE * 3]},
    "completions, long": {"model": "qwen", "prompt": PROSE * 200},
    "embeddings, one input": {"model": "qwen", "input": "a sentence to embed"},
    "embeddings, inputs": {"model": "qwen", "input": [PROSE, ACCENTED, "third"]},
}


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_prompt_from_the_body_within_20_percent(body: dict) -> None:
    assert close(prompt_tokens(body), count_prompt(body))


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_prompt_from_envoys_sample_within_20_percent(body: dict) -> None:
    raw = orjson.dumps(body)
    assert close(prompt_estimate(lua_head(raw, PROMPT_SAMPLE_BYTES), len(raw)), count_prompt(body))


def test_a_four_token_prompt_is_four_tokens_not_its_body_size() -> None:
    body = chat("Hello, world!")
    raw = orjson.dumps(body)
    assert prompt_estimate(raw, len(raw)) == count_prompt(body) == 4
    assert len(raw) / 4 > 3 * count_prompt(body)  # what bytes/4 of the whole JSON would say


def test_prompt_cut_inside_a_character_or_an_escape_still_counts() -> None:
    body = chat(ACCENTED * 200 + 'and "quoted"\n' * 500)
    raw = orjson.dumps(body)
    for cut in range(PROMPT_SAMPLE_BYTES - 6, PROMPT_SAMPLE_BYTES):
        assert close(prompt_estimate(lua_head(raw, cut), len(raw)), count_prompt(body))


def test_prompts_given_as_token_ids_count_one_each() -> None:
    assert prompt_tokens({"model": "m", "prompt": [1, 2, 3, 4]}) == 4
    assert prompt_tokens({"model": "m", "prompt": [[1, 2], [3, 4, 5]]}) == 5
    assert prompt_tokens({"model": "m", "input": [[7] * 10]}) == 10


def test_a_body_that_is_not_json_estimates_its_strings() -> None:
    raw = b'{"model": "m", "prompt": "' + PROSE.encode() + b'",,}'
    assert close(prompt_estimate(raw, len(raw)), count_text(PROSE) + count_text("m"))
    assert prompt_estimate(b"", 0) == 0


# --- answers -----------------------------------------------------------------------------------


def chunk(chat_: bool, text: str | None, finish: str | None = None) -> bytes:
    if chat_:
        delta = {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    event = {"id": "chatcmpl-4f2a9c", "object": kind, "created": 1, "model": "qwen"}
    return b"data: " + orjson.dumps({**event, "choices": [choice]}) + b"\n\n"


def token_pieces(text: str) -> list[str]:
    """`text` as an engine streams it: a token per event, a character split over tokens whole."""
    parts: list[str] = []
    pending = b""
    for token in encoding().encode(text):
        pending += encoding().decode_single_token_bytes(token)
        try:
            parts.append(pending.decode())
        except UnicodeDecodeError:
            continue
        pending = b""
    return parts


def stream(text: str, chat_: bool, *, pieces: int = 0, cut: bool = False) -> bytes:
    """An engine's stream of `text`, one token per event (or `pieces` equal slices)."""
    if pieces:
        step = -(-len(text) // pieces)
        parts = [text[i : i + step] for i in range(0, len(text), step)]
    else:
        parts = token_pieces(text)
    out = chunk(chat_, "") if chat_ else b""
    out += b"".join(chunk(chat_, p) for p in parts)
    if cut:
        return out
    return out + chunk(chat_, None, "stop") + b"data: [DONE]\n\n"


TAIL = 4096
SAMPLE_AT = 2048  # usage.lua's early sample of a stream


def tail_of(raw: bytes) -> bytes:
    return raw[-TAIL:]


ANSWERS = ("Hello!", " hello" * 16, PROSE, PROSE * 6, CODE * 30, ACCENTED * 20, " hello" * 1000)


@pytest.mark.parametrize("text", ANSWERS, ids=lambda t: f"{len(t)}ch")
@pytest.mark.parametrize("chat_", [True, False], ids=["chat", "completions"])
def test_streamed_answer_within_20_percent(text: str, chat_: bool) -> None:
    raw = stream(text, chat_)
    assert close(answer_estimate(tail_of(raw), len(raw), stream=True), count_text(text))


@pytest.mark.parametrize("text", ANSWERS[2:], ids=lambda t: f"{len(t)}ch")
def test_cut_stream_from_its_head_within_20_percent(text: str) -> None:
    raw = stream(text, True, cut=True)
    head = lua_head(raw, SAMPLE_AT)
    assert close(answer_estimate(head, len(raw), stream=True), count_text(text))


def test_stream_whose_engine_sends_several_tokens_per_event() -> None:
    text = PROSE * 12
    raw = stream(text, True, pieces=40)
    assert close(answer_estimate(tail_of(raw), len(raw), stream=True), count_text(text))


def test_stream_sample_without_content_says_so() -> None:
    raw = chunk(True, None, "stop") + b"data: [DONE]\n\n"
    assert answer_estimate(raw, 10_000, stream=True) is None
    assert answer_estimate(raw, len(raw), stream=True) == 0


def whole(text: str, chat_: bool, choices: int = 1) -> bytes:
    def choice(i: int) -> dict:
        body: dict = (
            {"message": {"role": "assistant", "content": text, "tool_calls": []}}
            if chat_
            else {"text": text}
        )
        return {"index": i, **body, "logprobs": None, "finish_reason": "stop"}

    kind = "chat.completion" if chat_ else "text_completion"
    envelope = {"id": "chatcmpl-4f2a9c", "object": kind, "created": 1, "model": "qwen"}
    return orjson.dumps({**envelope, "choices": [choice(i) for i in range(choices)]})


@pytest.mark.parametrize("text", ANSWERS, ids=lambda t: f"{len(t)}ch")
@pytest.mark.parametrize("chat_", [True, False], ids=["chat", "completions"])
def test_json_answer_within_20_percent(text: str, chat_: bool) -> None:
    raw = whole(text, chat_)
    head = raw[:TAIL]
    assert close(answer_estimate(head, len(raw), stream=False), count_text(text))


def test_json_answer_with_several_choices_counts_each() -> None:
    raw = whole(PROSE, True, choices=3)
    assert answer_estimate(raw, len(raw), stream=False) == 3 * count_text(PROSE)


def test_json_answer_of_reasoning_counts_it() -> None:
    message = {"role": "assistant", "content": "4", "reasoning_content": PROSE}
    raw = orjson.dumps({"choices": [{"index": 0, "message": message}]})
    assert answer_estimate(raw, len(raw), stream=False) == count_text(PROSE) + 1


def test_json_sample_without_content_says_so() -> None:
    raw = b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role"'
    assert answer_estimate(raw, 10_000, stream=False) is None


# --- the samples' way in and out: the decision, the access log, the charge ------------------


def test_a_request_decided_on_its_headers_is_not_tokenised() -> None:
    """The hot path: Envoy lifted the facts, nothing is counted; a parsed body is counted."""
    body = chat("Hello, world!", PROSE)
    raw = orjson.dumps(body)
    token = _token()
    policy = build_policy([("token", token), ("endpoint", ENDPOINT)])
    grant = policy.token(token_digest("sk-alice"))
    assert grant is not None
    info = RequestInfo(
        "POST",
        "/v1/chat/completions",
        {"authorization": "Bearer sk-alice"},
        BodyFacts(model="qwen", stream=False),
    )
    on_headers = decide_headers(info, policy, datetime.now(UTC))
    assert isinstance(on_headers, Forward)
    assert on_headers.prompt_estimate is None
    assert "prompt_estimate" not in on_headers.metadata["io.arks"]  # usage.lua samples the body
    on_body = decide_body(replace(info, body=BodyFacts()), raw, grant, policy)
    assert isinstance(on_body, Forward) and on_body.prompt_estimate == count_prompt(body)
    assert on_body.metadata["io.arks"]["prompt_estimate"] == count_prompt(body)


ENDPOINT = {
    "apiVersion": "arks.ai/v1",
    "kind": "ArksEndpoint",
    "metadata": {"name": "qwen", "namespace": "default"},
    "spec": {},
}


def _token() -> dict:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksToken",
        "metadata": {"name": "alice", "namespace": "default"},
        "spec": {
            "tokenHash": token_digest("sk-alice"),
            "qos": [{"arksEndpoint": {"name": "qwen"}}],
        },
    }


def log_entry(arks: dict) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry(
        request=accesslog_pb2.HTTPRequestProperties(request_id="r", path="/v1/chat/completions"),
        response=accesslog_pb2.HTTPResponseProperties(
            response_code=wrappers_pb2.UInt32Value(value=200), response_body_bytes=4567
        ),
    )
    entry.common_properties.metadata.filter_metadata["io.arks"].update(
        {"namespace": "default", "user": "alice", "model": "qwen", **arks}
    )
    return entry


def test_finished_reads_the_answer_sample_and_a_blanked_one_is_none() -> None:
    done = codec.finished(log_entry({"answer_sample": "%E2%80%94"}))
    assert done is not None and done.answer_sample == "%E2%80%94"
    blanked = codec.finished(log_entry({"answer_sample": ""}))
    assert blanked is not None and blanked.answer_sample is None


def test_finished_reads_a_cut_streams_head() -> None:
    done = codec.finished(log_entry({"answer_head": "data: {}", "answer_sample": ""}))
    assert done is not None and (done.answer_head, done.answer_sample) == ("data: {}", None)


def test_finished_reads_the_prompt_sample_from_its_own_namespace() -> None:
    entry = log_entry({})
    assert (done := codec.finished(entry)) is not None and done.prompt_sample is None
    entry.common_properties.metadata.filter_metadata[PROMPT_METADATA_NAMESPACE].update(
        {"sample": "%E2%80%94"}
    )
    assert (done := codec.finished(entry)) is not None and done.prompt_sample == "%E2%80%94"
    entry.common_properties.metadata.filter_metadata[PROMPT_METADATA_NAMESPACE].update(
        {"sample": ""}  # blanked by usage.lua: the engine reported usage
    )
    assert (done := codec.finished(entry)) is not None and done.prompt_sample is None


DONE = Finished(
    request_id="r",
    namespace="default",
    user="alice",
    model="qwen",
    path="/v1/chat/completions",
    stream=False,
    status=200,
    prompt_tokens=None,
    completion_tokens=None,
    prompt_estimate=4,
    request_body_bytes=120,
    response_body_bytes=0,
)


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "stream"])
def test_usage_of_an_answer_without_usage_counts_its_sample(streamed: bool) -> None:
    raw = stream(PROSE * 30, True) if streamed else whole(PROSE * 30, True)
    sample = escape(raw[-TAIL:] if streamed else raw[:TAIL])
    done = replace(DONE, stream=streamed, response_body_bytes=len(raw), answer_sample=sample)
    usage = usage_of(done)
    assert usage is not None and usage.estimated == "no_usage_reported"
    assert usage.prompt_tokens == 4  # the admission's estimate, not the body's size
    assert close(usage.completion_tokens, count_text(PROSE * 30))


def test_usage_of_a_sample_without_content_falls_back_on_the_size() -> None:
    sample = escape(b'{"id":"x","choices":[{"index":0,"message":{"role"')
    done = replace(DONE, response_body_bytes=250 + 4 * 30, answer_sample=sample)
    usage = usage_of(done)
    assert usage is not None and usage.completion_tokens == 30
    embeddings = usage_of(replace(done, path="/v1/embeddings", answer_sample=escape(b"{}")))
    assert embeddings is not None and embeddings.completion_tokens == 0


@pytest.mark.parametrize(
    "text", [PROSE, PROSE * 200, ACCENTED * 100], ids=["short", "long", "utf8"]
)
def test_usage_of_a_request_without_usage_counts_its_prompt_sample(text: str) -> None:
    body = chat("Hello, world!", text)
    raw = orjson.dumps(body)
    done = replace(
        DONE,
        prompt_estimate=None,
        request_body_bytes=len(raw),
        prompt_sample=lua_head(raw, PROMPT_SAMPLE_BYTES).decode(),
    )
    usage = usage_of(done)
    assert usage is not None and close(usage.prompt_tokens, count_prompt(body))


def test_usage_of_a_request_with_usage_never_counts_its_samples() -> None:
    """A blank-free sample left behind (a cut stream's, say) is not read once usage is known."""
    done = replace(
        DONE,
        prompt_tokens=12,
        completion_tokens=34,
        prompt_estimate=None,
        prompt_sample="%ZZ not a sample",
        answer_sample="%ZZ not a sample",
    )
    usage = usage_of(done)
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (12, 34)
    assert usage.estimated is None


def test_usage_of_a_request_without_a_prompt_sample_falls_back_on_the_size() -> None:
    done = replace(DONE, prompt_estimate=None, request_body_bytes=40 + 4 * 50)
    usage = usage_of(done)
    assert usage is not None and usage.prompt_tokens == 50


def test_usage_of_a_cut_stream_counts_its_head() -> None:
    raw = stream(ACCENTED * 40, True, cut=True)
    head = lua_head(raw, SAMPLE_AT).decode()
    done = replace(DONE, stream=True, response_body_bytes=len(raw), answer_head=head)
    usage = usage_of(replace(done, interrupted="client_disconnected"))
    assert usage is not None and usage.estimated == "client_disconnected"
    assert close(usage.completion_tokens, count_text(ACCENTED * 40))


def test_a_lone_surrogate_is_counted_not_raised_on() -> None:
    """Python's json parser takes "\\ud800" (extproc's fallback parser): no UTF-8 for it."""
    body = {"model": "m", "messages": [{"role": "user", "content": "Hello \ud800" * 300}]}
    assert close(prompt_tokens(body), count_prompt(body))
