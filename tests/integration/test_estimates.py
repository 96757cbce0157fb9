"""Estimates through the real stack: an engine that reports no usage is charged within ±20 % of
what it would have reported.

The simulator omits usage on `x-sim-omit-usage` (or when a stream's client said
`include_usage: false`), or drops the connection mid-answer; the truth is what it reports
otherwise: `count_prompt(body)` prompt tokens and the tokens it was told to send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from arks.tokens import count_prompt
from tests.support.stack import ALICE, Stack

PROSE = (
    "The gateway admits each request against its tenant's budgets before the engine sees it, "
    "and charges the tokens the engine reports once the answer ends. "
)
ACCENTED = "Crème brûlée, façade, naïve café — déjà vu à São Paulo; 東京の天気は晴れです。 "
OMIT = {"x-sim-omit-usage": "1"}


@dataclass(frozen=True)
class Case:
    path: str
    body: dict[str, Any]
    tokens: int  # the completion tokens the simulator sends
    headers: dict[str, str]
    reason: str = "no_usage_reported"


def chat(*contents: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": c} for c in contents]
    return {"model": "model-a", "messages": messages, **extra}


CASES = {
    "chat, 4-token prompt": Case("/v1/chat/completions", chat("Hello, world!"), 40, OMIT),
    "chat, long multi-message prompt": Case(
        "/v1/chat/completions",
        chat(PROSE * 60, "Summarise that.", PROSE * 40),
        300,
        OMIT,
    ),
    "chat, long UTF-8 prompt (its head cut inside a character)": Case(
        "/v1/chat/completions", chat("x" + ACCENTED * 150), 30, OMIT
    ),
    "chat, long answer": Case("/v1/chat/completions", chat("Talk."), 2000, OMIT),
    "chat, streamed, engine omits usage": Case(
        "/v1/chat/completions", chat("Say hello", stream=True), 200, OMIT
    ),
    "chat, streamed, client declines usage": Case(
        "/v1/chat/completions",
        chat(PROSE, stream=True, stream_options={"include_usage": False}),
        120,
        {},
    ),
    "chat, stream cut by the engine": Case(
        "/v1/chat/completions",
        chat(PROSE * 3, stream=True),
        50,
        {"x-sim-output-tokens": "200", "x-sim-disconnect-after": "50"},
        reason="upstream_reset",
    ),
    "completions, a list of prompts": Case(
        "/v1/completions",
        {"model": "model-a", "prompt": ["Once upon a time", PROSE, "The end"]},
        30,
        OMIT,
    ),
    "completions, streamed": Case(
        "/v1/completions", {"model": "model-a", "prompt": PROSE, "stream": True}, 100, OMIT
    ),
    "embeddings, inputs": Case(
        "/v1/embeddings", {"model": "model-a", "input": [PROSE, "second input"]}, 0, OMIT
    ),
    "rerank, long documents (the query read once per document)": Case(
        "/v1/rerank",
        {"model": "model-a", "query": "Which one is about budgets?", "documents": [PROSE * 4] * 20},
        0,
        OMIT,
    ),
    "score, pairs": Case(
        "/score",
        {"model": "model-a", "text_1": [PROSE, "short"], "text_2": ["one", PROSE]},
        0,
        OMIT,
    ),
}


def within_20_percent(charged: int, truth: int) -> bool:
    return abs(charged - truth) <= max(1, 0.2 * truth)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_unreported_usage_is_charged_within_20_percent(stack: Stack, case: Case) -> None:
    before = stack.usage("alice", "model-a")
    headers = {"authorization": f"Bearer {ALICE}", "x-sim-output-tokens": str(case.tokens)}
    headers.update(case.headers)
    with stack.http() as http:
        try:
            resp = http.post(case.path, json=case.body, headers=headers)
            assert resp.status_code == 200, resp.text
            assert '"usage"' not in resp.text
        except httpx.HTTPError:
            assert case.reason == "upstream_reset"  # the engine cut the stream
    charged = stack.wait_usage("alice", "model-a", before)
    assert charged.estimated == 1
    assert within_20_percent(charged.prompt, count_prompt(case.body)), (
        charged.prompt,
        count_prompt(case.body),
    )
    assert within_20_percent(charged.completion, case.tokens), (charged.completion, case.tokens)
    assert (
        stack.metric(
            "arks_usage_estimated_requests_total",
            namespace="default",
            user="alice",
            model="model-a",
            reason=case.reason,
        )
        >= 1
    )


def test_reported_usage_is_charged_exactly_whatever_the_samples(stack: Stack) -> None:
    """A stream long enough to be sampled early, and a big prompt: the engine's numbers win."""
    body = chat(PROSE * 100, stream=True)
    before = stack.usage("alice", "model-a")
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {ALICE}", "x-sim-output-tokens": "300"},
        )
    # The gateway asked for usage, read it, and cut its event from the client's stream.
    assert resp.status_code == 200 and '"usage"' not in resp.text
    charged = stack.wait_usage("alice", "model-a", before)
    assert (charged.prompt, charged.completion, charged.estimated) == (count_prompt(body), 300, 0)


def _post_raw(stack: Stack, body: bytes) -> httpx.Response:
    with stack.http() as http:
        return http.post(
            "/v1/chat/completions",
            content=body,
            headers={"authorization": f"Bearer {ALICE}", "content-type": "application/json"},
        )


def _chat_bytes(content: bytes) -> bytes:
    return b'{"model":"model-a","messages":[{"role":"user","content":"' + content + b'"}]}'


@pytest.mark.parametrize(
    "bad",
    [b"caf\xe9", b"\xf0\x9f\x98", b"\xed\xa0\x80", b"\\ud800"],
    ids=["latin-1", "cut", "surrogate", "surrogate-escape"],
)
def test_a_body_that_is_no_utf8_text_is_refused_before_it_is_sampled(
    stack: Stack, bad: bytes
) -> None:
    """usage.lua keeps the body's head as it is: the access log carries it as a protobuf string,
    which must be UTF-8. Such a body is refused first (invalid JSON, 400): by json_to_metadata,
    or by extproc when Envoy could not lift it."""
    resp = _post_raw(stack, _chat_bytes(b"Hello " + bad))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_json"
