"""ArksEndpoint reconciler: discover applications → render the HTTPRoute → apply → status.

Level-triggered: every call reads the endpoint and the ArksApplications of its namespace
afresh, server-side applies the HTTPRoute (owned by the endpoint, so deleting the endpoint
deletes the route) and reports the backends in `status.routes`, their count in
`status.backends` and a `Ready` condition. An unchanged status is not written.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from controller.kube import rest
from controller.kube.apply import patch_status, server_side_apply, set_owner
from controller.kube.conditions import set_condition
from controller.kube.errors import PermanentError
from controller.kube.queue import Key
from controller.kube.rest import Obj, Resource
from controller.reconcilers.application import APPLICATIONS
from controller.render.endpoint import render_httproute, route_status

ENDPOINTS = Resource("arks.ai", "v1", "arksendpoints")
HTTPROUTES = Resource("gateway.networking.k8s.io", "v1", "httproutes")
FIELD_MANAGER = "arks-controller"



def _list(api_client: ApiClient, resource: Resource, namespace: str) -> list[Obj]:
    try:
        listed = rest.request(api_client, "GET", resource.path(namespace))
    except ApiException as e:
        raise rest.classify(e, f"list {resource.plural} in {namespace}") from e
    return [dict(item) for item in listed.get("items") or []]


def _write_status(
    api_client: ApiClient,
    endpoint: Mapping[str, Any],
    fields: Mapping[str, Any],
    ready: tuple[str, str, str],
    now: datetime.datetime,
) -> None:
    current: Mapping[str, Any] = endpoint.get("status") or {}
    generation = endpoint["metadata"].get("generation")
    conditions = set_condition(current.get("conditions"), "Ready", *ready, generation, now)
    desired: dict[str, Any] = {**fields, "conditions": list(conditions)}
    if generation is not None:
        desired["observedGeneration"] = generation
    if all(current.get(k) == v for k, v in desired.items()):
        return
    meta = endpoint["metadata"]
    patch_status(api_client, ENDPOINTS, meta["namespace"], meta["name"], desired)


def reconcile_endpoint(
    api_client: ApiClient,
    key: Key,
    *,
    field_manager: str = FIELD_MANAGER,
    now: datetime.datetime | None = None,
) -> None:
    """Bring the HTTPRoute of ArksEndpoint `key` = (namespace, name) to the desired state.

    Raises the renderer's PermanentError for an endpoint that cannot be routed (after
    recording it in the Ready condition).
    """
    namespace, name = key
    endpoint = rest.get_or_none(api_client, ENDPOINTS, namespace, name)
    if endpoint is None or endpoint["metadata"].get("deletionTimestamp"):
        return  # the route goes with it through its owner reference
    when = now or datetime.datetime.now(datetime.UTC)
    applications = _list(api_client, APPLICATIONS, namespace)

    try:
        route = render_httproute(endpoint, applications)
    except PermanentError as e:
        _write_status(api_client, endpoint, {}, ("False", "Unroutable", str(e)), when)
        raise
    server_side_apply(api_client, HTTPROUTES, set_owner(route, endpoint), field_manager)

    routes = route_status(route)
    live = [r for r in routes if int(r["weight"]) > 0]
    if live:
        ready = ("True", "BackendsRouted", f"HTTPRoute {name} over {len(live)} backends")
    elif routes:
        ready = ("False", "NoWeightedBackends", f"HTTPRoute {name}: every backend has weight 0")
    else:
        ready = ("False", "NoBackends", f"HTTPRoute {name} has no backends (requests get 500)")
    _write_status(api_client, endpoint, {"routes": routes, "backends": len(live)}, ready, when)
