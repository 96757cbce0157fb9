"""An emulated Kubernetes API server for integration tests, served over real HTTP.

kmock's `KubernetesEmulator` gives the HTTP server, request parsing, API discovery and an
in-memory object store (`emulator.objects`). It keeps objects as plain dicts, though, so this
subclass adds the API semantics a controller relies on: server-assigned metadata, optimistic
concurrency, the status subresource, server-side apply, finalizers and owner-reference garbage
collection. Each rule names the part of the Kubernetes API docs it follows:

    API concepts:  https://kubernetes.io/docs/reference/using-api/api-concepts/
    Conventions:   https://github.com/kubernetes/community/blob/master/contributors/devel/sig-architecture/api-conventions.md

Server-side apply tracks field ownership per manager (`metadata.managedFields`): a field a
manager stops applying is removed (or reset to its default) unless another manager owns it, a
write that changes a field takes it over, and an apply changing another manager's field without
`force` is a 409 Conflict (the subset `tests.support.fieldmanager` describes). Deployments and
LeaderWorkerSets have a `scale` subresource, as the HPA controller uses it.

Simplifications (documented where they apply): lists are atomic for server-side apply; only the
defaults in `DEFAULTS` are applied; strategic merge patch is treated as JSON merge patch; JSON
patch, field selectors, foreground deletion and admission are not emulated; of validation, only
names (a Service's a DNS-1035 label, most others' a DNS-1123 subdomain) and label keys and values
(metadata, pod template, selector) are checked, as the API server does (422 Invalid).

Usage from synchronous tests and the real `kubernetes` client::

    with running_kube_emulator() as kube:
        api = kubernetes.client.CoreV1Api(kube.api_client())
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml

from tests.support import fieldmanager as fm

Obj = dict[str, Any]

# (group, version, plural) -> (kind, namespaced, has status subresource).
# Unknown plurals are accepted as namespaced custom resources with a status subresource.
BUILTIN_RESOURCES: dict[tuple[str, str, str], tuple[str, bool, bool]] = {
    ("", "v1", "namespaces"): ("Namespace", False, True),
    ("", "v1", "secrets"): ("Secret", True, False),
    ("", "v1", "configmaps"): ("ConfigMap", True, False),
    ("", "v1", "services"): ("Service", True, True),
    ("", "v1", "persistentvolumeclaims"): ("PersistentVolumeClaim", True, True),
    ("", "v1", "events"): ("Event", True, False),
    ("", "v1", "pods"): ("Pod", True, True),
    ("apps", "v1", "deployments"): ("Deployment", True, True),
    ("batch", "v1", "jobs"): ("Job", True, True),
    ("coordination.k8s.io", "v1", "leases"): ("Lease", True, False),
    ("autoscaling", "v2", "horizontalpodautoscalers"): ("HorizontalPodAutoscaler", True, True),
    ("arks.ai", "v1", "arksapplications"): ("ArksApplication", True, True),
    ("arks.ai", "v1", "arksendpoints"): ("ArksEndpoint", True, True),
    ("arks.ai", "v1", "arksmodels"): ("ArksModel", True, True),
    ("gateway.networking.k8s.io", "v1", "httproutes"): ("HTTPRoute", True, True),
    ("leaderworkerset.x-k8s.io", "v1", "leaderworkersets"): ("LeaderWorkerSet", True, True),
    ("", "v1", "serviceaccounts"): ("ServiceAccount", True, False),
    ("apps", "v1", "daemonsets"): ("DaemonSet", True, True),
    ("rbac.authorization.k8s.io", "v1", "roles"): ("Role", True, False),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"): ("RoleBinding", True, False),
    ("arks.ai", "v1", "arksdisaggregatedapplications"): (
        "ArksDisaggregatedApplication",
        True,
        True,
    ),
    ("arks.ai", "v1", "arkstokens"): ("ArksToken", True, True),
    ("arks.ai", "v1", "arksquotas"): ("ArksQuota", True, True),
    ("gateway.envoyproxy.io", "v1alpha1", "backends"): ("Backend", True, True),
    ("keda.sh", "v1alpha1", "scaledobjects"): ("ScaledObject", True, True),
}

# Resources with a `scale` subresource: (group, version, plural) -> the path of their replicas
# (`specReplicasPath` of a CRD's scale subresource; spec.replicas for apps/v1 Deployments).
SCALE_RESOURCES: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("apps", "v1", "deployments"): ("spec", "replicas"),
    ("leaderworkerset.x-k8s.io", "v1", "leaderworkersets"): ("spec", "replicas"),
}

# Defaults the API server fills in when a field is missing, on create and after an apply removed
# it: Deployment `spec.replicas` (SetDefaults_Deployment, apps/v1) and LeaderWorkerSet
# `spec.replicas` (`default: 1` in its CRD schema).
DEFAULTS: dict[str, tuple[tuple[tuple[str, ...], Any], ...]] = {
    "Deployment": ((("spec", "replicas"), 1),),
    "LeaderWorkerSet": ((("spec", "replicas"), 1),),
}

APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"

# Metadata only the server writes; clients' values for these are ignored on every write.
SYSTEM_METADATA = ("uid", "creationTimestamp", "generation", "resourceVersion", "deletionTimestamp")


_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


AuditEntry = tuple[str, str, str, str, str | None, str | None]


def _audit_entry(request: kmock.Request, path: ObjectPath) -> AuditEntry:
    """The RBAC request attributes of an API request:
    https://kubernetes.io/docs/reference/access-authn-authz/authorization/#determine-the-request-verb
    """
    method = request.method.value
    if method == "GET":
        if request.params.get("watch") in ("true", "1"):
            verb = "watch"
        else:
            verb = "get" if path.name is not None else "list"
    else:
        verb = _VERBS.get(method, method.lower())
    resource = f"{path.plural}/{path.subresource}" if path.subresource else path.plural
    agent = request.headers.get("User-Agent", "")
    return agent, verb, path.group, resource, path.namespace, path.name


class ApiError(Exception):
    """A failure answered as a `Status` object.

    https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/status/
    """

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> Obj:
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


@dataclass(frozen=True)
class ObjectPath:
    """Which resource (and which object of it) an API URL addresses."""

    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)

    @property
    def qualified(self) -> str:
        """`secrets` or `arksapplications.arks.ai`, as the API server names resources in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


