"""Informers: list, then watch from the list's resourceVersion, keeping a cache of objects.

One thread per informer runs list → watch → (stream ends or fails) → watch again from the last
seen resourceVersion, or list again after an error (e.g. 410 Gone when the version expired).
A healthy watch that the server ends (`timeoutSeconds`) is resumed from its resourceVersion
(bookmarks keep it fresh), never re-listed: a list happens at start and after an error only.
A refusal (401/403: this client may not read that kind there) or 404 (the kind is not served:
its CRD is not installed) is retried every `forbidden_retry_s`, quietly after the first log
line; `forbidden` says whether the last list was refused.
A second thread calls the handlers with "RESYNC" for every cached object every `resync_s`, so
a reconcile that missed something (or dropped a key) converges anyway.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from arks.adapters.kube import rest
from arks.adapters.kube.queue import Key, WorkQueue
from arks.adapters.kube.rest import Obj
from arks.resources import Resource
from arks.wire import LABEL_MANAGED_BY, MANAGED_BY

log = logging.getLogger(__name__)

MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"  # what the controller renders carries it

Handler = Callable[[str, Obj], None]
"""Called with the event type (ADDED, MODIFIED, DELETED or RESYNC) and the object."""


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta["name"]))


class _Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class Informer:
    def __init__(
        self,
        api_client: ApiClient,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        resync_s: float = 300.0,
        watch_timeout_s: float = 30.0,
        retry_s: float = 1.0,
        forbidden_retry_s: float = 30.0,
    ) -> None:
        self.resource = resource
        self._api = api_client
        self._namespace = namespace
        self._selector = label_selector
        self._resync_s = resync_s
        self._watch_timeout_s = watch_timeout_s
        self._retry_s = retry_s
        self._forbidden_retry_s = forbidden_retry_s
        self.forbidden = False  # the last list was refused (401/403)
        self._refused: int | None = None  # the status of the last refusal (logged once)
        self.lists = 0  # full lists made (start, and after an error or 410 Gone)
        self._lock = threading.Lock()
        self._cache: dict[Key, Obj] = {}
        self._handlers: list[Handler] = []
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- cache ------------------------------------------------------------------------------

    def get(self, key: Key) -> Obj | None:
        """A copy of the latest cached object, or None."""
        with self._lock:
            obj = self._cache.get(key)
            return copy.deepcopy(obj) if obj is not None else None

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._cache)

    def size(self) -> int:
        """How many objects the cache holds."""
        with self._lock:
            return len(self._cache)

    def list(self) -> list[Obj]:
        with self._lock:
            return [copy.deepcopy(o) for o in self._cache.values()]

    # --- lifecycle --------------------------------------------------------------------------

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def start(self) -> None:
        name = f"informer-{self.resource.plural}"
        self._threads = [
            threading.Thread(target=self._run, name=name, daemon=True),
            threading.Thread(target=self._resync_loop, name=f"{name}-resync", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def wait_synced(self, timeout_s: float | None = None) -> bool:
        """True once the first list has filled the cache."""
        return self._synced.wait(timeout_s)

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop both threads; an open watch ends within `watch_timeout_s` at worst."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s if timeout_s is not None else self._watch_timeout_s + 5)

    # --- threads ----------------------------------------------------------------------------

    def _run(self) -> None:
        resource_version: str | None = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    resource_version = self._relist()
                resource_version = self._watch(resource_version)
            except _Expired:
                resource_version = None
            except ApiException as e:
                resource_version = None
                if e.status == 410:  # the version expired: list again now
                    continue
                if e.status in (401, 403, 404):  # not allowed, or not served (no CRD)
                    if not self.forbidden and e.status != self._refused:
                        log.warning(
                            "informer for %s%s: %s %s; retrying every %.0f s",
                            self.resource.plural,
                            f" in {self._namespace}" if self._namespace else "",
                            e.status,
                            e.reason,
                            self._forbidden_retry_s,
                        )
                    self._refused = e.status
                    self.forbidden = e.status in (401, 403)
                    self._stop.wait(self._forbidden_retry_s)
                    continue
                log.exception("informer for %s failed; listing again", self.resource.plural)
                self._stop.wait(self._retry_s)
            except Exception:
                log.exception("informer for %s failed; listing again", self.resource.plural)
                resource_version = None
                self._stop.wait(self._retry_s)

    def _relist(self) -> str:
        listed = rest.request(self._api, "GET", self._path(), query=self._query())
        self.lists += 1
        self.forbidden, self._refused = False, None
        fresh = {key_of(o): o for o in listed.get("items") or []}
        with self._lock:
            gone = [o for k, o in self._cache.items() if k not in fresh]
            previous = dict(self._cache)
            self._cache = dict(fresh)
        for obj in gone:
            self._notify("DELETED", obj)
        for key, obj in fresh.items():
            if key not in previous:
                self._notify("ADDED", obj)
            elif _rv(previous[key]) != _rv(obj):
                self._notify("MODIFIED", obj)
        self._synced.set()
        return str(listed.get("metadata", {}).get("resourceVersion") or "")

    def _watch(self, resource_version: str) -> str:
        query = {
            **self._query(),
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(max(1, int(self._watch_timeout_s))),
        }
        for event in rest.watch_lines(self._api, self._path(), query, self._watch_timeout_s + 10):
            if self._stop.is_set():
                break
            kind, obj = str(event.get("type")), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise _Expired()
                raise RuntimeError(f"watch error: {obj.get('message')}")
            resource_version = _rv(obj) or resource_version
            if kind == "BOOKMARK":
                continue
            key = key_of(obj)
            with self._lock:
                if kind == "DELETED":
                    self._cache.pop(key, None)
                else:
                    self._cache[key] = obj
            self._notify(kind, obj)
        return resource_version

    def _resync_loop(self) -> None:
        while not self._stop.wait(self._resync_s):
            for obj in self.list():
                self._notify("RESYNC", obj)

    def _notify(self, kind: str, obj: Obj) -> None:
        for handler in self._handlers:
            try:
                handler(kind, obj)
            except Exception:
                log.exception("informer handler failed for %s %s", kind, key_of(obj))

    def _path(self) -> str:
        return self.resource.path(self._namespace)

    def _query(self) -> dict[str, str]:
        return {"labelSelector": self._selector} if self._selector else {}


class Watched(Protocol):
    """What a controller starts and stops with itself: an `Informer` or `PerNamespace`."""

    def start(self) -> None: ...

    def stop(self, timeout_s: float | None = None) -> None: ...

    def wait_synced(self, timeout_s: float | None = None) -> bool: ...

    def size(self) -> int: ...


class PerNamespace:
    """One informer per namespace, each started the first time `informer(namespace)` is asked
    for: for a kind this client may read only in the namespaces that granted it (a RoleBinding
    there), where a cluster-wide list would be refused. With `namespace` given, only that one.

    `wait_synced` is True: namespaces are opted into one by one, and a namespace that has not
    (or not yet) must not hold the controller's readiness.
    """

    def __init__(
        self,
        api_client: ApiClient,
        resource: Resource,
        handlers: Iterable[Handler],
        namespace: str | None = None,
        **informer_options: Any,
    ) -> None:
        self.resource = resource
        self._api = api_client
        self._handlers = list(handlers)
        self._only = namespace
        self._options = informer_options
        self._lock = threading.Lock()
        self._informers: dict[str, Informer] = {}
        self._started = False

    def informer(self, namespace: str) -> Informer:
        if self._only is not None and namespace != self._only:
            raise ValueError(f"{self.resource.plural}: watching {self._only} only, not {namespace}")
        with self._lock:
            made = self._informers.get(namespace)
            if made is None:
                made = Informer(self._api, self.resource, namespace, **self._options)
                for handler in self._handlers:
                    made.add_handler(handler)
                self._informers[namespace] = made
                if self._started:
                    made.start()
            return made

    def namespaces(self) -> list[str]:
        with self._lock:
            return sorted(self._informers)

    def start(self) -> None:
        with self._lock:
            self._started = True
            for informer in self._informers.values():
                informer.start()

    def stop(self, timeout_s: float | None = None) -> None:
        with self._lock:
            self._started = False
            informers = list(self._informers.values())
        for informer in informers:
            informer.stop(timeout_s)

    def wait_synced(self, timeout_s: float | None = None) -> bool:
        return True

    def size(self) -> int:
        with self._lock:
            informers = list(self._informers.values())
        return sum(i.size() for i in informers)


def start_all(informers: Iterable[Informer], timeout_s: float) -> list[Informer]:
    """Start the informers and wait (up to `timeout_s` in all) for their first lists; the ones
    not listed by then (they go on trying)."""
    started = list(informers)
    deadline = time.monotonic() + timeout_s
    for informer in started:
        informer.start()
    return [i for i in started if not i.wait_synced(max(0.0, deadline - time.monotonic()))]


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def enqueue(queue: WorkQueue) -> Handler:
    """A handler that enqueues the object's own key."""

    def handle(_kind: str, obj: Obj) -> None:
        queue.add(key_of(obj))

    return handle


