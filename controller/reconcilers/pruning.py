"""Deleting the children a reconciler's render no longer produces, for every reconciler.

Left behind, such a child keeps acting: an HPA fights the controller over `replicas`, a
Deployment replaced by a LeaderWorkerSet holds its GPUs, a route keeps routing. A child is
found by the managed-by label and its owner's label (a cheap server-side filter), and is only
deleted when its controller reference names the owner's uid: what another controller or a user
owns is never touched. The delete carries a uid precondition, so an object re-created under the
same name in between is left alone; dependents go in the background (what kubectl does, and
what the API server does by default for these kinds), since the owner's own deletion is not
held up by them, and a name being freed at once lets a re-render re-create it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from arks.adapters.kube import rest
from arks.adapters.kube.apply import delete
from arks.resources import Resource
from arks.wire import LABEL_MANAGED_BY, MANAGED_BY


def controlled_by(child: Mapping[str, Any], owner_uid: str) -> bool:
    """Whether `child`'s controller reference is the owner with uid `owner_uid`."""
    return any(
        ref.get("uid") == owner_uid and ref.get("controller")
        for ref in (child.get("metadata") or {}).get("ownerReferences") or []
    )


def stale_children(
    owner_uid: str,
    listed: Mapping[str, Sequence[Mapping[str, Any]]],
    rendered: Sequence[Mapping[str, Any]],
) -> list[tuple[str, Mapping[str, Any]]]:
    """(kind, child) of the `listed` children (by kind) the owner controls that `rendered` does
    not produce, and that are not already being deleted: pure."""
    keep = {(str(o["kind"]), str(o["metadata"]["name"])) for o in rendered}
    return [
        (kind, child)
        for kind, children in listed.items()
        for child in children
        if controlled_by(child, owner_uid)
        and (kind, str(child["metadata"]["name"])) not in keep
        and not child["metadata"].get("deletionTimestamp")
    ]


def prune_owned(
    api_client: ApiClient,
    owner: Mapping[str, Any],
    rendered: Sequence[Mapping[str, Any]],
    kinds: Mapping[str, Resource],
    owner_label: tuple[str, str],
) -> list[str]:
    """Delete the children of `owner` (of the `kinds` its reconciler renders, in its namespace,
    labelled `owner_label` = (key, value)) that `rendered` no longer holds; `kind/name` of each.
    """
    meta = owner["metadata"]
    namespace = str(meta["namespace"])
    selector = f"{LABEL_MANAGED_BY}={MANAGED_BY},{owner_label[0]}={owner_label[1]}"
    listed: dict[str, list[Mapping[str, Any]]] = {}
    for kind, resource in kinds.items():
        try:
            answer = rest.request(
                api_client, "GET", resource.path(namespace), query={"labelSelector": selector}
            )
        except ApiException as e:
            if e.status == 404:  # a kind this cluster does not serve (an uninstalled CRD)
                continue
            raise rest.classify(e, f"list {resource.plural}") from e
        listed[kind] = list(answer.get("items") or [])
    gone = []
    for kind, child in stale_children(str(meta["uid"]), listed, rendered):
        name = str(child["metadata"]["name"])
        delete(api_client, kinds[kind], namespace, name, uid=child["metadata"].get("uid"))
        gone.append(f"{kind}/{name}")
    return gone