def parse_object_path(path: str) -> ObjectPath | None:
    """Parse `/api/v1/...` and `/apis/<group>/<version>/...`; None for discovery or non-API URLs.

    https://kubernetes.io/docs/reference/using-api/api-concepts/#resource-uris
    """
    parts = path.strip("/").split("/")
    if parts[0] == "api" and len(parts) >= 3:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[0] == "apis" and len(parts) >= 4:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    # /api/v1/namespaces/<name>/status is a subresource of a Namespace, not a resource "status".
    is_namespace_subresource = (
        rest[0] == "namespaces" and len(rest) == 3 and rest[2] in ("status", "finalize")
    )
    if rest[0] == "namespaces" and len(rest) >= 3 and not is_namespace_subresource:
        namespace, rest = rest[1], rest[2:]
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return ObjectPath(group, version, rest[0], namespace, name, subresource)


def merge_patch(target: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386): dicts merge recursively, `null` deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def apply_merge(live: Any, applied: Any) -> Any:
    """Server-side apply's merge: recursive, the applied configuration wins, lists are replaced
    whole (atomic). Removing what a manager stopped applying, ownership and conflicts are
    `tests.support.fieldmanager`'s:
    https://kubernetes.io/docs/reference/using-api/server-side-apply/#merge-strategy
    """
    if not (isinstance(live, dict) and isinstance(applied, dict)):
        return copy.deepcopy(applied)
    result = dict(live)
    for key, value in applied.items():
        result[key] = apply_merge(live.get(key), value)
    return result


def parse_label_selector(selector: str) -> list[tuple[str, str | None, bool]]:
    """Equality-based selectors only (`a=b`, `a==b`, `a!=b`, `a`): (key, value, negated)."""
    terms: list[tuple[str, str | None, bool]] = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            terms.append((key.strip(), value.strip(), True))
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            terms.append((key.strip(), value.strip(), False))
        else:
            terms.append((term, None, False))
    return terms


