"""What extproc answers Envoy, as plain data. `codec.py` turns these into protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from arks.api import ArksToken, Qos
from extproc.reservation import Reservation


@dataclass(frozen=True)
class Deny:
    """An OpenAI-shaped error answered by the gateway itself."""

    status: int
    code: str
    message: str
    type: str = "invalid_request_error"
    headers: tuple[tuple[str, str], ...] = ()
    # Who was refused, once known (never the token text): admission's refusals carry it.
    identity: Identity | None = None
    # Which check refused, when the code does not say (rpm, rpd, tpm, tpd, concurrency, quota);
    # empty: the code says.
    reason: str = ""

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "code": self.code}}
        )


@dataclass(frozen=True)
class Reply:
    """A successful answer made by the gateway (e.g. `GET /v1/models`)."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"


@dataclass(frozen=True)
class ReadBody:
    """Ask Envoy for the buffered request body; the decision continues there."""

    reason: str
    token: ArksToken


@dataclass(frozen=True)
class Identity:
    namespace: str
    user: str
    model: str


@dataclass(frozen=True)
class Forward:
    """Let the request through to the model's route, with our headers and metadata."""

    identity: Identity
    set_headers: tuple[tuple[str, str], ...]
    remove_headers: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    body: bytes | None = None  # a rewritten body, when the request needed one
    prompt_estimate: int | None = None
    max_tokens: int | None = None
    choices: int = 1  # answers the engine writes: prompts x max(n, best_of); each up to max_tokens
    answer_limit: int | None = None  # the endpoint's maxTokens: the most one answer may hold
    qos: Qos | None = None  # the token's grant for this model: its limits and quota
    charged: bool = True  # False: it costs no tokens (tokenizer): no token budget nor quota taken
    weighting: str = ""  # the endpoint's: least-load and prefix-cache pick an engine per request
    prompt: str | None = None  # the prompt text, read for prefix-cache picking
    engine: str | None = None  # the one engine it must reach (a stored response's), `host:port`
    follows: str | None = None  # the stored response it continues: its engine is looked up
    # What admission took (quota, a concurrency slot), carried in the answer's metadata with the
    # rest of `metadata`, for whoever settles the request.
    reservation: Reservation | None = None


Decision = Deny | Reply | ReadBody | Forward


def unauthorized(message: str) -> Deny:
    return Deny(401, "invalid_api_key", message)


def bad_request(message: str, code: str = "invalid_request_error") -> Deny:
    return Deny(400, code, message)
