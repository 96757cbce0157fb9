"""Writes a reconcile makes: server-side apply, owner references, status, finalizers, deletes.

Every API failure leaves here as TemporaryError or PermanentError (see `rest.classify`), so a
reconcile can let them propagate and the runner retries the right way.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from arks.adapters.kube import rest
from arks.adapters.kube.rest import Obj
from arks.resources import Resource


def server_side_apply(
    api_client: ApiClient,
    resource: Resource,
    obj: Mapping[str, Any],
    field_manager: str,
    force: bool = True,
) -> Obj:
    """Create or update `obj` to the applied configuration; the live object is returned.

    Applying an unchanged configuration is a no-op on the server (same resourceVersion).
    """
    meta = obj.get("metadata") or {}
    path = resource.path(meta.get("namespace"), str(meta["name"]))
    query = {"fieldManager": field_manager}
    if force:
        query["force"] = "true"
    try:
        return rest.request(
            api_client, "PATCH", path, query=query, body=dict(obj), content_type=rest.APPLY_PATCH
        )
    except ApiException as e:
        raise rest.classify(e, f"apply {resource.plural}/{meta['name']}") from e


def applies(obj: Mapping[str, Any], field_manager: str, path: Sequence[str]) -> bool:
    """Whether `field_manager`'s server-side apply owns the field at `path` (e.g. `spec`,
    `replicas`) of `obj`, from its `metadata.managedFields` (FieldsV1: `f:<name>` keys)."""
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") != field_manager or entry.get("operation") != "Apply":
            continue
        node: Any = entry.get("fieldsV1") or {}
        for part in path:
            node = node.get(f"f:{part}") if isinstance(node, dict) else None
        if node is not None:
            return True
    return False


def hand_over(
    api_client: ApiClient,
    resource: Resource,
    live: Mapping[str, Any],
    path: Sequence[str],
    handover_manager: str,
) -> bool:
    """Keep the field at `path` of `live` at its value while its applier stops applying it.

    Server-side apply removes a field its manager leaves out unless another manager owns it;
    for `replicas` that is a reset to 1. So, as the Kubernetes docs prescribe ("Transferring
    ownership"), the live value is applied once under a private `handover_manager`, which then
    shares the field; the next write of a new value by its real owner (the HPA) takes it from
    both and the handover manager disappears. Not forced: a conflict means that owner already
    changed it, and nothing needs keeping. True when the handover manager now holds the field.
    """
    meta = live["metadata"]
    value: Any = live
    for part in path:
        value = value[part]
    body: dict[str, Any] = {
        "apiVersion": live["apiVersion"],
        "kind": live["kind"],
        "metadata": {"name": meta["name"], "namespace": meta.get("namespace")},
    }
    node = body
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    try:
        rest.request(
            api_client,
            "PATCH",
            resource.path(meta.get("namespace"), meta["name"]),
            query={"fieldManager": handover_manager},
            body=body,
            content_type=rest.APPLY_PATCH,
        )
    except ApiException as e:
        if e.status == 409:
            return False
        raise rest.classify(
            e, f"hand over {'.'.join(path)} of {resource.plural}/{meta['name']}"
        ) from e
    return True


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """A controller reference to `owner`, so deleting it cascades and changes re-trigger it."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def set_owner(child: Mapping[str, Any], owner: Mapping[str, Any]) -> Obj:
    """A copy of `child` whose controller reference is `owner` (other references are kept)."""
    result = copy.deepcopy(dict(child))
    meta = result.setdefault("metadata", {})
    reference = owner_reference(owner)
    others = [
        r
        for r in meta.get("ownerReferences") or []
        if r.get("uid") != reference["uid"] and not r.get("controller")
    ]
    meta["ownerReferences"] = [*others, reference]
    return result


def patch_status(
    api_client: ApiClient,
    resource: Resource,
    namespace: str | None,
    name: str,
    status: Mapping[str, Any],
) -> Obj:
    """Merge-patch `.status` through the status subresource."""
    try:
        return rest.request(
            api_client,
            "PATCH",
            resource.path(namespace, name, "status"),
            body={"status": dict(status)},
            content_type=rest.MERGE_PATCH,
        )
    except ApiException as e:
        raise rest.classify(e, f"status of {resource.plural}/{name}") from e


def delete(
    api_client: ApiClient,
    resource: Resource,
    namespace: str | None,
    name: str,
    uid: str | None = None,
) -> None:
    """Delete an object, its dependents in the background; one already gone is no error.

    With `uid`, only that object: one re-created under the same name since it was read is left
    alone (a uid precondition, answered 409 Conflict, taken as "already gone")."""
    options: dict[str, Any] = {"propagationPolicy": "Background"}
    if uid is not None:
        options["preconditions"] = {"uid": uid}
    try:
        rest.request(api_client, "DELETE", resource.path(namespace, name), body=options)
    except ApiException as e:
        if e.status == 404 or (e.status == 409 and uid is not None):
            return
        raise rest.classify(e, f"delete {resource.plural}/{name}") from e


def ensure_finalizer(
    api_client: ApiClient, resource: Resource, obj: Mapping[str, Any], finalizer: str
) -> Obj:
    """Add `finalizer` if missing; a stale `obj` yields TemporaryError (409 Conflict)."""
    finalizers = list(obj["metadata"].get("finalizers") or [])
    if finalizer in finalizers:
        return dict(obj)
    return _patch_finalizers(api_client, resource, obj, [*finalizers, finalizer])


def remove_finalizer(
    api_client: ApiClient, resource: Resource, obj: Mapping[str, Any], finalizer: str
) -> Obj:
    """Remove `finalizer` if present; removing the last one lets a pending deletion complete."""
    finalizers = list(obj["metadata"].get("finalizers") or [])
    if finalizer not in finalizers:
        return dict(obj)
    return _patch_finalizers(api_client, resource, obj, [f for f in finalizers if f != finalizer])


def _patch_finalizers(
    api_client: ApiClient, resource: Resource, obj: Mapping[str, Any], finalizers: list[str]
) -> Obj:
    meta = obj["metadata"]
    # The resourceVersion makes this a compare-and-swap: the list is replaced whole by a merge
    # patch, so a concurrent change to it must not be overwritten.
    patch = {
        "metadata": {
            "finalizers": finalizers or None,
            "resourceVersion": meta["resourceVersion"],
        }
    }
    try:
        return rest.request(
            api_client,
            "PATCH",
            resource.path(meta.get("namespace"), meta["name"]),
            body=patch,
            content_type=rest.MERGE_PATCH,
        )
    except ApiException as e:
        raise rest.classify(e, f"finalizers of {resource.plural}/{meta['name']}") from e
