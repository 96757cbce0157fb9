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
