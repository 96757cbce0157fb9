"""ArksToken status: does the token work now, until when, and what should its owner fix.

The gateway reads tokens itself (extproc watches them); the controller only explains them in
`kubectl get atk` and `kubectl describe atk`. `token_status` is pure: the token, its Secret
and the names of the namespace's endpoints and quotas in, the status out. The reconciler
reads those from informer caches, writes the status when it changed, records an Event when
the phase changes, and asks to be woken at the expiry time so `Active` turns `Expired` on time.

Secrets are looked at, never shown: the status says whether the referenced key holds a
non-empty value, not what it holds.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiClient

from arks import api
from arks.adapters.kube.apply import patch_status
from arks.adapters.kube.conditions import find_condition, set_condition
from arks.adapters.kube.errors import TemporaryError
from arks.adapters.kube.events import record_event
from arks.adapters.kube.queue import Key, WorkQueue
from arks.adapters.kube.rest import Obj
from arks.adapters.kube.runner import Controller, Leadership
from arks.adapters.kube.watch import Informer
from arks.resources import ENDPOINTS, QUOTAS, SECRETS, TOKENS
from arks.wire import EVENT_COMPONENT

log = logging.getLogger(__name__)


PHASE_ACTIVE = "Active"
PHASE_DISABLED = "Disabled"
PHASE_EXPIRED = "Expired"
PHASE_INVALID = "Invalid"


@dataclass(frozen=True)
class Check:
    """One condition of the token's status."""

    type: str
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class TokenStatus:
    phase: str
    endpoints: int = 0
    quotas: int = 0
    checks: tuple[Check, ...] = ()
    # When the status changes by itself (the expiry), as seconds from `now`.
    recheck_after_s: float | None = None
    warnings: tuple[str, ...] = field(default=())


def _secret_check(token: api.ArksToken, secret: Mapping[str, Any] | None) -> Check | None:
    """Why the Secret does not provide the token, or None when it does."""
    ref = token.secret_ref
    if ref is None:
        return None
    if secret is None:
        return Check("Ready", "False", "SecretNotFound", f"Secret {ref.name} not found")
    try:
        value = api.parse_secret(secret).data.get(ref.key)
    except api.ObjectError as e:
        return Check("Ready", "False", "SecretInvalid", f"Secret {ref.name}: {e}")
    if value is None:
        return Check(
            "Ready", "False", "SecretKeyNotFound", f"Secret {ref.name} has no key {ref.key!r}"
        )
    if not value.strip():
        return Check(
            "Ready", "False", "SecretKeyEmpty", f"Secret {ref.name} key {ref.key!r} is empty"
        )
    return None


def _references(token: api.ArksToken, endpoints: Collection[str], quotas: Collection[str]) -> Check:
    missing_endpoints = sorted({q.endpoint for q in token.qos} - set(endpoints))
    missing_quotas = sorted({q.quota for q in token.qos if q.quota} - set(quotas))
    problems = []
    if missing_endpoints:
        problems.append(
            f"ArksEndpoint {', '.join(missing_endpoints)} not found (requests for it get 404)"
        )
    if missing_quotas:
        problems.append(f"ArksQuota {', '.join(missing_quotas)} not found")
    if not problems:
        return Check("ReferencesResolved", "True", "Resolved", "every endpoint and quota exists")
    reason = "EndpointNotFound" if missing_endpoints else "QuotaNotFound"
    return Check("ReferencesResolved", "False", reason, "; ".join(problems))


def token_status(
    obj: Mapping[str, Any],
    *,
    secret: Mapping[str, Any] | None,
    endpoints: Collection[str],
    quotas: Collection[str],
    now: datetime.datetime,
) -> TokenStatus:
    """The status of ArksToken `obj` at `now` (pure)."""
    try:
        token = api.parse_token(obj)
    except api.ObjectError as e:
        message = f"spec is not valid: {e}"
        return TokenStatus(PHASE_INVALID, checks=(Check("Ready", "False", "InvalidSpec", message),))

    checks: list[Check] = [_references(token, endpoints, quotas)]
    warnings = []
    if token.plain_token_given:
        message = "spec.token holds the token in plain text; use tokenHash or tokenSecretRef"
        checks.append(Check("PlainTextToken", "True", "PlainTextToken", message))
        warnings.append(message)
    else:
        checks.append(
            Check("PlainTextToken", "False", "NotPlainText", "the token is not stored in the spec")
        )

    recheck = None
    broken = _secret_check(token, secret)
    if broken is not None:
        phase, ready = PHASE_INVALID, broken
    elif token.disabled:
        phase, ready = PHASE_DISABLED, Check("Ready", "False", "Disabled", "spec.disabled is true")
    elif token.expired(now):
        assert token.expires_at is not None
        stamp = token.expires_at.isoformat().replace("+00:00", "Z")
        phase, ready = PHASE_EXPIRED, Check("Ready", "False", "Expired", f"expired at {stamp}")
    else:
        phase = PHASE_ACTIVE
        if token.expires_at is not None:
            stamp = token.expires_at.isoformat().replace("+00:00", "Z")
            ready = Check("Ready", "True", "Active", f"accepted until {stamp}")
            recheck = max((token.expires_at - now).total_seconds(), 0.0)
        else:
            ready = Check("Ready", "True", "Active", "accepted; does not expire")
    return TokenStatus(
        phase,
        endpoints=len({q.endpoint for q in token.qos}),
        quotas=len({q.quota for q in token.qos if q.quota}),
        checks=(ready, *checks),
        recheck_after_s=recheck,
        warnings=tuple(warnings),
    )


