"""Who is calling: the API token from the request, looked up by its SHA-256 digest."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from arks.api import ArksToken, token_digest
from arks.policy import Policy
from arks.wire import API_KEY_HEADER, AUTHORIZATION_HEADER
from extproc.decision import Deny, unauthorized


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """`Authorization: Bearer <token>` or `x-api-key: <token>`."""
    authorization = headers.get(AUTHORIZATION_HEADER)
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
        return None
    api_key = headers.get(API_KEY_HEADER, "").strip()
    return api_key or None


def authenticate(headers: Mapping[str, str], policy: Policy, now: datetime) -> ArksToken | Deny:
    token = bearer_token(headers)
    if token is None:
        if AUTHORIZATION_HEADER in headers:
            return unauthorized("The Authorization header must be 'Bearer <token>'.")
        return unauthorized(
            "No API key provided: send 'Authorization: Bearer <token>' or 'x-api-key'."
        )
    found = policy.token(token_digest(token))
    # Saying "expired" or "disabled" tells nothing to someone who does not hold the token.
    if found is None:
        return unauthorized("Incorrect API key provided.")
    if found.disabled:
        return unauthorized("This API key is disabled.")
    if found.expired(now):
        return unauthorized("This API key has expired.")
    return found
