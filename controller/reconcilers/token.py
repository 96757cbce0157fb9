"""ArksToken status: does the token work now, until when, and what should its owner fix.

The gateway reads tokens itself (extproc watches them); the controller explains them in
`kubectl get atk` and `kubectl describe atk`, and, for a token held in a Secret, publishes its
SHA-256 digest in `status.tokenHash` (with `status.tokenHashSecret`, the key it was read from):
the gateway, which faces the internet, reads no Secrets at all.

The controller reads a tenant's Secrets only where the tenant's namespace opted in, by binding
the ClusterRole `arks-token-secret-reader` to the controller there (a RoleBinding), and only
the Secrets labelled `arks.ai/token-secret`: one label-selected watch per namespace, started
when a token there first names a Secret. Where the namespace has not opted in, the status says
so (`SecretForbidden`) and the check is repeated every `FORBIDDEN_RECHECK_S`. `token_status` is pure: the token, its Secret
and the names of the namespace's endpoints and quotas in, the status out. The reconciler
reads those from informer caches, writes the status when it changed, records an Event when
the phase changes, and asks to be woken at the expiry time so `Active` turns `Expired` on time.

Secrets are looked at, never shown: the status says whether the referenced key holds a
non-empty value, not what it holds.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
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
from arks.adapters.kube.watch import Informer, PerNamespace, key_of
from arks.resources import ENDPOINTS, QUOTAS, SECRETS, TOKENS
from arks.wire import EVENT_COMPONENT, LABEL_TOKEN_SECRET

log = logging.getLogger(__name__)


PHASE_ACTIVE = "Active"
PHASE_DISABLED = "Disabled"
PHASE_EXPIRED = "Expired"
PHASE_INVALID = "Invalid"
FORBIDDEN_RECHECK_S = 30.0  # how often a namespace that refused is asked again
SECRET_READER_ROLE = "arks-token-secret-reader"  # the ClusterRole a namespace binds to opt in
# Said to both holders of one digest; the other is not named (it may be another tenant's).
DUPLICATE = (
    "another ArksToken holds the same token (the same SHA-256 digest), perhaps in another "
    "namespace; the gateway accepts neither until one changes: issue a new token for this one"
)


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
    # The digest of the token its Secret holds (tokenSecretRef tokens whose Secret works).
    digest: str | None = None


def _secret_check(
    token: api.ArksToken, secret: Mapping[str, Any] | None, forbidden: bool
) -> Check | str:
    """Why the Secret does not provide the token, or the token's digest when it does."""
    ref = token.secret_ref
    assert ref is not None
    if forbidden:
        message = (
            f"the controller may not read Secrets in namespace {token.key.namespace}: bind the "
            f"ClusterRole {SECRET_READER_ROLE} to it there with a RoleBinding"
        )
        return Check("Ready", "False", "SecretForbidden", message)
    if secret is None:
        message = f"Secret {ref.name} not found (among the Secrets labelled {LABEL_TOKEN_SECRET})"
        return Check("Ready", "False", "SecretNotFound", message)
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
    return api.token_digest(value.strip())  # `--from-file` keeps a newline, as the gateway does


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
    secret_forbidden: bool = False,
    shared: Callable[[str], bool] = lambda digest: False,
) -> TokenStatus:
    """The status of ArksToken `obj` at `now` (pure); `shared(digest)`: whether another
    ArksToken (in any namespace) holds that digest too."""
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
    digest = None
    broken: Check | None = None
    if token.secret_ref is not None:
        checked = _secret_check(token, secret, secret_forbidden)
        if isinstance(checked, Check):
            broken = checked
            recheck = FORBIDDEN_RECHECK_S if secret_forbidden else None
        else:
            digest = checked
    held = digest if token.secret_ref is not None else token.token_hash
    if broken is not None:
        phase, ready = PHASE_INVALID, broken
    elif held is not None and shared(held):
        # The digest is still published (a Secret-held token's): the gateway must see the
        # clash, or the copy would be the only holder and take this token's requests.
        phase, ready = PHASE_INVALID, Check("Ready", "False", "DuplicateToken", DUPLICATE)
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
        digest=digest,
    )


