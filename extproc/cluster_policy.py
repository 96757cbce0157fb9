"""Policy from the cluster: ArksTokens, ArksQuotas, ArksEndpoints, Backends and Secrets, watched
through the API server and built into the same snapshot the policy file gives.

One thread per kind lists, then watches from the list's resourceVersion, and reconnects after
errors. Every change rebuilds the snapshot from all objects known; an object that does not
parse is left out (and logged) rather than failing the whole policy, as a cluster's objects
come and go independently. A build that fails as a whole (two tokens with one secret) keeps the
last good snapshot.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import kubernetes

from arks import api
from arks.policy import Policy, PolicyError, build_policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    parse: Callable[[Mapping[str, Any]], Any]

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS = (
    Kind("arks.ai", "v1", "arkstokens", "ArksToken", api.parse_token),
    Kind("arks.ai", "v1", "arksquotas", "ArksQuota", api.parse_quota),
    Kind("arks.ai", "v1", "arksendpoints", "ArksEndpoint", api.parse_endpoint),
    Kind("gateway.envoyproxy.io", "v1alpha1", "backends", "Backend", api.parse_backend),
    Kind("", "v1", "secrets", "Secret", api.parse_secret),
)


class ClusterPolicySource:
    """A `PolicySource` fed by watches; `current()` is always a complete snapshot."""

    def __init__(self, api_client: Any, namespace: str | None = None, retry_s: float = 1.0) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.retry_s = retry_s
        self._objects: dict[tuple[str, str, str], Mapping[str, Any]] = {}
        self._lock = threading.Lock()
        self._policy = Policy()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._synced = {k.kind: threading.Event() for k in KINDS}
        self.reloads = 0
        self._reported = 0

    def current(self) -> Policy:
        return self._policy

    def status_of(self, quota: api.ArksQuota) -> Mapping[str, Any] | None:
        """The status of an ArksQuota as the watch last saw it (the durable copy of its usage)."""
        with self._lock:
            obj = self._objects.get(("ArksQuota", quota.key.namespace, quota.key.name))
        status = obj.get("status") if obj else None
        return status if isinstance(status, Mapping) else None

    def reload_if_changed(self) -> bool:
        """For the housekeeping loop's metrics: whether a new snapshot was built since the last call."""
        changed = self.reloads != self._reported
        self._reported = self.reloads
        return changed

    def start(self, timeout_s: float = 10.0) -> None:
        for kind in KINDS:
            thread = threading.Thread(target=self._run, args=(kind,), name=f"watch-{kind.plural}", daemon=True)
            thread.start()
            self._threads.append(thread)
        for event in self._synced.values():
            event.wait(timeout_s)

    def stop(self) -> None:
        self._stop.set()

    # --- watching -------------------------------------------------------------------------------

    def _list_call(self, kind: Kind) -> tuple[Callable[..., Any], dict[str, Any]]:
        if not kind.group:
            core = kubernetes.client.CoreV1Api(self.api_client)
            if self.namespace:
                return core.list_namespaced_secret, {"namespace": self.namespace}
            return core.list_secret_for_all_namespaces, {}
        custom = kubernetes.client.CustomObjectsApi(self.api_client)
        args = {"group": kind.group, "version": kind.version, "plural": kind.plural}
        if self.namespace:
            return custom.list_namespaced_custom_object, {**args, "namespace": self.namespace}
        return custom.list_cluster_custom_object, args

    def _run(self, kind: Kind) -> None:
        call, args = self._list_call(kind)
        while not self._stop.is_set():
            try:
                listed = self._plain(call(**args))
                self._replace(kind, listed.get("items") or [])
                self._synced[kind.kind].set()
                version = (listed.get("metadata") or {}).get("resourceVersion")
                for event in kubernetes.watch.Watch().stream(  # type: ignore[no-untyped-call]
                    call, resource_version=version, timeout_seconds=60, **args
                ):
                    if self._stop.is_set():
                        return
                    self._apply(kind, event["type"], self._plain(event["object"]))
            except Exception as err:  # the API server went away, the watch expired …: list again
                if self._stop.is_set():
                    return
                log.warning("watch of %s failed (%s); listing again in %.1fs", kind.plural, err, self.retry_s)
                self._stop.wait(self.retry_s)

    def _plain(self, obj: Any) -> dict[str, Any]:
        if isinstance(obj, dict):
            return obj
        plain: dict[str, Any] = self.api_client.sanitize_for_serialization(obj)
        return plain

    @staticmethod
    def _key(kind: Kind, obj: Mapping[str, Any]) -> tuple[str, str, str]:
        meta = obj.get("metadata") or {}
        return (kind.kind, str(meta.get("namespace", "default")), str(meta.get("name", "")))

    def _with_kind(self, kind: Kind, obj: Mapping[str, Any]) -> dict[str, Any]:
        return {**obj, "apiVersion": kind.api_version, "kind": kind.kind}

    def _replace(self, kind: Kind, items: list[Mapping[str, Any]]) -> None:
        with self._lock:
            for key in [k for k in self._objects if k[0] == kind.kind]:
                del self._objects[key]
            for item in items:
                self._objects[self._key(kind, item)] = self._with_kind(kind, item)
        self._rebuild()

    def _apply(self, kind: Kind, event_type: str, obj: Mapping[str, Any]) -> None:
        with self._lock:
            if event_type == "DELETED":
                self._objects.pop(self._key(kind, obj), None)
            elif event_type in ("ADDED", "MODIFIED"):
                self._objects[self._key(kind, obj)] = self._with_kind(kind, obj)
            else:
                return
        self._rebuild()

    # --- building -------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        with self._lock:
            objects = dict(self._objects)
        parsers = {k.kind: k.parse for k in KINDS}
        valid: list[tuple[str, Mapping[str, Any]]] = []
        for (kind, namespace, name), obj in sorted(objects.items()):
            where = f"{kind} {namespace}/{name}"
            try:
                parsers[kind](obj)
            except api.ObjectError as err:
                log.error("policy: %s is left out: %s", where, err)
                continue
            valid.append((where, obj))
        try:
            policy = build_policy(
                valid, version=str(self.reloads + 1), drop_duplicate_tokens=True
            )
        except PolicyError as err:
            log.error("policy from the cluster not applied, keeping the last good one: %s", err)
            return
        if policy.warnings != self._policy.warnings:  # status writes rebuild often: say things once
            for warning in policy.warnings:
                log.warning("policy: %s", warning)
        self._policy = policy
        self.reloads += 1
