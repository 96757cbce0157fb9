"""Policy from the cluster: ArksTokens, ArksQuotas, ArksEndpoints and Backends, watched through
the API server (the core's informers) and kept in the same snapshot the policy file gives.

No Secrets: a token held in a Secret is known by the digest the controller published in the
ArksToken's status (controller/reconcilers/token.py), so the internet-facing gateway needs no
right to read any Secret.

A change costs O(that change), not O(cluster) (arks/policy_index.py): only the changed object
is parsed and only the indexes it touches are updated; a burst of changes (a first list, a
relist after an error) is applied as one and makes one new snapshot. An update that cannot
change the policy is dropped before it is parsed: for these kinds, `metadata.generation` moves
with every spec change, so an update whose generation (and uid: an object deleted and created
again under its name starts again at 1) did not move changed only status or metadata — the gateway's own ArksQuota status writes every few seconds come back as such — except
an ArksToken's published digest (`status.tokenHash`/`tokenHashSecret`), compared as well. An
object that does not parse is left out (and logged) rather than failing the policy, as a
cluster's objects come and go independently; two tokens with one digest are both left out, with
a warning, until one changes. An ArksToken marked for deletion (a finalizer holds it) is
left out as if deleted: deleting a token revokes it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiClient

from arks import api
from arks.adapters.kube.rest import Obj
from arks.adapters.kube.watch import Informer, start_all
from arks.api import ObjectKey
from arks.policy import Policy
from arks.policy_index import PolicyIndex
from arks.resources import BACKENDS, ENDPOINTS, QUOTAS, TOKENS, Resource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolicyKind:
    resource: Resource
    kind: str
    parse: Callable[[Mapping[str, Any]], Any]


KINDS = (
    PolicyKind(TOKENS, "ArksToken", api.parse_token),
    PolicyKind(QUOTAS, "ArksQuota", api.parse_quota),
    PolicyKind(ENDPOINTS, "ArksEndpoint", api.parse_endpoint),
    PolicyKind(BACKENDS, "Backend", api.parse_backend),
)


class ClusterPolicySource:
    """A `PolicySource` fed by informers; `current()` is always a complete snapshot."""

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str | None = None,
        informer_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self._kinds = {k.kind: k for k in KINDS}
        self._informers = {
            k.kind: Informer(api_client, k.resource, namespace, **(informer_options or {}))
            for k in KINDS
        }
        for kind in KINDS:
            self._informers[kind.kind].add_handler(self._handler(kind))
        self._policy = Policy()
        self._index = PolicyIndex()
        self._lock = threading.Lock()
        # (kind, namespace, name) -> the object to apply (None: deleted), latest wins
        self._pending: dict[tuple[str, str, str], Obj | None] = {}
        self._marks: dict[tuple[str, str, str], tuple[Any, ...] | None] = {}
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._builder: threading.Thread | None = None
        self.reloads = 0
        self.parsed = 0  # objects parsed (each change once)
        self.skipped = 0  # updates dropped unparsed (status or metadata only)
        self._reported = 0

    def current(self) -> Policy:
        return self._policy

    def status_of(self, quota: api.ArksQuota) -> Mapping[str, Any] | None:
        """The status of an ArksQuota as the watch last saw it (the durable copy of its usage)."""
        obj = self._informers["ArksQuota"].get((quota.key.namespace, quota.key.name))
        status = obj.get("status") if obj else None
        return status if isinstance(status, Mapping) else None

    def cached(self) -> int:
        """How many objects its informers' caches hold in all."""
        return sum(i.size() for i in self._informers.values())

    def reload_if_changed(self) -> bool:
        """For the housekeeping loop's metrics: whether a new snapshot was built since the last call."""
        changed = self.reloads != self._reported
        self._reported = self.reloads
        return changed

    def start(self, timeout_s: float = 10.0) -> None:
        """Start watching; wait (up to `timeout_s` in all) for the first lists, and build from them."""
        for informer in start_all(self._informers.values(), timeout_s):
            log.warning(
                "policy: %s not listed yet; starting without them", informer.resource.plural
            )
        self._dirty.clear()
        self._apply_pending()
        self._builder = threading.Thread(
            target=self._build_loop, name="policy-builder", daemon=True
        )
        self._builder.start()

    def stop(self, timeout_s: float | None = 0) -> None:
        """Stop the informers and the builder; `timeout_s` bounds each wait (0: do not wait)."""
        self._stop.set()
        self._dirty.set()
        for informer in self._informers.values():
            informer.stop(timeout_s)

    def _handler(self, kind: PolicyKind) -> Callable[[str, Obj], None]:
        def changed(event: str, obj: Obj) -> None:
            if event == "RESYNC":  # a resync repeats what the cache holds: nothing to apply
                return
            key = (kind.kind, *_name_of(obj))
            # A token being deleted is revoked now, not when its finalizers (anyone's) let go.
            gone = event == "DELETED" or (kind.kind == "ArksToken" and _deleting(obj))
            if gone:
                self._marks.pop(key, None)
            else:
                mark = _mark(kind.kind, obj)
                if mark is not None and self._marks.get(key) == mark:
                    self.skipped += 1  # only status or metadata moved: nothing to parse
                    return
                self._marks[key] = mark
            with self._lock:
                self._pending[key] = None if gone else obj
            self._dirty.set()

        return changed

    def _build_loop(self) -> None:
        while True:
            self._dirty.wait()
            if self._stop.is_set():
                return
            self._dirty.clear()
            try:
                self._apply_pending()
            except Exception:
                log.exception("policy: applying changes failed; keeping the last snapshot")

    # --- applying -------------------------------------------------------------------------------

    def _apply_pending(self) -> None:
        """Apply the changes queued since the last call (a burst, coalesced per object) and
        publish one new snapshot if any changed the policy."""
        with self._lock:
            pending, self._pending = self._pending, {}
        changed = False
        for (kind_name, namespace, name), obj in pending.items():
            parsed = None
            if obj is not None:
                kind = self._kinds[kind_name]
                typed = {**obj, "apiVersion": kind.resource.api_version, "kind": kind.kind}
                try:
                    parsed = kind.parse(typed)
                    self.parsed += 1
                except api.ObjectError as err:
                    log.error("policy: %s %s/%s is left out: %s", kind_name, namespace, name, err)
            changed |= self._index.apply(kind_name, ObjectKey(namespace, name), parsed)
        if not changed:
            return
        self._policy = self._index.snapshot(str(self.reloads + 1))
        self.reloads += 1
        for warning in self._index.refresh_warnings():  # said once, when it appears
            log.warning("policy: %s", warning)


def _mark(kind: str, obj: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """What an update must move to change the policy, or None when unknown (then it is parsed
    and compared): the uid and generation, and for an ArksToken its published digest too.

    The uid, because a generation is only counted within one object: one deleted and created
    again under its name while the watch was down (the relist then shows a MODIFIED, not a
    DELETED and an ADDED) starts again at generation 1, with a new spec and a new uid."""
    meta = obj.get("metadata") or {}
    generation = meta.get("generation")
    if generation is None:
        return None
    if kind != "ArksToken":
        return (meta.get("uid"), generation)
    status = obj.get("status") or {}
    source = status.get("tokenHashSecret") or {}
    digest = (status.get("tokenHash"), source.get("name"), source.get("key"))
    return (meta.get("uid"), generation, *digest)


def _deleting(obj: Mapping[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def _name_of(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "default")), str(meta.get("name", "")))
