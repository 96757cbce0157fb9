"""How many tokens a finished request used: what the engine reported, or an estimate.

Input is what the access log says about a finished request (`Finished`), output is a `Usage`
to charge. Nothing admitted goes uncharged: without engine-reported usage, the prompt and the
completion are counted with the tokenizer on the samples usage.lua left of the request's body and
of the answer (`extproc.estimate`; a body extproc parsed was counted when it was admitted). Only
here, for a request without usage, is a sample counted: one that reports usage costs nothing.
Without samples the charge falls back on sizes (the body's, the bytes Envoy sent).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from arks.tokens import BYTES_PER_TOKEN
from extproc.estimate import answer_estimate, prompt_estimate, unescape
from extproc.request import PathKind, path_kind
from extproc.reservation import Reservation

# A streamed chunk as vLLM sends it, without the token text; its length calibrates the estimate.
_CHAT_CHUNK = (
    'data: {"id":"chatcmpl-00000000000000000000000000000000","object":"chat.completion.chunk",'
    '"created":1700000000,"model":"%s","choices":[{"index":0,"delta":{"content":""},'
    '"logprobs":null,"finish_reason":null}]}\n\n'
)
_TEXT_CHUNK = (
    'data: {"id":"cmpl-00000000000000000000000000000000","object":"text_completion",'
    '"created":1700000000,"model":"%s","choices":[{"index":0,"text":"","logprobs":null,'
    '"finish_reason":null}]}\n\n'
)
_DONE = "data: [DONE]\n\n"
_ANSWER_OVERHEAD = 250  # bytes of a non-streamed answer around its text
_REQUEST_OVERHEAD = 40  # bytes of a request around its prompt


@dataclass(frozen=True)
class Finished:
    """One admitted request, as the access log reports it when it ends."""

    request_id: str
    namespace: str
    user: str
    model: str
    path: str
    stream: bool
    status: int
    prompt_tokens: int | None
    completion_tokens: int | None
    prompt_estimate: int | None
    request_body_bytes: int
    response_body_bytes: int
    interrupted: str | None = None  # "client_disconnected", "upstream_reset", …
    limits: Mapping[str, int] = field(default_factory=dict)  # token budgets to charge (tpm, tpd)
    reservation: Reservation | None = None  # what admission took, to give back
    prompt_sample: str | None = None  # usage.lua's sample of the request body's head, raw
    answer_sample: str | None = None  # usage.lua's sample of an answer without usage, %XX-escaped
    answer_head: str | None = None  # a stream's first bytes, raw, left when it was cut
    # Envoy's timings, in seconds from the request's first byte; None when Envoy has none.
    duration_s: float | None = None  # until the last byte of the answer went to the client
    first_byte_s: float | None = None  # until a stream's first content byte left (usage.lua's)
    upstream_s: float | None = None  # first byte sent to the engine until its last byte received
    choices: int = 1  # answers the engine writes (prompts x n); usage sums their tokens
    attempts: int = 0  # requests Envoy sent to engines (retries included); 0 when none
    upstream_host: str = ""  # the engine (host:port) Envoy sent it to last; "" when none
    started_at: float | None = None  # the request's first byte, seconds since the epoch
    response_id: str = ""  # a stored response's id (POST /v1/responses), read by usage.lua
    audio_seconds: float = 0.0  # an audio answer's reported duration (usage type "duration")


@dataclass(frozen=True)
class Usage:
    namespace: str
    user: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    estimated: str | None = None  # why it is an estimate; None when the engine reported it
    seconds: float = 0.0  # audio the engine transcribed, charged at the price per second

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def streamed_tokens_estimate(response_bytes: int, model: str, path: str) -> int:
    chat = "/chat/" in path
    template = _CHAT_CHUNK if chat else _TEXT_CHUNK
    per_token = len((template % model).encode()) + BYTES_PER_TOKEN
    chunks = round(max(0, response_bytes - len(_DONE)) / per_token)
    # A chat stream opens with a role chunk and closes with a finish chunk, neither holding a token.
    return max(0, chunks - 2) if chat else chunks


def _text_tokens_estimate(nbytes: int, overhead: int) -> int:
    return max(0, math.ceil((nbytes - overhead) / BYTES_PER_TOKEN))


def _prompt_estimate(done: Finished) -> int:
    """Counted at admission (a parsed body), else on usage.lua's sample, else from the size."""
    if done.prompt_estimate is not None:
        return done.prompt_estimate
    if done.prompt_sample is not None:
        return prompt_estimate(done.prompt_sample.encode(), done.request_body_bytes)
    return _text_tokens_estimate(done.request_body_bytes, _REQUEST_OVERHEAD)


def _generates(path: str) -> bool:
    """The engine wrote completion tokens (chat, completions); embeddings, rerank, score … not."""
    kind = path_kind(path)
    return kind is None or kind.generates


def _completion_estimate(done: Finished) -> int:
    """From the answer's content when usage.lua sampled it, else from the answer's size."""
    if not _generates(done.path):
        return 0
    sample = None
    if done.answer_sample is not None:
        sample = unescape(done.answer_sample)
    elif done.answer_head is not None:
        sample = done.answer_head.encode()
    if sample is not None:
        counted = answer_estimate(sample, done.response_body_bytes, done.stream)
        if counted is not None:
            return counted
    if done.stream:
        return streamed_tokens_estimate(done.response_body_bytes, done.model, done.path)
    return _text_tokens_estimate(done.response_body_bytes, _ANSWER_OVERHEAD)


def usage_of(done: Finished) -> Usage | None:
    """What to charge for a finished request; None when nothing is owed (an error answer)."""
    if path_kind(done.path) in (PathKind.TOKENIZER, PathKind.STORED):  # requests, never tokens
        return None if done.status >= 400 else Usage(done.namespace, done.user, done.model, 0, 0)
    completion_tokens = done.completion_tokens
    if completion_tokens is None and not _generates(done.path):
        completion_tokens = 0  # embeddings, rerank, score … report prompt and total tokens only
    if done.prompt_tokens is not None and completion_tokens is not None:
        return Usage(
            done.namespace,
            done.user,
            done.model,
            done.prompt_tokens,
            completion_tokens,
            seconds=done.audio_seconds,
        )
    if done.status >= 400:
        return None  # an error answer (the engine refused, or never got the request): nothing owed
    prompt = _prompt_estimate(done)
    completion = _completion_estimate(done)
    reason = done.interrupted or "no_usage_reported"
    return Usage(done.namespace, done.user, done.model, prompt, completion, estimated=reason)