def owner_keys(child: Mapping[str, Any], owner_api_version: str, owner_kind: str) -> list[Key]:
    """The keys of the controller owners of `child` that are of the given kind (pure)."""
    meta = child.get("metadata") or {}
    namespace = str(meta.get("namespace") or "")
    return [
        (namespace, str(ref["name"]))
        for ref in meta.get("ownerReferences") or []
        if ref.get("controller")
        and ref.get("kind") == owner_kind
        and ref.get("apiVersion") == owner_api_version
    ]


def enqueue_owner(queue: WorkQueue, owner_api_version: str, owner_kind: str) -> Handler:
    """A handler that enqueues the owner of a changed child, so its reconcile repairs it."""

    def handle(_kind: str, child: Obj) -> None:
        for key in owner_keys(child, owner_api_version, owner_kind):
            queue.add(key)

    return handle


def watch_owned(
    api_client: ApiClient,
    child: Resource,
    queue: WorkQueue,
    owner_api_version: str,
    owner_kind: str,
    namespace: str | None = None,
    **informer_options: Any,
) -> Informer:
    """An informer on a child kind whose events re-trigger the owner's reconcile (not started).

    Only the objects labelled as the controller's (`app.kubernetes.io/managed-by=arks`, on
    everything it renders) are listed and cached, unless `label_selector` says otherwise: a
    cluster's unrelated Deployments, Services, PVCs, Jobs and DaemonSets never enter memory."""
    informer_options.setdefault("label_selector", MANAGED_SELECTOR)
    informer = Informer(api_client, child, namespace, **informer_options)
    informer.add_handler(enqueue_owner(queue, owner_api_version, owner_kind))
    return informer
