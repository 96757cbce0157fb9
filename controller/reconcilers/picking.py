"""The EnvoyPatchPolicy of a picking ArksEndpoint: applied, moved, and deleted with it.

Part of the ArksEndpoint reconcile (`controller.reconcilers.endpoint`); the policy itself is
rendered by `controller.render.picking`, which says why it exists and why it lives in the
Gateway's namespace. That placement rules out owner references, so:

* every endpoint (whatever its weighting: a stored response names its engine) carries the
  `arks.ai/picking-policy` finalizer, added before its policy is first written (a crash in
  between leaves no untracked policy);
* every reconcile deletes the endpoint's other policies (found by its uid label): those of a
  Gateway it no longer attaches to;
* when the endpoint is deleted, its policies go first, then the finalizer.

Without Envoy Gateway's EnvoyPatchPolicy API (Envoy Gateway not installed, or an older one), the
endpoint's `Picking` condition says so and routing falls back to the route's weights; the
finalizer still comes off, so the endpoint can always be deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from arks.adapters.kube import rest
from arks.adapters.kube.apply import delete, ensure_finalizer, remove_finalizer, server_side_apply
from arks.adapters.kube.errors import PermanentError
from arks.adapters.kube.rest import Obj
from arks.resources import PATCH_POLICIES, Resource
from arks.wire import LABEL_ENDPOINT_UID, LABEL_MANAGED_BY, MANAGED_BY, PICKING_FINALIZER
from controller.render.picking import render_picking_policy

log = logging.getLogger(__name__)

Condition = tuple[str, str, str]
"""(status, reason, message) of the endpoint's `Picking` condition."""


def _policies_of(api_client: ApiClient, uid: str) -> list[Obj]:
    """The endpoint's policies in every namespace; none when the API is not served."""
    try:
        listed = rest.request(
            api_client,
            "GET",
            PATCH_POLICIES.path(),
            query={"labelSelector": f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_ENDPOINT_UID}={uid}"},
        )
    except ApiException as e:
        if e.status == 404:
            return []
        raise rest.classify(e, "list envoypatchpolicies") from e
    return [dict(item) for item in listed.get("items") or []]


def _where(obj: Mapping[str, Any]) -> tuple[str, str]:
    return str(obj["metadata"]["namespace"]), str(obj["metadata"]["name"])


def sync_picking_policy(
    api_client: ApiClient,
    endpoints: Resource,
    endpoint: Mapping[str, Any],
    default_gateway: Mapping[str, str],
    field_manager: str,
) -> Condition | None:
    """Bring the endpoint's EnvoyPatchPolicies to the desired state, including its deletion.

    Returns the `Picking` condition to report, None for an endpoint being deleted."""
    meta = endpoint["metadata"]
    deleting = bool(meta.get("deletionTimestamp"))
    desired = None if deleting else render_picking_policy(endpoint, default_gateway)
    if desired is None and PICKING_FINALIZER not in (meta.get("finalizers") or []):
        return None
    condition: Condition | None = None
    keep: tuple[str, str] | None = None  # the policy written now; every other one goes
    if desired is not None:
        ensure_finalizer(api_client, endpoints, endpoint, PICKING_FINALIZER)
        namespace, name = _where(desired)
        cluster = desired["spec"]["jsonPatches"][0]["name"]
        try:
            server_side_apply(api_client, PATCH_POLICIES, desired, field_manager)
            keep = (namespace, name)
            condition = (
                "True",
                "HostOverridePatched",
                f"EnvoyPatchPolicy {namespace}/{name} lets Envoy Gateway's cluster {cluster} take extproc's picks",
            )
        except PermanentError as e:
            condition = (
                "False",
                "PatchPolicyNotApplied",
                f"EnvoyPatchPolicy {namespace}/{name} could not be written ({e}); requests are balanced "
                "by the route's weights. Picking needs Envoy Gateway with enableEnvoyPatchPolicy",
            )
    for policy in _policies_of(api_client, str(meta["uid"])):
        if _where(policy) != keep:
            delete(api_client, PATCH_POLICIES, *_where(policy), uid=policy["metadata"].get("uid"))
            log.info("deleted EnvoyPatchPolicy %s/%s", *_where(policy))
    if desired is None:
        remove_finalizer(api_client, endpoints, endpoint, PICKING_FINALIZER)
    return condition
