"""Anthropic Messages (`POST /v1/messages`, as vLLM serves it) through real Envoy and extproc, in
plain HTTP with Anthropic's `x-api-key` credential (the `anthropic` SDK is not a dependency).

Charged exactly the answer's `usage.input_tokens` / `output_tokens`; a stream's, from its
`message_delta` event, which vLLM writes with both (its message_start has the input tokens only).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from arks.tokens import count_prompt
from launcher.sim import TOKEN
from tests.support.stack import ALICE, Stack, Usage, running_stack

pytestmark = pytest.mark.timeout(120)
MODEL = "model-a"
BODY: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 9,
    "messages": [{"role": "user", "content": "Which lighthouse is the oldest in Portugal?"}],
}
HEADERS = {"x-api-key": ALICE, "anthropic-version": "2023-06-01", "x-sim-output-tokens": "30"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("messages")) as running:
        yield running


def events(text: str) -> list[dict[str, Any]]:
    """The stream's JSON events (the `data:` lines), without vLLM's closing [DONE]."""
    return [
        json.loads(line.removeprefix("data: "))
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def test_a_message_is_charged_its_input_and_output_tokens_exactly(stack: Stack) -> None:
    before = stack.usage("alice", MODEL)

    with stack.http() as http:
        answer = http.post("/v1/messages", json=BODY, headers=HEADERS)

    assert answer.status_code == 200, answer.text
    message = answer.json()
    assert message["type"] == "message" and message["stop_reason"] == "max_tokens"
    assert message["content"] == [{"type": "text", "text": TOKEN * 9}]
    prompt = count_prompt(BODY)
    assert message["usage"] == {"input_tokens": prompt, "output_tokens": 9}
    assert stack.wait_usage("alice", MODEL, before) == Usage(
        requests=1, prompt=prompt, completion=9, estimated=0
    )


def test_a_streamed_message_is_charged_from_its_message_delta(stack: Stack) -> None:
    before = stack.usage("alice", MODEL)

    with stack.http() as http:
        answer = http.post("/v1/messages", json={**BODY, "stream": True}, headers=HEADERS)

    assert answer.status_code == 200, answer.text
    stream = events(answer.text)
    assert [e["type"] for e in stream][:2] == ["message_start", "content_block_start"]
    assert [e["type"] for e in stream][-3:] == ["content_block_stop", "message_delta",
                                                "message_stop"]  # fmt: skip
    assert "".join(e["delta"]["text"] for e in stream if e["type"] == "content_block_delta") == (
        TOKEN * 9
    )
    prompt = count_prompt(BODY)
    assert stream[-2]["usage"] == {"input_tokens": prompt, "output_tokens": 9}
    assert stack.wait_usage("alice", MODEL, before) == Usage(
        requests=1, prompt=prompt, completion=9, estimated=0
    )


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({k: v for k, v in BODY.items() if k != "model"}, "missing_model"),
        ({**BODY, "stream": "yes"}, "invalid_type"),
        ({**BODY, "max_tokens": -1}, "invalid_type"),
    ],
)
def test_bad_messages_get_a_400(stack: Stack, body: dict[str, Any], code: str) -> None:
    with stack.http() as http:
        answer = http.post("/v1/messages", json=body, headers=HEADERS)

    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == code


def test_the_engines_own_400_passes_through_uncharged(stack: Stack) -> None:
    """vLLM requires max_tokens: its refusal reaches the client, and costs nothing."""
    before = stack.usage("alice", MODEL)
    body = {k: v for k, v in BODY.items() if k != "max_tokens"}

    with stack.http() as http:
        answer = http.post("/v1/messages", json=body, headers=HEADERS)

    assert answer.status_code == 400, answer.text
    assert stack.wait_usage("alice", MODEL, before) == Usage(requests=1)
