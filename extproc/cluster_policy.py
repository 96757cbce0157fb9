"""Policy from the cluster: ArksTokens, ArksQuotas, ArksEndpoints, Backends and Secrets, watched
through the API server (the core's informers) and built into the same snapshot the policy file
gives.

Every change rebuilds the snapshot from all objects known; an object that does not parse is
left out (and logged) rather than failing the whole policy, as a cluster's objects come and go
independently. A build that fails as a whole (two tokens with one secret) keeps the last good
snapshot. Bursts of changes (a first list, a relist after an error) make one rebuild.
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
from arks.policy import Policy, PolicyError, build_policy
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
        self._informers = {
            k.kind: Informer(api_client, k.resource, namespace, **(informer_options or {}))
            for k in KINDS
        }
        for informer in self._informers.values():
            informer.add_handler(self._changed)
        self._policy = Policy()
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._builder: threading.Thread | None = None
        self.reloads = 0
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
        self._rebuild()
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

    def _changed(self, event: str, _obj: Obj) -> None:
        if event != "RESYNC":  # a resync repeats what the cache holds: nothing to rebuild
            self._dirty.set()

    def _build_loop(self) -> None:
        while True:
            self._dirty.wait()
            if self._stop.is_set():
                return
            self._dirty.clear()
            try:
                self._rebuild()
            except Exception:
                log.exception("policy: rebuilding the snapshot failed; keeping the last good one")

    # --- building -------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        valid: list[tuple[str, Mapping[str, Any]]] = []
        for kind in sorted(KINDS, key=lambda k: k.kind):  # one order, whatever arrived first
            for obj in sorted(self._informers[kind.kind].list(), key=_name_of):
                typed = {**obj, "apiVersion": kind.resource.api_version, "kind": kind.kind}
                where = f"{kind.kind} {'/'.join(_name_of(obj))}"
                try:
                    kind.parse(typed)
                except api.ObjectError as err:
                    log.error("policy: %s is left out: %s", where, err)
                    continue
                valid.append((where, typed))
        try:
            policy = build_policy(valid, version=str(self.reloads + 1), drop_duplicate_tokens=True)
        except PolicyError as err:
            log.error("policy from the cluster not applied, keeping the last good one: %s", err)
            return
        if policy.warnings != self._policy.warnings:  # status writes rebuild often: say things once
            for warning in policy.warnings:
                log.warning("policy: %s", warning)
        self._policy = policy
        self.reloads += 1


def _name_of(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "default")), str(meta.get("name", "")))
