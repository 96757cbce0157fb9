"""Token estimates for what the engine did not count for us: pure functions over text samples.

An answer without engine-reported usage (an interrupted stream, an engine that omits `usage`, a
client that said `include_usage: false`) is charged an estimate, counted at settlement and only
then: a request that reports usage is never tokenised. (A body extproc parses anyway, the rare
path, is counted at admission with `prompt_tokens`.) The tokenizer runs over the text only — the
messages' content, the prompt(s), the input(s), the answer's content — never the JSON around it:
a 4-token prompt in a 120-byte body is 4 tokens, not 20.

Python gets samples, not whole bodies, through the access log (envoy/usage.lua keeps them and
blanks them when usage comes back): the request body's first `PROMPT_SAMPLE_BYTES` and a stream's
first 2 KiB as they are, cut to whole UTF-8 characters (they are taken on every request, so
nothing is done per byte); an answer's first (JSON) or last (stream) few KiB, taken only when it
ended without usage, with `%` and every byte above 0x7f written `%XX` (`unescape`). What a sample
does not cover is extrapolated at the sample's own tokens per byte.

The tokenizer costs ~90 µs per KiB of text, so text is counted exactly up to
`EXACT_BYTES`; longer text is counted on `WINDOWS` evenly spread windows of `WINDOW_CHARS`
characters and scaled by its length in bytes: at most ~1,024 characters tokenized per request,
whatever its size (~100 µs; a few per cent off: the windows' cut words, text that changes kind).
Smaller windows halve the cost but land up to 14 % off on text alternating prose and CJK.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from arks.tokens import count_text, prompt_text

EXACT_BYTES = 1024  # text up to this many UTF-8 bytes is counted exactly
WINDOWS = 4  # longer text: this many windows, evenly spread ...
WINDOW_CHARS = 256  # ... of this many characters each
PROMPT_SAMPLE_BYTES = 8192  # the request body's head usage.lua keeps (PROMPT_SAMPLE there)
_ANSWER_TAIL = 150  # bytes of a JSON answer after its content ("finish_reason" …), roughly

# A JSON string from its opening quote: its raw text, whether it closed, whether it is a key.
_STRING = re.compile(rb'"([^"\\]*(?:\\.[^"\\]*)*)(")?(\s*:)?', re.S)
# Where a JSON answer's content starts (chat message, completions choice, reasoning).
_CONTENT_START = re.compile(rb'"(?:content|reasoning_content|text)"\s*:\s*"')
_ANSWER_KEYS = ("content", "reasoning_content")


def unescape(sample: str) -> bytes:
    """Envoy's sample back to its bytes (usage.lua escapes `%` and bytes > 0x7f)."""
    return urllib.parse.unquote_to_bytes(sample)


def _utf8_bytes(text: str) -> int:
    # A lone surrogate ("\ud800" in a body Python's json parsed) has no UTF-8: it counts as 3.
    return len(text.encode("utf-8", "surrogatepass"))