def labels_match(obj: Obj, terms: list[tuple[str, str | None, bool]]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for key, value, negated in terms:
        if value is None:
            ok = key in labels
        else:
            ok = (labels.get(key) == value) != negated
        if not ok:
            return False
    return True


_OLD_LABELS = "_oldLabels"  # a MODIFIED event's labels before the change (never sent)


def _as_selected(event: Obj, terms: list[tuple[str, str | None, bool]]) -> Obj | None:
    """`event` as a watch with label selector `terms` sees it, or None when it sees nothing:
    an object whose change makes it match arrives as ADDED, one whose change makes it stop
    matching as DELETED (with its new state), as the API server's watch cache filters them
    (k8s.io/apiserver/pkg/storage/cacher: watchCacheEvent's PrevObject)."""
    now = labels_match(event["object"], terms)
    kind = event["type"]
    if kind == "MODIFIED" and _OLD_LABELS in event:
        before = labels_match({"metadata": {"labels": event[_OLD_LABELS]}}, terms)
        if before and not now:
            kind = "DELETED"
        elif now and not before:
            kind = "ADDED"
        elif not now:
            return None
    elif not now:
        return None
    return {"type": kind, "object": event["object"]}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _without_metadata_and_status(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


_WATCH_CLOSED = object()


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the object semantics of a real API server (see the module doc).

    The objects live in kmock's own store (`self.objects`), so tests may assert on them and on
    their history the kmock way; all changes must go through the HTTP API, which assigns
    `resourceVersion`s and feeds watches.
    """

    _last_rv: int = attrs.field(default=0, init=False)
    # Every change as (resourceVersion, path, event), for watches that resume from a version.
    _events: list[tuple[int, ObjectPath, Obj]] = attrs.field(factory=list, init=False)
    _watchers: list[tuple[ObjectPath, asyncio.Queue[Any]]] = attrs.field(factory=list, init=False)
    # Every object request as an RBAC check would see it: (user agent, verb, group,
    # resource[/subresource], namespace, name), so a test can hold one client's requests
    # against the Roles that client is installed with.
    audit: list[AuditEntry] = attrs.field(factory=list, init=False)
    # When set, an RBAC authorizer: a request it refuses is answered 403 Forbidden, as the API
    # server answers a client its Roles do not allow (tests/support/rbac.py builds one).
    authorize: Callable[[AuditEntry], bool] | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for (group, version, plural), (kind, namespaced, has_status) in BUILTIN_RESOURCES.items():
            self.resources[kmock.resource(group, version, plural)] = kmock.ResourceInfo(
                kind=kind,
                namespaced=namespaced,
                verbs={"create", "get", "list", "watch", "update", "patch", "delete"},
                subresources=({"status"} if has_status else set())
                | ({"scale"} if (group, version, plural) in SCALE_RESOURCES else set()),
            )

    # --- HTTP entry -------------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = parse_object_path(request.url.path)
        if path is not None:
            entry = _audit_entry(request, path)
            self.audit.append(entry)
            if self.authorize is not None and not self.authorize(entry):
                refused = ApiError(
                    403, "Forbidden", f"{entry[0]} cannot {entry[1]} {entry[3]} in {entry[4]}"
                )
                return aiohttp.web.json_response(refused.status(), status=403)
        if path is None or request.params.get("watch") in ("true", "1"):
            return await super()._handle(request)  # discovery; watches go to _serve_watch
        try:
            code, body = self._serve_object(request, path)
        except ApiError as e:
            return aiohttp.web.json_response(e.status(), status=e.code)
        return aiohttp.web.json_response(body, status=code)

    def _serve_object(self, request: kmock.Request, path: ObjectPath) -> tuple[int, Obj]:
        # All state changes are synchronous (no awaits), so each request is atomic on the loop.
        method = request.method.value
        manager = fm.manager_from(
            request.params.get("fieldManager"), request.headers.get("User-Agent", "")
        )
        if path.subresource == "scale" and path.name is not None and method in ("GET", "PUT"):
            if (path.group, path.version, path.plural) not in SCALE_RESOURCES:
                raise ApiError(404, "NotFound", f"{path.qualified} has no scale subresource")
            if method == "GET":
                return 200, self._scale_of(path, self._must_find(path))
            return 200, self._put_scale(path, _read_body(request), manager)
        if path.name is None and method == "GET":
            return 200, self._list(path, request.params)
        if path.name is None and method == "POST":
            return 201, self._create(path, _read_body(request), manager)
        if path.name is not None and method == "GET":
            return 200, self._get(path)
        if path.name is not None and method == "PUT":
            return 200, self._update(path, _read_body(request), manager)
        if path.name is not None and method == "PATCH":
            return self._patch(request, path, manager)
        if path.name is not None and method == "DELETE":
            return 200, self._delete(path, _read_body(request, required=False))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {request.url.path}")

    # --- store ------------------------------------------------------------------------------

    def _key(
        self, path: ObjectPath, name: str | None = None
    ) -> tuple[kmock.resource, str | None, str]:
        return (path.resource, path.namespace, name or path.name or "")

    def _find(self, path: ObjectPath, name: str | None = None) -> Obj | None:
        key = self._key(path, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].last.raw)

    def _must_find(self, path: ObjectPath) -> Obj:
        obj = self._find(path)
        if obj is None:
            # https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/status/
            raise ApiError(
                404,
                "NotFound",
                f'{path.qualified} "{path.name}" not found',
                {"name": path.name, "group": path.group, "kind": path.plural},
            )
        return obj

    def _next_rv(self) -> str:
        # resourceVersion is opaque to clients, but changes on every write of an object:
        # https://kubernetes.io/docs/reference/using-api/api-concepts/#resource-versions
        self._last_rv += 1
        return str(self._last_rv)

    def _store(self, path: ObjectPath, obj: Obj, event_type: str) -> None:
        key = self._key(path, obj["metadata"]["name"])
        event: Obj = {"type": event_type, "object": obj}
        if key in self.objects:
            if event_type == "MODIFIED":  # for label-selected watches (`_as_selected`)
                before = self.objects[key].last.raw.get("metadata") or {}
                event[_OLD_LABELS] = dict(before.get("labels") or {})
            self.objects[key].history.append(copy.deepcopy(obj))
        else:
            self.objects[key] = copy.deepcopy(obj)
        self._publish(path, event)

    def _remove(self, path: ObjectPath, obj: Obj) -> None:
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self.objects[self._key(path, obj["metadata"]["name"])].delete()
        self._publish(path, {"type": "DELETED", "object": obj})

    def _publish(self, path: ObjectPath, event: Obj) -> None:
        event = copy.deepcopy(event)
        self._events.append((self._last_rv, path, event))
        for scope, queue in self._watchers:
            if _in_scope(scope, path, event["object"]):
                queue.put_nowait(event)

    def _objects_of(
        self, path: ObjectPath, terms: list[tuple[str, str | None, bool]] | None = None
    ) -> Iterator[tuple[ObjectPath, Obj]]:
        """Copies of the live objects under `path` (matching label selector `terms`): selected
        before they are copied, so a selective list of a big collection stays cheap."""
        wanted = path.resource  # built per access: once, not once per object
        for (resource, namespace, name), obj in list(self.objects.items()):
            if resource != wanted or obj.deleted:
                continue
            if path.namespace is not None and namespace != path.namespace:
                continue
            if terms and not labels_match(obj.last.raw, terms):
                continue
            yield (
                ObjectPath(path.group, path.version, path.plural, namespace, name, None),
                copy.deepcopy(obj.last.raw),
            )

    def _kind(self, path: ObjectPath, body: Obj | None = None) -> str:
        known = BUILTIN_RESOURCES.get((path.group, path.version, path.plural))
        if known:
            return known[0]
        if body and body.get("kind"):
            return str(body["kind"])
        for _, obj in self._objects_of(
            ObjectPath(path.group, path.version, path.plural, None, None, None)
        ):
            return str(obj.get("kind"))
        return path.plural.capitalize()

    def _has_status(self, path: ObjectPath) -> bool:
        known = BUILTIN_RESOURCES.get((path.group, path.version, path.plural))
        return known[2] if known else True

    # --- verbs ------------------------------------------------------------------------------

    def _list(self, path: ObjectPath, params: Any) -> Obj:
        # Lists carry the collection's resourceVersion, from which a watch can resume:
        # https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes
        terms = parse_label_selector(params.get("labelSelector", ""))
        items = [obj for _, obj in self._objects_of(path, terms)]
        items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return {
            "apiVersion": f"{path.group}/{path.version}" if path.group else path.version,
            "kind": f"{self._kind(path)}List",
            "metadata": {"resourceVersion": str(self._last_rv)},
            "items": items,
        }

    def _get(self, path: ObjectPath) -> Obj:
        return self._must_find(path)

    def _create(self, path: ObjectPath, body: Obj, manager: str) -> Obj:
        # https://kubernetes.io/docs/reference/using-api/api-concepts/#resource-uris (POST creates)
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            # https://kubernetes.io/docs/reference/using-api/api-concepts/#generated-values
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if not meta.get("name"):
            raise ApiError(
                422, "Invalid", "metadata.name: Required value: name or generateName is required"
            )
        if path.namespace is not None and meta.get("namespace", path.namespace) != path.namespace:
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the object does not match the namespace on the request",
            )
        if self._find(path, meta["name"]) is not None:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{path.qualified} "{meta["name"]}" already exists',
                {"name": meta["name"], "group": path.group, "kind": path.plural},
            )
        return self._insert(path, body, fm.Manager(manager, fm.UPDATE))

    def _insert(
        self, path: ObjectPath, body: Obj, writer: fm.Manager, applied: fm.FieldSet | None = None
    ) -> Obj:
        meta = body["metadata"]
        # System-populated metadata; `generation` starts at 1 and counts spec changes:
        # https://github.com/kubernetes/community/blob/master/contributors/devel/sig-architecture/api-conventions.md#metadata
        for field in SYSTEM_METADATA:
            meta.pop(field, None)
        if path.namespace is not None:
            meta["namespace"] = path.namespace
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        meta["resourceVersion"] = self._next_rv()
        body["apiVersion"] = f"{path.group}/{path.version}" if path.group else path.version
        body["kind"] = self._kind(path, body)
        if self._has_status(path):
            # With a status subresource, the main resource ignores .status (also on create):
            # https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#status-subresource
            body.pop("status", None)
        _default(body)
        _validate(body, created=True)
        # The creator owns what it set (an apply: what it applied):
        # https://kubernetes.io/docs/reference/using-api/server-side-apply/#field-management
        meta.pop("managedFields", None)
        meta["managedFields"] = fm.record_write({}, body, writer, _now(), applied=applied)
        self._store(path, body, "ADDED")
        return body

    def _update(self, path: ObjectPath, body: Obj, manager: str) -> Obj:
        live = self._must_find(path)
        self._check_precondition(path, live, body)
        return self._write(path, live, body, fm.Manager(manager, fm.UPDATE, path.subresource or ""))

    def _scale_of(self, path: ObjectPath, obj: Obj) -> Obj:
        """The autoscaling/v1 Scale of an object (what the HPA controller reads and writes):
        https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/deployment-v1/#get-read-scale-of-the-specified-deployment
        """
        replicas_path = SCALE_RESOURCES[(path.group, path.version, path.plural)]
        node: Any = obj
        for part in replicas_path:
            node = (node or {}).get(part)
        status = obj.get("status") or {}
        match = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        selector = status.get("hpaPodSelector") or ",".join(f"{k}={v}" for k, v in match.items())
        meta = obj["metadata"]
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": int(node or 0)},
            "status": {"replicas": int(status.get("replicas") or 0), "selector": selector},
        }

    def _put_scale(self, path: ObjectPath, scale: Obj, manager: str) -> Obj:
        """Set the replicas through the scale subresource: an update of the parent's replicas
        field by (manager, Update, "scale"), as the API server's ScaleHandler maps it."""
        main = ObjectPath(path.group, path.version, path.plural, path.namespace, path.name, None)
        live = self._must_find(main)
        self._check_precondition(path, live, scale)
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise ApiError(422, "Invalid", "spec.replicas: Invalid value: must be an integer >= 0")
        desired = copy.deepcopy(live)
        node = desired
        replicas_path = SCALE_RESOURCES[(path.group, path.version, path.plural)]
        for part in replicas_path[:-1]:
            node = node.setdefault(part, {})
        node[replicas_path[-1]] = replicas
        new = self._write(main, live, desired, fm.Manager(manager, fm.UPDATE, "scale"))
        return self._scale_of(path, new)

    def _patch(self, request: kmock.Request, path: ObjectPath, manager: str) -> tuple[int, Obj]:
        # https://kubernetes.io/docs/reference/using-api/api-concepts/#patch-and-apply
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type == APPLY_PATCH:
            if not request.params.get("fieldManager"):
                raise ApiError(
                    400, "BadRequest", "PATCH requests with apply content type require fieldManager"
                )
            applied = yaml.safe_load(request.text) or {}
            if not isinstance(applied, dict):
                raise ApiError(400, "BadRequest", "the applied configuration must be an object")
            if applied.get("metadata", {}).get("name", path.name) != path.name:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the name of the object does not match the name on the request",
                )
            writer = fm.Manager(manager, fm.APPLY, path.subresource or "")
            force = request.params.get("force") in ("true", "1")
            owned = self._applied_fields(path, applied)
            live = self._find(path)
            if live is None and path.subresource is None:
                # Apply creates a missing object (a real server answers 201 Created).
                applied.setdefault("metadata", {})["name"] = path.name
                return 201, self._insert(path, applied, writer, owned)
            if live is None:
                self._must_find(path)
            assert live is not None
            merged = fm.prune_unapplied(apply_merge(live, applied), live, writer, owned)
            return 200, self._write(path, live, merged, writer, applied=owned, force=force)
        if content_type in (MERGE_PATCH, STRATEGIC_MERGE_PATCH):
            # Simplification: strategic merge patch is treated as JSON merge patch, so lists are
            # replaced whole instead of merged by their patchMergeKey:
            # https://kubernetes.io/docs/tasks/manage-kubernetes-objects/update-api-object-kubectl-patch/
            patch = _read_body(request)
            live = self._must_find(path)
            self._check_precondition(path, live, patch)
            writer = fm.Manager(manager, fm.UPDATE, path.subresource or "")
            return 200, self._write(path, live, merge_patch(live, patch), writer)
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format: {content_type}",
        )

    def _check_precondition(self, path: ObjectPath, live: Obj, body: Obj) -> None:
        # Optimistic concurrency: a write naming a stale resourceVersion fails with 409 Conflict.
        # https://github.com/kubernetes/community/blob/master/contributors/devel/sig-architecture/api-conventions.md#concurrency-control-and-consistency
        wanted = body.get("metadata", {}).get("resourceVersion")
        if wanted and wanted != live["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {path.qualified} "{path.name}": '
                "the object has been modified; please apply your changes to the latest version and try again",
                {"name": path.name, "group": path.group, "kind": path.plural},
            )

    def _applied_fields(self, path: ObjectPath, applied: Obj) -> fm.FieldSet:
        """The fields an apply claims: a status-subresource apply claims only status, a main
        resource with a status subresource never claims status (its reset fields)."""
        if path.subresource == "status":
            return fm.field_set({"status": applied.get("status") or {}})
        if self._has_status(path):
            return fm.field_set({k: v for k, v in applied.items() if k != "status"})
        return fm.field_set(applied)

    def _write(
        self,
        path: ObjectPath,
        live: Obj,
        desired: Obj,
        writer: fm.Manager | None = None,
        *,
        applied: fm.FieldSet | None = None,
        force: bool = True,
    ) -> Obj:
        """Store `desired` as the new state of `live`, keeping what the client may not change;
        `writer` (None for the server's own writes) is recorded in managedFields, `applied` is
        the field set of an apply (see `tests.support.fieldmanager.record_write`)."""
        new = copy.deepcopy(desired)
        meta = new.setdefault("metadata", {})
        for field in SYSTEM_METADATA:
            if field in live["metadata"]:
                meta[field] = live["metadata"][field]
            else:
                meta.pop(field, None)
        meta["name"], new["apiVersion"], new["kind"] = (
            live["metadata"]["name"],
            live["apiVersion"],
            live["kind"],
        )
        if "namespace" in live["metadata"]:
            # The namespace comes from the request's path: a body may leave it out, not change it.
            # https://kubernetes.io/docs/reference/using-api/api-concepts/#resource-uris
            if (
                meta.get("namespace", live["metadata"]["namespace"])
                != live["metadata"]["namespace"]
            ):
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = live["metadata"]["namespace"]
        if path.subresource == "status":
            # The status subresource changes .status only; everything else stays as it was:
            # https://github.com/kubernetes/community/blob/master/contributors/devel/sig-architecture/api-conventions.md#spec-and-status
            new = (
                dict(live, status=new.get("status"))
                if "status" in new
                else {k: v for k, v in live.items() if k != "status"}
            )
        elif self._has_status(path):
            new.pop("status", None)
            if "status" in live:
                new["status"] = live["status"]
        if path.subresource != "status":
            _default(new)
            _validate(new, created=False)
        if writer is None:
            new["metadata"].pop("managedFields", None)
            if "managedFields" in live["metadata"]:
                new["metadata"]["managedFields"] = live["metadata"]["managedFields"]
        else:
            try:
                new["metadata"]["managedFields"] = fm.record_write(
                    live, new, writer, _now(), applied=applied, force=force
                )
            except fm.ConflictError as e:
                # https://kubernetes.io/docs/reference/using-api/server-side-apply/#conflicts
                raise ApiError(
                    409,
                    "Conflict",
                    e.message,
                    {
                        "name": path.name,
                        "group": path.group,
                        "kind": path.plural,
                        "causes": e.causes(),
                    },
                ) from e
        if new == live:
            # A no-op write changes nothing: no new resourceVersion, no watch event (as a real
            # server does), so controllers applying an unchanged state do not wake themselves up.
            return live
        if _without_metadata_and_status(new) != _without_metadata_and_status(live):
            # generation counts changes to the desired state (spec), not to metadata or status:
            # https://github.com/kubernetes/community/blob/master/contributors/devel/sig-architecture/api-conventions.md#metadata
            new["metadata"]["generation"] = live["metadata"].get("generation", 1) + 1
        new["metadata"]["resourceVersion"] = self._next_rv()
        self._store(path, new, "MODIFIED")
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(path, new)  # the last finalizer is gone: the deletion completes …
            self._collect_garbage(new, orphan=False)  # … and its dependents go with it
        return new

    def _delete(self, path: ObjectPath, options: Obj) -> Obj:
        live = self._must_find(path)
        preconditions = options.get("preconditions") or {}
        for field in ("uid", "resourceVersion"):
            if preconditions.get(field) and preconditions[field] != live["metadata"].get(field):
                raise ApiError(
                    409, "Conflict", f"Precondition failed: {field} in precondition does not match"
                )
        if live["metadata"].get("finalizers"):
            # Finalizers hold deletion: the object is only marked until they are all removed.
            # https://kubernetes.io/docs/concepts/overview/working-with-objects/finalizers/
            if live["metadata"].get("deletionTimestamp"):
                return live
            # As the API server's markAsDeleting, the first mark moves a generation (the spec's
            # readers must act on it): k8s.io/apiserver/pkg/registry/generic/registry/store.go
            if live["metadata"].get("generation", 0) > 0:
                live["metadata"]["generation"] += 1
            live["metadata"]["deletionTimestamp"] = _now()
            live["metadata"]["resourceVersion"] = self._next_rv()
            self._store(path, live, "MODIFIED")
            return live
        self._remove(path, live)
        self._collect_garbage(live, orphan=options.get("propagationPolicy") == "Orphan")
        return live

    def _collect_garbage(self, owner: Obj, *, orphan: bool) -> None:
        """Delete (or orphan) the dependents whose ownerReferences name the deleted owner.

        Background cascading deletion, done synchronously. Foreground deletion (the owner waits
        for its dependents) is treated as background.
        https://kubernetes.io/docs/concepts/architecture/garbage-collection/#cascading-deletion
        """
        uid = owner["metadata"]["uid"]
        dependents = [
            (path, obj)
            for resource in {key[0] for key in self.objects}
            for path, obj in self._objects_of(
                ObjectPath(
                    resource.group or "",
                    resource.version or "",
                    resource.plural or "",
                    None,
                    None,
                    None,
                )
            )
            if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])
        ]
        for path, obj in dependents:
            path = ObjectPath(
                path.group, path.version, path.plural, path.namespace, obj["metadata"]["name"], None
            )
            if orphan:
                refs = [r for r in obj["metadata"]["ownerReferences"] if r.get("uid") != uid]
                self._write(
                    path, obj, merge_patch(obj, {"metadata": {"ownerReferences": refs or None}})
                )
            elif not self._has_live_owner(obj, uid) and self._find(path) is not None:
                self._delete(path, {})

    def _has_live_owner(self, obj: Obj, deleted_uid: str) -> bool:
        live_uids = {
            o.last.raw.get("metadata", {}).get("uid")
            for o in self.objects.values()
            if not o.deleted
        }
        return any(
            ref.get("uid") in live_uids
            for ref in obj["metadata"].get("ownerReferences") or []
            if ref.get("uid") != deleted_uid
        )

    # --- watch ------------------------------------------------------------------------------

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        """Stream ADDED/MODIFIED/DELETED events, resuming from `resourceVersion` if given.

        Without a resourceVersion (or "0"), the current objects come first as ADDED events;
        with one, the changes after it are replayed (no history is ever compacted, so 410 Gone
        never happens). `timeoutSeconds` ends the stream as on a real server.
        https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes
        """
        path = parse_object_path(request.url.path)
        assert path is not None
        if path.name is not None:
            path = ObjectPath(path.group, path.version, path.plural, path.namespace, None, None)
        terms = parse_label_selector(request.params.get("labelSelector", ""))
        since = request.params.get("resourceVersion", "")
        timeout = float(request.params.get("timeoutSeconds", "0") or 0) or None
        queue: asyncio.Queue[Any] = asyncio.Queue()
        if since in ("", "0"):
            for _, obj in self._objects_of(path):
                queue.put_nowait({"type": "ADDED", "object": obj})
        else:
            for rv, event_path, event in self._events:
                if rv > int(since) and _in_scope(path, event_path, event["object"]):
                    queue.put_nowait(event)
        watcher = (path, queue)
        self._watchers.append(watcher)  # no await since the snapshot: no event is missed
        yield b""  # send the headers now, even if no event comes
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            while True:
                remaining = (
                    None if deadline is None else deadline - asyncio.get_running_loop().time()
                )
                try:
                    event = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    return
                if event is _WATCH_CLOSED:
                    return
                selected = _as_selected(event, terms)
                if selected is not None:
                    yield selected
        finally:
            self._watchers.remove(watcher)

    def seed(self, url_path: str, bodies: list[Obj], manager: str = "seed") -> None:
        """Create many objects at once, as POSTs by field manager `manager` to `url_path` would,
        without the HTTP round trips: only before any client talks to the server (it runs
        outside the server's loop)."""
        path = parse_object_path(url_path)
        assert path is not None and path.name is None
        for body in bodies:
            self._create(path, body, manager)

    def close_watches(self) -> None:
        """End every open watch stream, so the server can stop without waiting on them."""
        for _, queue in self._watchers:
            queue.put_nowait(_WATCH_CLOSED)


