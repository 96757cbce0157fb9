"""The facts of one request that the gateway decides on, independent of protobuf."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from arks.wire import DESTINATION_HEADER


class PathKind(Enum):
    """What an engine path does, which decides how its requests are admitted and charged."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    POOLING = "pooling"  # rerank, score, pooling, classify: a prompt read, no answer generated
    RESPONSES = "responses"  # POST /v1/responses: generates, and the engine stores the answer
    MESSAGES = "messages"  # POST /v1/messages (Anthropic): generates, streams report usage always
    TOKENIZER = "tokenizer"  # tokenize, detokenize: counted as requests, never as tokens
    STORED = "stored"  # a stored response read or cancelled: a request, never tokens
    AUDIO = "audio"  # transcriptions, translations: a multipart upload, charged by its duration

    @property
    def generates(self) -> bool:
        """The engine writes an answer token by token (a token limit, streams)."""
        return self in (PathKind.CHAT, PathKind.COMPLETIONS, PathKind.RESPONSES, PathKind.MESSAGES)

    @property
    def usage_option(self) -> bool:
        """A stream reports usage only when asked (stream_options.include_usage), and n/best_of
        apply. The Responses API always reports it, in response.completed; Anthropic Messages
        in message_delta."""
        return self in (PathKind.CHAT, PathKind.COMPLETIONS)

    @property
    def charged(self) -> bool:
        """Its tokens are charged (tpm/tpd, quota); a tokenizer or stored-response request
        costs none."""
        return self not in (PathKind.TOKENIZER, PathKind.STORED)


# Every path the gateway routes to a model's engines (the body's `model`); any other is a 404,
# the engines' admin paths (/metrics, /v1/load_lora_adapter, /sleep …) included. vLLM serves all
# of these; SGLang the OpenAI ones and /v1/rerank.
ENGINE_PATHS: Mapping[str, PathKind] = {
    "/v1/chat/completions": PathKind.CHAT,
    "/v1/completions": PathKind.COMPLETIONS,
    "/v1/embeddings": PathKind.EMBEDDINGS,
    "/rerank": PathKind.POOLING,
    "/v1/rerank": PathKind.POOLING,
    "/v2/rerank": PathKind.POOLING,
    "/score": PathKind.POOLING,
    "/v1/score": PathKind.POOLING,
    "/pooling": PathKind.POOLING,
    "/classify": PathKind.POOLING,
    "/v1/classify": PathKind.POOLING,
    "/tokenize": PathKind.TOKENIZER,
    "/detokenize": PathKind.TOKENIZER,
    "/v1/responses": PathKind.RESPONSES,
    "/v1/messages": PathKind.MESSAGES,
    "/v1/audio/transcriptions": PathKind.AUDIO,
    "/v1/audio/translations": PathKind.AUDIO,
}
RESPONSES_PATH = "/v1/responses"
CANCEL_SUFFIX = "/cancel"
# The paths whose body is multipart/form-data (its `model` a form field, lifted by Envoy's
# arks.form_to_metadata filter) and may be as large as OpenAI's 25 MB uploads.
AUDIO_PATHS = tuple(path for path, kind in ENGINE_PATHS.items() if kind is PathKind.AUDIO)
MODELS_PATH = "/v1/models"
# Also set by extproc only (endpoint picking); a client's copy is dropped like the routing headers.
PICKED_HEADERS = (DESTINATION_HEADER,)


def path_kind(path: str) -> PathKind | None:
    """What a path does; None when the gateway does not route it to engines. Besides
    ENGINE_PATHS: a stored response, `GET /v1/responses/{id}` and `POST .../{id}/cancel`."""
    kind = ENGINE_PATHS.get(path)
    if kind is None and stored_response(path) is not None:
        return PathKind.STORED
    return kind


def stored_response(path: str) -> tuple[str, bool] | None:
    """(response id, cancel?) of `/v1/responses/{id}` or `/v1/responses/{id}/cancel`."""
    rest = path.removeprefix(RESPONSES_PATH + "/")
    if rest == path:
        return None
    cancel = rest.endswith(CANCEL_SUFFIX)
    ident = rest.removesuffix(CANCEL_SUFFIX) if cancel else rest
    if not ident or "/" in ident:
        return None
    return ident, cancel


@dataclass(frozen=True)
class BodyFacts:
    """What Envoy's json_to_metadata lifted out of the JSON body, or what we parsed ourselves."""

    model: Any = None
    stream: Any = None
    include_usage: Any = None
    max_tokens: Any = None
    n: Any = None  # answers per prompt
    best_of: Any = None  # candidates generated per prompt (completions)
    previous_response_id: Any = None  # a Responses request continuing a stored response
    # Prompts in the request: a list on /v1/completions is known from the body only (None: Envoy
    # lifted the facts and could not count them).
    prompts: int | None = None
    model_missing: bool = False
    invalid_json: bool = False
    # A multipart body Envoy read (the audio paths): json_to_metadata's error on it means nothing.
    form: bool = False
    invalid_form: bool = False  # multipart, but no part could be read

    @property
    def known(self) -> bool:
        """False when nobody looked at the body yet (not JSON content, or no filter ran)."""
        return (
            self.model is not None or self.model_missing or self.invalid_json or self.invalid_form
        )

    @classmethod
    def from_metadata(cls, fields: Mapping[str, Any]) -> BodyFacts:
        form = bool(fields.get("form"))
        return cls(
            model=fields.get("model"),
            stream=fields.get("stream"),
            include_usage=fields.get("include_usage"),
            max_tokens=_answer_limit(fields),
            n=fields.get("n"),
            best_of=fields.get("best_of"),
            previous_response_id=fields.get("previous_response_id"),
            model_missing=bool(fields.get("model_missing")),
            invalid_json=bool(fields.get("invalid_json")) and not form,
            form=form,
            invalid_form=bool(fields.get("invalid_form")),
        )

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> BodyFacts:
        options = body.get("stream_options")
        return cls(
            model=body.get("model"),
            stream=body.get("stream"),
            include_usage=options.get("include_usage") if isinstance(options, Mapping) else None,
            max_tokens=_answer_limit(body),
            n=body.get("n"),
            best_of=body.get("best_of"),
            previous_response_id=body.get("previous_response_id"),
            prompts=prompt_count(body.get("prompt")),
            model_missing="model" not in body,
        )


def _answer_limit(fields: Mapping[str, Any]) -> Any:
    """The answer's token limit: max_completion_tokens or max_tokens (chat, completions),
    max_output_tokens (Responses)."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        if fields.get(name) is not None:
            return fields[name]
    return None


def prompt_count(prompt: Any) -> int:
    """How many prompts a completions `prompt` holds: a list of strings or of token-id lists is
    one per item; one string, or one list of token ids, is one."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        return len(prompt)
    return 1


@dataclass(frozen=True)
class RequestInfo:
    method: str
    path: str  # without the query string
    headers: Mapping[str, str]  # lower-case names; pseudo-headers excluded
    body: BodyFacts = field(default_factory=BodyFacts)
    end_of_stream: bool = False  # the request has no body

    @property
    def kind(self) -> PathKind | None:
        """What the path does; None when the gateway does not route it to engines."""
        return path_kind(self.path)

    @property
    def request_id(self) -> str:
        return self.headers.get("x-request-id", "")

    @property
    def spoofed_headers(self) -> tuple[str, ...]:
        return tuple(
            name for name in self.headers if name.startswith("x-arks-") or name in PICKED_HEADERS
        )