def desired_status(
    current: Mapping[str, Any],
    computed: TokenStatus,
    generation: int | None,
    now: datetime.datetime,
) -> dict[str, Any]:
    """The status object to write: `computed` with conditions keeping their transition times."""
    conditions = current.get("conditions")
    for check in computed.checks:
        conditions = set_condition(
            conditions, check.type, check.status, check.reason, check.message, generation, now
        )
    status: dict[str, Any] = {
        "phase": computed.phase,
        "endpoints": computed.endpoints,
        "quotas": computed.quotas,
        "conditions": list(conditions or []),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


class TokenReconciler:
    """Reads from the informers' caches; writes status and Events through the API."""

    def __init__(
        self,
        api_client: ApiClient,
        tokens: Informer,
        secrets: Informer,
        endpoints: Informer,
        quotas: Informer,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self.api = api_client
        self.tokens, self.secrets, self.endpoints, self.quotas = tokens, secrets, endpoints, quotas
        self.clock = clock

    @staticmethod
    def _names(informer: Informer, namespace: str) -> set[str]:
        return {name for ns, name in informer.keys() if ns == namespace}

    def __call__(self, key: Key) -> float | None:
        namespace, name = key
        token = self.tokens.get(key)
        if token is None or token["metadata"].get("deletionTimestamp"):
            return None
        for informer in (self.secrets, self.endpoints, self.quotas):
            # A half-filled cache would report "not found".
            if not informer.wait_synced(timeout_s=5.0):
                raise TemporaryError(f"{informer.resource.plural} not listed yet", delay_s=1.0)
        now = self.clock()
        ref = (token.get("spec") or {}).get("tokenSecretRef") or {}
        secret = self.secrets.get((namespace, str(ref["name"]))) if ref.get("name") else None
        computed = token_status(
            token,
            secret=secret,
            endpoints=self._names(self.endpoints, namespace),
            quotas=self._names(self.quotas, namespace),
            now=now,
        )
        current: Mapping[str, Any] = token.get("status") or {}
        desired = desired_status(current, computed, token["metadata"].get("generation"), now)
        if any(current.get(k) != v for k, v in desired.items()):
            patch_status(self.api, TOKENS, namespace, name, desired)
            self._announce(token, current, computed)
        return computed.recheck_after_s

    def _announce(self, token: Obj, current: Mapping[str, Any], computed: TokenStatus) -> None:
        """An Event when the phase changes (best effort: a lost Event loses no state)."""
        if current.get("phase") == computed.phase:
            return
        ready = find_condition(
            [
                {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}
                for c in computed.checks
            ],
            "Ready",
        )
        assert ready is not None
        type_ = "Normal" if computed.phase == PHASE_ACTIVE else "Warning"
        message = f"{computed.phase}: {ready['message']}"
        if computed.warnings:
            message += "; " + "; ".join(computed.warnings)
        try:
            record_event(self.api, token, type_, str(ready["reason"]), message, EVENT_COMPONENT)
        except Exception:  # diagnostics must not fail the reconcile
            log.warning("could not record an Event for ArksToken %s", token["metadata"]["name"])


def _enqueue_tokens_referencing(
    tokens: Informer, queue: WorkQueue, refers: Callable[[Mapping[str, Any], str], bool]
) -> Callable[[str, Obj], None]:
    """A handler: when an object changes, enqueue the tokens of its namespace that refer to it."""

    def handle(_kind: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name"))
        for key in tokens.keys():
            token = tokens.get(key)
            if key[0] == namespace and token is not None and refers(token.get("spec") or {}, name):
                queue.add(key)

    return handle


def _uses_secret(spec: Mapping[str, Any], name: str) -> bool:
    return bool((spec.get("tokenSecretRef") or {}).get("name") == name)


def _uses_endpoint(spec: Mapping[str, Any], name: str) -> bool:
    return any((q.get("arksEndpoint") or {}).get("name") == name for q in spec.get("qos") or [])


def _uses_quota(spec: Mapping[str, Any], name: str) -> bool:
    return any((q.get("quota") or {}).get("name") == name for q in spec.get("qos") or [])


def token_controller(
    api_client: ApiClient,
    namespace: str | None = None,
    *,
    workers: int = 1,
    leader: Leadership | None = None,
    queue: WorkQueue | None = None,
    informer_options: Mapping[str, Any] | None = None,
    clock: Callable[[], datetime.datetime] | None = None,
) -> Controller:
    """A (not started) controller writing ArksToken status.

    A change to a Secret, ArksEndpoint or ArksQuota re-checks the tokens that name it.
    """
    work = queue if queue is not None else WorkQueue()
    options = dict(informer_options or {})
    tokens = Informer(api_client, TOKENS, namespace, **options)
    related = {
        SECRETS: _uses_secret,
        ENDPOINTS: _uses_endpoint,
        QUOTAS: _uses_quota,
    }
    informers = {}
    for resource, refers in related.items():
        informer = Informer(api_client, resource, namespace, **options)
        informer.add_handler(_enqueue_tokens_referencing(tokens, work, refers))
        informers[resource] = informer
    reconcile = TokenReconciler(
        api_client,
        tokens,
        informers[SECRETS],
        informers[ENDPOINTS],
        informers[QUOTAS],
        **({"clock": clock} if clock else {}),
    )
    return Controller(
        "arkstoken",
        tokens,
        reconcile,
        workers,
        queue=work,
        owned=list(informers.values()),
        leader=leader,
    )