# The API server's name and label validation (k8s.io/apimachinery/pkg/util/validation):
# https://kubernetes.io/docs/concepts/overview/working-with-objects/names/ and
# https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#syntax-and-character-set
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
# Kinds whose names are not DNS subdomains: RBAC's are path segments (`system:…`), Events'
# are the client's; a Service's name is a DNS-1035 label (it becomes a DNS name).
_NAME_UNCHECKED = frozenset({"Role", "RoleBinding", "Event"})


def _name_problem(kind: str, name: str) -> str | None:
    if kind in _NAME_UNCHECKED:
        return None
    if kind == "Service":
        if len(name) > 63 or not _DNS_1035_LABEL.match(name):
            return "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (at most 63)"
        return None
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        return "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (at most 253)"
    return None


def _label_problems(where: str, labels: Any) -> list[str]:
    problems = []
    for key, value in (labels or {}).items():
        prefix, _, name = str(key).rpartition("/")
        if (
            len(name) > 63
            or not _LABEL_NAME.match(name)
            or (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)))
        ):
            problems.append(f"{where}: Invalid value: {key!r}: not a valid label key")
        if (
            not isinstance(value, str)
            or len(value) > 63
            or (value and not _LABEL_NAME.match(value))
        ):
            problems.append(
                f"{where}: Invalid value: {value!r}: a valid label must be an empty string or "
                "consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                "with an alphanumeric character (at most 63)"
            )
    return problems


