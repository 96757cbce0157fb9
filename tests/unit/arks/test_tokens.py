"""The prompt text the gateway estimates on, for chat, completions and embeddings bodies."""

from __future__ import annotations

from typing import Any

import pytest

from arks.tokens import count_prompt, count_text, prompt_text


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ]
            },
            "Be brief.\nHi",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "a"},
                            {"type": "image_url", "image_url": {}},
                            "b",
                        ],
                    }
                ]
            },
            "a\nb",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": None, "tool_calls": []},
                    "junk",
                    {"content": "x"},
                ]
            },
            "x",
        ),
        ({"prompt": "Once upon a time"}, "Once upon a time"),
        ({"prompt": ["one", 2, "three"]}, "one\nthree"),
        ({"input": "embed me"}, "embed me"),
        ({"input": ["a", "b"]}, "a\nb"),
        ({"input": [[1, 2, 3]]}, ""),  # token ids: nothing to count as text
        ({"model": "qwen"}, ""),
        ({"query": "q", "documents": ["d1", "d2"]}, "q\nd1\nq\nd2"),  # the query per document
        ({"text_1": "q", "text_2": "d"}, "q\nd"),
        ({"text_1": ["a", "b"], "text_2": ["c", "d"]}, "a\nc\nb\nd"),  # pairwise
        ({"queries": "q", "documents": ["d"]}, "q\nd"),
        ({"queries": ["q"], "items": ["i1", "i2"]}, "q\ni1\nq\ni2"),
        ({"data_1": "a", "data_2": "b"}, "a\nb"),
        ({"query": "q", "documents": {"content": []}}, ""),  # multimodal: no text
    ],
    ids=[
        "chat",
        "chat-parts",
        "chat-odd-messages",
        "prompt",
        "prompt-list",
        "input",
        "input-list",
        "token-ids",
        "empty",
        "rerank",
        "score-text",
        "score-pairwise",
        "score-queries-documents",
        "score-queries-items",
        "score-data",
        "rerank-multimodal",
    ],
)
def test_prompt_text(body: dict[str, Any], text: str) -> None:
    assert prompt_text(body) == text


def test_messages_take_precedence_over_prompt() -> None:
    assert prompt_text({"messages": [{"content": "chat"}], "prompt": "completion"}) == "chat"


def test_count_prompt_counts_cl100k_tokens() -> None:
    assert count_text("") == 0
    assert count_text(" hello") == 1  # the simulator's token
    assert count_prompt({"prompt": " hello" * 7}) == 7


def test_special_token_text_is_counted_not_rejected() -> None:
    assert count_text("<|endoftext|>") > 0
