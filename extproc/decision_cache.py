"""The headers decision, made once per tenant, model and kind of request, then reused.

`gateway.decide_headers` decides from the credential, the method and path, the names of the
headers present (credentials and client-sent routing headers are removed), the body facts Envoy
lifted, the policy, and the clock (a token's expiry). A tenant's requests to one model differ in
none of these but the clock and their ids: the decision to forward is kept, keyed by the
credential's digest and the rest, with the unchanging part of its answer to Envoy built once
(`codec.Prebuilt`). Refusals are never kept (anyone can send a new wrong key), nor the decisions
of stored-response and upload paths (they depend on more than the key). A new policy empties
it; a kept decision is not used once its token has expired.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from arks.api import token_digest
from arks.policy import Policy
from extproc import codec
from extproc.auth import bearer_token
from extproc.decision import Decision, Forward
from extproc.gateway import NO_LENS, decide_headers
from extproc.request import BodyFacts, PathKind, RequestInfo
from extproc.response_homes import ResponseHome

# Headers whose values vary per request and the decision does not read.
PER_REQUEST_HEADERS = frozenset({"x-request-id", "content-length"})
UNCACHED_KINDS = frozenset({PathKind.STORED, PathKind.AUDIO})
CAPACITY = 10_000  # decisions kept; then emptied and made afresh
# The credential's digest, method, path, bodiless, the headers' names, the body facts.
Key = tuple[str, str, str, bool, tuple[str, ...], BodyFacts]


@dataclass
class Kept:
    """A forward decision and what its answer to Envoy always holds."""

    decision: Forward
    token_expires_at: datetime | None
    _prebuilt: codec.Prebuilt | None = field(default=None, repr=False)

    def prebuilt(self) -> codec.Prebuilt:
        if self._prebuilt is None:
            self._prebuilt = codec.prebuild(self.decision)
        return self._prebuilt


@dataclass
class DecisionCache:
    capacity: int = CAPACITY
    _kept: dict[Key, Kept] = field(default_factory=dict, repr=False)
    _policy: Policy | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self._kept)

    def decide(
        self,
        info: RequestInfo,
        policy: Policy,
        now: datetime,
        lens: Mapping[tuple[str, str], int] = NO_LENS,
        home: ResponseHome | None = None,
    ) -> tuple[Decision, Kept | None]:
        """`decide_headers`' decision, and the kept entry it came from or went into (None: not
        kept)."""
        key = _key(info)
        if key is None:
            return decide_headers(info, policy, now, home=home, lens=lens), None
        if policy is not self._policy:
            self._kept.clear()
            self._policy = policy
        kept = self._kept.get(key)
        if kept is not None and (kept.token_expires_at is None or now < kept.token_expires_at):
            return kept.decision, kept
        decision = decide_headers(info, policy, now, lens=lens)
        if not isinstance(decision, Forward) or decision.body is not None:
            return decision, None
        token = policy.token(key[0])
        if token is None:  # cannot be: a forward decision matched it
            return decision, None
        if len(self._kept) >= self.capacity:
            self._kept.clear()
        kept = self._kept[key] = Kept(decision, token.expires_at)
        return decision, kept


def _key(info: RequestInfo) -> Key | None:
    """What the decision depends on, the credential as its digest; None: not to be kept."""
    kind = info.kind
    if kind is None or kind in UNCACHED_KINDS:
        return None
    credential = bearer_token(info.headers)
    if credential is None:
        return None
    names = tuple(name for name in info.headers if name not in PER_REQUEST_HEADERS)
    key: Key = (
        token_digest(credential),
        info.method,
        info.path,
        info.end_of_stream,
        names,
        info.body,
    )
    try:
        hash(key)
    except TypeError:  # a body fact Envoy lifted as a list or an object
        return None
    return key