def _validate(obj: Obj, *, created: bool) -> None:
    """422 Invalid for what the API server refuses in any object: a name its kind does not
    allow (on create; names never change), labels that are not label keys and values, in the
    metadata, a pod template's metadata or a selector's matchLabels."""
    meta = obj.get("metadata") or {}
    problems = []
    if created:
        why = _name_problem(str(obj.get("kind")), str(meta.get("name")))
        if why:
            problems.append(f"metadata.name: Invalid value: {meta.get('name')!r}: {why}")
    problems += _label_problems("metadata.labels", meta.get("labels"))
    spec = obj.get("spec")
    if isinstance(spec, dict):
        template = spec.get("template")
        if isinstance(template, dict):
            labels = (template.get("metadata") or {}).get("labels")
            problems += _label_problems("spec.template.metadata.labels", labels)
        selector = spec.get("selector")
        if isinstance(selector, dict) and isinstance(selector.get("matchLabels"), dict):
            problems += _label_problems("spec.selector.matchLabels", selector["matchLabels"])
    if problems:
        kind, name = obj.get("kind"), meta.get("name")
        raise ApiError(422, "Invalid", f'{kind} "{name}" is invalid: ' + "; ".join(problems))


def _default(obj: Obj) -> None:
    """Fill in the defaults of `DEFAULTS` the object lacks (as the API server's defaulting does
    on every write, so a field an apply removed comes back with its default)."""
    for path, value in DEFAULTS.get(str(obj.get("kind")), ()):
        node = obj
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node.setdefault(path[-1], value)