def desired_status(
    current: Mapping[str, Any],
    computed: TokenStatus,
    generation: int | None,
    now: datetime.datetime,
    secret_ref: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The status object to write: `computed` with conditions keeping their transition times,
    and the digest with the Secret key it came from (None removes both: a merge patch)."""
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
        "tokenHash": computed.digest,
        "tokenHashSecret": (
            {"name": str(secret_ref["name"]), "key": str(secret_ref.get("key") or "token")}
            if computed.digest is not None and secret_ref
            else None
        ),
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
        secrets: PerNamespace,
        endpoints: Informer,
        quotas: Informer,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
        holders: DigestHolders | None = None,
    ) -> None:
        self.holders = holders if holders is not None else DigestHolders()
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
        for informer in (self.endpoints, self.quotas):
            # A half-filled cache would report "not found".
            if not informer.wait_synced(timeout_s=5.0):
                raise TemporaryError(f"{informer.resource.plural} not listed yet", delay_s=1.0)
        ref = (token.get("spec") or {}).get("tokenSecretRef") or {}
        secret, forbidden = None, False
        if isinstance(ref, Mapping) and isinstance(ref.get("name"), str):
            secret, forbidden = self._secret(namespace, ref["name"])
        now = self.clock()
        computed = token_status(
            token,
            secret=secret,
            endpoints=self._names(self.endpoints, namespace),
            quotas=self._names(self.quotas, namespace),
            now=now,
            secret_forbidden=forbidden,
            shared=lambda digest: self.holders.shared(digest, key),
        )
        current: Mapping[str, Any] = token.get("status") or {}
        desired = desired_status(
            current, computed, token["metadata"].get("generation"), now, ref or None
        )
        if any(current.get(k) != v for k, v in desired.items()):
            patch_status(self.api, TOKENS, namespace, name, desired)
            self._announce(token, current, computed)
        return computed.recheck_after_s

    def _secret(self, namespace: str, name: str) -> tuple[Obj | None, bool]:
        """(the Secret from the namespace's label-selected cache, whether reading is refused)."""
        informer = self.secrets.informer(namespace)
        deadline = time.monotonic() + 5.0
        while not informer.forbidden and not informer.wait_synced(timeout_s=0.05):
            if time.monotonic() > deadline:  # a half-filled cache would report "not found"
                raise TemporaryError(f"secrets in {namespace} not listed yet", delay_s=1.0)
        if informer.forbidden:
            return None, True
        return informer.get((namespace, name)), False

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


class DigestHolders:
    """Which ArksTokens hold each digest, as the gateway counts them (spec.tokenHash or the
    plain spec.token's digest; a Secret-held token's published status.tokenHash), kept from
    the tokens' watch: O(1) per change. When a digest gains or loses a holder, the tokens
    holding it are re-checked (the one that stayed learns it is no longer, or now, shared)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._digest_of: dict[Key, str] = {}
        self._holders: dict[str, set[Key]] = {}

    def shared(self, digest: str, key: Key) -> bool:
        with self._lock:
            return bool(self._holders.get(digest, set()) - {key})

    def handler(self, queue: WorkQueue) -> Callable[[str, Obj], None]:
        def handle(kind: str, obj: Obj) -> None:
            key = key_of(obj)
            digest = None if kind == "DELETED" else _gateway_digest(obj)
            with self._lock:
                old = self._digest_of.pop(key, None)
                if old == digest:
                    if digest is not None:
                        self._digest_of[key] = digest
                    return
                touched: set[Key] = set()
                if old is not None:
                    holders = self._holders[old]
                    holders.discard(key)
                    touched |= holders
                    if not holders:
                        del self._holders[old]
                if digest is not None:
                    self._digest_of[key] = digest
                    holders = self._holders.setdefault(digest, set())
                    touched |= holders
                    holders.add(key)
            for other in touched - {key}:
                queue.add(other)

        return handle


def _gateway_digest(obj: Mapping[str, Any]) -> str | None:
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return None  # the gateway counts a token being deleted as gone
    try:
        token = api.parse_token(obj)
    except api.ObjectError:
        return None
    return token.published_hash if token.secret_ref is not None else token.token_hash


def _enqueue_tokens_referencing(
    tokens: Informer,
    queue: WorkQueue,
    refers: Callable[[Mapping[str, Any], str], bool],
    events: Collection[str] = ("ADDED", "MODIFIED", "DELETED"),
) -> Callable[[str, Obj], None]:
    """A handler: when an object changes (one of `events`), enqueue the tokens of its namespace
    that refer to it. A token's status depends on whether its endpoints and quotas exist, not on
    what they hold: for those only ADDED and DELETED count, so the gateways' ArksQuota status
    writes (every few seconds per quota) do not re-check every token charged to the quota."""

    def handle(kind: str, obj: Obj) -> None:
        if kind not in events:
            return
        meta = obj.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name"))
        for key in tokens.keys():
            if key[0] != namespace:
                continue
            token = tokens.get(key)
            if token is not None and refers(token.get("spec") or {}, name):
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

    A change to a Secret, ArksEndpoint or ArksQuota re-checks the tokens that name it. Secrets
    are watched per namespace, only those labelled `arks.ai/token-secret` (see the module).
    """
    work = queue if queue is not None else WorkQueue()
    options = dict(informer_options or {})
    tokens = Informer(api_client, TOKENS, namespace, **options)
    related = {ENDPOINTS: _uses_endpoint, QUOTAS: _uses_quota}
    informers = {}
    for resource, refers in related.items():
        informer = Informer(api_client, resource, namespace, **options)
        informer.add_handler(
            _enqueue_tokens_referencing(tokens, work, refers, ("ADDED", "DELETED"))
        )
        informers[resource] = informer
    secrets = PerNamespace(
        api_client,
        SECRETS,
        [_enqueue_tokens_referencing(tokens, work, _uses_secret)],
        namespace,
        **{**options, "label_selector": LABEL_TOKEN_SECRET},
    )
    holders = DigestHolders()
    tokens.add_handler(holders.handler(work))
    reconcile = TokenReconciler(
        api_client,
        tokens,
        secrets,
        informers[ENDPOINTS],
        informers[QUOTAS],
        holders=holders,
        **({"clock": clock} if clock else {}),
    )
    return Controller(
        "arkstoken",
        tokens,
        reconcile,
        workers,
        queue=work,
        owned=[*informers.values(), secrets],
        leader=leader,
    )