def text_tokens(text: str) -> int:
    """The tokenizer's count of `text`: exact up to `EXACT_BYTES`, sampled beyond (see above)."""
    size = _utf8_bytes(text)
    if size <= EXACT_BYTES:
        return count_text(text)
    step = max(1, (len(text) - WINDOW_CHARS) // (WINDOWS - 1))
    windows = [text[i * step : i * step + WINDOW_CHARS] for i in range(WINDOWS)]
    sampled = sum(_utf8_bytes(w) for w in windows)
    return round(sum(count_text(w) for w in windows) * size / sampled)


def _token_ids(value: Any) -> int:
    """Tokens given as ids (a completions prompt or embeddings input): one per id."""
    if not isinstance(value, list) or not value:
        return 0
    if all(isinstance(v, int) for v in value):
        return len(value)
    return sum(len(v) for v in value if isinstance(v, list) and all(isinstance(i, int) for i in v))


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """The prompt's tokens: the text `arks.tokens.prompt_text` finds (what the simulator counts),
    plus prompts given as token ids."""
    ids = 0 if isinstance(body.get("messages"), list) else _token_ids(body.get("prompt"))
    return text_tokens(prompt_text(body)) + ids + _token_ids(body.get("input"))


def _decode(raw: bytes) -> str:
    """A JSON string's raw text, unescaped; cut short (a truncated sample), as much as decodes."""
    for end in (len(raw), len(raw) - 1, len(raw) - 5):  # a trailing "\" or "\u12" cut in two
        try:
            text = orjson.loads(b'"' + raw[: max(0, end)] + b'"')
        except orjson.JSONDecodeError:
            continue
        return text if isinstance(text, str) else ""
    return raw.decode("utf-8", "replace")


def _value_strings(raw: bytes) -> Iterable[bytes]:
    """The raw text of every string value in a (possibly truncated) JSON text; keys skipped."""
    for match in _STRING.finditer(raw):
        if match.group(3) is None or match.group(2) is None:
            yield match.group(1)


def prompt_estimate(raw: bytes, body_bytes: int) -> int:
    """A request's prompt tokens from the head of its body (`body_bytes` long).

    A whole body is parsed and counted like `prompt_tokens`. A longer one is cut: its sample's
    string values (the prompt's start; the model and roles are a few tokens of it) give the
    tokens per byte, and the bytes beyond the sample are taken for prompt text.
    """
    if len(raw) >= body_bytes:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if isinstance(body, dict):
            return prompt_tokens(body)
    values = list(_value_strings(raw))
    text = "".join(_decode(v) for v in values)
    raw_text = sum(len(v) for v in values)
    if raw_text == 0:
        return 0
    return round(text_tokens(text) * (raw_text + max(0, body_bytes - len(raw))) / raw_text)


def _choice_texts(choices: Any, stream: bool) -> Iterable[str]:
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, Mapping):
            continue
        if isinstance(choice.get("text"), str):
            yield choice["text"]
        message = choice.get("delta" if stream else "message")
        if isinstance(message, Mapping):
            for key in _ANSWER_KEYS:
                if isinstance(message.get(key), str):
                    yield message[key]


def _answer_whole(raw: bytes) -> int | None:
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(answer, Mapping):
        return None
    return sum(text_tokens(t) for t in _choice_texts(answer.get("choices"), stream=False))


def _answer_cut(raw: bytes, response_bytes: int) -> int | None:
    start = _CONTENT_START.search(raw)
    if start is None:
        return None
    content = raw[start.end() :]
    end = _STRING.match(b'"' + content)
    if end is not None and end.group(2) is not None:  # the content ended within the sample
        return text_tokens(_decode(end.group(1)))
    if not content:
        return None
    content_bytes = max(len(content), response_bytes - start.end() - _ANSWER_TAIL)
    return round(text_tokens(_decode(content)) * content_bytes / len(content))


def _events(raw: bytes) -> Iterable[tuple[int, Any]]:
    """A stream sample's complete SSE events: (bytes on the wire, parsed data or None)."""
    for part in raw.split(b"\n\n"):
        size = len(part) + 2
        data = part.removeprefix(b"data: ") if part.startswith(b"data: ") else None
        if data is None:
            continue
        if data.strip() == b"[DONE]":
            yield size, None
            continue
        try:
            yield size, orjson.loads(data)
        except orjson.JSONDecodeError:
            continue  # the sample's first event, cut


def _stream(raw: bytes, response_bytes: int) -> int | None:
    content_bytes = other_bytes = 0
    texts: list[str] = []
    for size, event in _events(raw):
        text = ""
        if isinstance(event, Mapping):
            text = "".join(_choice_texts(event.get("choices"), stream=True))
        if text:
            content_bytes += size
            texts.append(text)
        else:
            other_bytes += size
    tokens = text_tokens("".join(texts))
    if len(raw) >= response_bytes:
        return tokens
    if content_bytes == 0:
        return None
    return round(tokens * max(0, response_bytes - other_bytes) / content_bytes)


def answer_estimate(raw: bytes, response_bytes: int, stream: bool) -> int | None:
    """An answer's completion tokens from Envoy's sample of it; None when the sample holds no
    content to count (the caller falls back to the answer's size).

    A stream sample (its last few KiB, or its first ones if it was cut off) gives the tokens per
    byte of its content-bearing events; the answer's bytes less its sampled events without content
    (role, finish, usage, `[DONE]`) are counted at that rate. A JSON answer's sample is its head:
    whole, it is counted exactly; cut, its content's start gives the rate for the rest.
    """
    if stream:
        return _stream(raw, response_bytes)
    if len(raw) >= response_bytes:
        return _answer_whole(raw)
    return _answer_cut(raw, response_bytes)