def _in_scope(scope: ObjectPath, path: ObjectPath, obj: Obj) -> bool:
    if (scope.group, scope.version, scope.plural) != (path.group, path.version, path.plural):
        return False
    namespace = obj.get("metadata", {}).get("namespace")
    return scope.namespace is None or scope.namespace == namespace


def _read_body(request: kmock.Request, *, required: bool = True) -> Obj:
    if not request.body:
        if required:
            raise ApiError(400, "BadRequest", "the request body is required")
        return {}
    try:
        body = json.loads(request.body)
    except ValueError as e:
        raise ApiError(400, "BadRequest", f"the request body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the request body must be a JSON object")
    return body


@dataclass(frozen=True)
class RunningKubeEmulator:
    """A started emulator: its URL and its store, for the test that owns it."""

    url: str
    emulator: KubeEmulator

    def configuration(self) -> Any:
        import kubernetes.client

        configuration = kubernetes.client.Configuration(host=self.url)
        return configuration

    def api_client(self) -> Any:
        import kubernetes.client

        return kubernetes.client.ApiClient(self.configuration())


@contextlib.contextmanager
def running_kube_emulator(emulator: KubeEmulator | None = None) -> Iterator[RunningKubeEmulator]:
    """Serve an emulator on a free 127.0.0.1 port from a background thread; stop it on exit.

    The server runs in its own event loop, so synchronous tests and the synchronous
    `kubernetes` client can use it; all state changes happen on that loop.
    """
    emulator = emulator if emulator is not None else KubeEmulator()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    outcome: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        outcome["stop"] = stop
        async with emulator, kmock.Server(emulator, host="127.0.0.1") as server:
            outcome["url"] = str(server.url).rstrip("/")
            started.set()
            await stop.wait()
            emulator.close_watches()

    def run() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as e:
            outcome["error"] = e
        finally:
            started.set()

    thread = threading.Thread(target=run, name="kube-emulator", daemon=True)
    thread.start()
    started.wait(timeout=30)
    try:
        if "url" not in outcome:
            raise RuntimeError("the Kubernetes emulator did not start") from outcome.get("error")
        yield RunningKubeEmulator(url=outcome["url"], emulator=emulator)
    finally:
        if "stop" in outcome:
            loop.call_soon_threadsafe(outcome["stop"].set)
        thread.join(timeout=30)
        if not thread.is_alive():
            loop.close()


def eventually(check: Callable[[], Any], timeout_s: float = 15.0) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout_s` (generous: it
    only bounds a failure, and a controller starting its informers on a loaded 2-core CI
    machine missed 5 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(0.02)


def get_object(api: Any, resource: Any, ns: str, name: str) -> dict[str, Any] | None:
    """The object, or None when the API server says 404 (`resource` is a arks.adapters.kube.rest.Resource)."""
    from arks.adapters.kube import rest

    return rest.get_or_none(api, resource, ns, name)


# Informer settings for tests: watches that end (and are resumed) every second, quick retries.
FAST_INFORMERS: dict[str, float] = {"resync_s": 60.0, "watch_timeout_s": 1.0, "retry_s": 0.1}


def set_status(api: Any, resource: Any, ns: str, name: str, **status: Any) -> None:
    """Merge-patch the status subresource, as the cluster's own controllers would (a
    Deployment's readyReplicas, a Job's succeeded, a PVC's phase)."""
    from arks.adapters.kube import rest

    rest.request(
        api,
        "PATCH",
        resource.path(ns, name, "status"),
        body={"status": status},
        content_type=rest.MERGE_PATCH,
    )
