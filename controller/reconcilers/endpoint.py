"""ArksEndpoint reconciler: discover applications → render the HTTPRoute → apply → status.

Level-triggered: every call reads the endpoint and the ArksApplications of its namespace
afresh, server-side applies the HTTPRoute (owned by the endpoint, so deleting the endpoint
deletes the route) and reports the backends in `status.routes`, their count in
`status.backends`, whether Envoy Gateway accepted the route (`RouteAccepted`, from the route's
`status.parents`: `controller.render.route_acceptance`) and a `Ready` condition. An unchanged
status is not written. Endpoints that pick their engine per request also get an
EnvoyPatchPolicy for Envoy Gateway and a `Picking` condition (`controller.reconcilers.picking`).

With a `LoadSource` (`controller.load.cluster.ClusterLoad`), endpoints not on `weighting:
static` weigh their discovered applications by live engine load (the formula is in
`controller.render.endpoint`), and a change of an application's load re-triggers the
endpoints of its namespace. Hysteresis lives in the weight tracker, so a steady load
rewrites neither the route nor the status.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from arks.adapters.kube import rest
from arks.adapters.kube.apply import patch_status, server_side_apply, set_owner
from arks.adapters.kube.conditions import find_condition, set_condition
from arks.adapters.kube.errors import PermanentError
from arks.adapters.kube.events import record_event
from arks.adapters.kube.queue import Key, WorkQueue
from arks.adapters.kube.rest import Obj
from arks.adapters.kube.runner import Controller, Leadership
from arks.adapters.kube.watch import Informer, watch_owned
from arks.api import STATIC
from arks.resources import APPLICATIONS, ENDPOINTS, HTTPROUTES, Resource
from arks.wire import FIELD_MANAGER, LABEL_ENDPOINT, LABEL_MANAGED_BY, MANAGED_BY, label_value
from controller.reconcilers.picking import Condition, sync_picking_policy
from controller.reconcilers.pruning import prune_owned
from controller.render.endpoint import DEFAULT_GATEWAY, render_httproute, route_status
from controller.render.route_acceptance import RouteAcceptance, route_acceptance

log = logging.getLogger(__name__)

ENDPOINT_API_VERSION = "arks.ai/v1"
ENDPOINT_KIND = "ArksEndpoint"

# The kinds an endpoint owns through its controller reference, pruned when no longer rendered
# (its EnvoyPatchPolicies live in another namespace: `controller.reconcilers.picking`).
ROUTE_KINDS: Mapping[str, Resource] = {"HTTPRoute": HTTPROUTES}


class LoadSource(Protocol):
    """Live engine load per application (`controller.load.cluster.ClusterLoad`)."""

    def capacity_of(self, namespace: str, application: str) -> int | None: ...

    def subscribe(self, listener: Callable[[set[tuple[str, str]]], None]) -> None: ...


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
    picking: Condition | None = None,
    route_accepted: Condition | None = None,
) -> None:
    current: Mapping[str, Any] = endpoint.get("status") or {}
    generation = endpoint["metadata"].get("generation")
    conditions = set_condition(current.get("conditions"), "Ready", *ready, generation, now)
    if route_accepted is not None:  # None: no route was applied, so the last word stands
        conditions = set_condition(conditions, "RouteAccepted", *route_accepted, generation, now)
    if picking is not None:
        conditions = set_condition(conditions, "Picking", *picking, generation, now)
    else:  # being deleted: no condition to speak of
        conditions = [c for c in conditions if c.get("type") != "Picking"]
    desired: dict[str, Any] = {**fields, "conditions": list(conditions)}
    if generation is not None:
        desired["observedGeneration"] = generation
    if all(current.get(k) == v for k, v in desired.items()):
        return
    meta = endpoint["metadata"]
    patch_status(api_client, ENDPOINTS, meta["namespace"], meta["name"], desired)
    before = find_condition(current.get("conditions"), "Ready")
    if before is None or (before["status"], before["reason"]) != ready[:2]:
        type_ = "Normal" if ready[0] == "True" else "Warning"
        try:  # best effort: a lost Event loses no state
            record_event(api_client, endpoint, type_, ready[1], ready[2], FIELD_MANAGER)
        except Exception:
            log.warning("could not record an Event for ArksEndpoint %s", meta["name"])


def reconcile_endpoint(
    api_client: ApiClient,
    key: Key,
    *,
    field_manager: str = FIELD_MANAGER,
    now: datetime.datetime | None = None,
    default_gateway: Mapping[str, str] = DEFAULT_GATEWAY,
    load: LoadSource | None = None,
) -> None:
    """Bring the HTTPRoute of ArksEndpoint `key` = (namespace, name) to the desired state.

    Raises the renderer's PermanentError for an endpoint that cannot be routed (after
    recording it in the Ready condition).
    """
    namespace, name = key
    endpoint = rest.get_or_none(api_client, ENDPOINTS, namespace, name)
    if endpoint is None:
        return
    if endpoint["metadata"].get("deletionTimestamp"):
        # The route goes with it through its owner reference; a picking policy, in the
        # Gateway's namespace, through the finalizer.
        sync_picking_policy(api_client, ENDPOINTS, endpoint, default_gateway, field_manager)
        return
    when = now or datetime.datetime.now(datetime.UTC)
    applications = _list(api_client, APPLICATIONS, namespace)
    capacities = _capacities(load, namespace, applications)

    try:
        route = render_httproute(endpoint, applications, default_gateway, capacities)
    except PermanentError as e:
        _write_status(api_client, endpoint, {}, ("False", "Unroutable", str(e)), when)
        raise
    live_route = server_side_apply(
        api_client, HTTPROUTES, set_owner(route, endpoint), field_manager
    )
    acceptance = route_acceptance(live_route, route["spec"]["parentRefs"][0])
    owner_label = (LABEL_ENDPOINT, label_value(name))
    for gone in prune_owned(api_client, endpoint, [route], ROUTE_KINDS, owner_label):
        message = f"deleted {gone}: no longer rendered"
        try:  # best effort: the deletion is done either way
            record_event(api_client, endpoint, "Normal", "Pruned", message, FIELD_MANAGER)
        except Exception:
            log.warning("could not record an Event for ArksEndpoint %s", name)
    picking = sync_picking_policy(api_client, ENDPOINTS, endpoint, default_gateway, field_manager)

    routes = route_status(route)
    live = [r for r in routes if int(r["weight"]) > 0]
    if live:
        message = f"HTTPRoute {name} over {len(live)} backends"
        if drained := _drained(endpoint, routes, capacities):
            message += f"; drained (failing their metrics scrapes): {', '.join(drained)}"
        ready = ("True", "BackendsRouted", message)
    elif routes:
        ready = ("False", "NoWeightedBackends", f"HTTPRoute {name}: every backend has weight 0")
    else:
        ready = ("False", "NoBackends", f"HTTPRoute {name} has no backends (requests get 500)")
    ready = _gateway_verdict(ready, acceptance)
    fields = {"routes": routes, "backends": len(live)}
    _write_status(api_client, endpoint, fields, ready, when, picking, acceptance.accepted)


def _gateway_verdict(ready: Condition, acceptance: RouteAcceptance) -> Condition:
    """Ready as the backends make it, unless the Gateway refused the route or some of its
    backends. Without word from the Gateway yet (Unknown), the backends' verdict stands."""
    status, _reason, message = acceptance.accepted
    if status == "False":
        return ("False", "RouteNotAccepted", f"{message}; no request reaches this endpoint")
    if ready[0] == "True" and acceptance.unresolved is not None:
        _, unresolved_reason, unresolved_message = acceptance.unresolved
        return ("False", unresolved_reason, f"{unresolved_message}; {ready[2]}")
    return ready


def _drained(
    endpoint: Mapping[str, Any], routes: list[dict[str, Any]], capacities: Mapping[str, int]
) -> list[str]:
    """The routed applications whose every pod failed its scrapes (for the Ready message)."""
    if (endpoint.get("spec") or {}).get("weighting") == STATIC:
        return []
    routed = {str(r["name"]) for r in routes if r.get("kind", "Service") == "Service"}
    return sorted(app for app, capacity in capacities.items() if capacity == 0 and app in routed)


def _capacities(load: LoadSource | None, namespace: str, applications: list[Obj]) -> dict[str, int]:
    if load is None:
        return {}
    names = {str(app["metadata"]["name"]) for app in applications}
    known = {name: load.capacity_of(namespace, name) for name in names}
    return {name: c for name, c in known.items() if c is not None}


def endpoint_controller(
    api_client: ApiClient,
    namespace: str | None = None,
    *,
    workers: int = 1,
    field_manager: str = FIELD_MANAGER,
    queue: WorkQueue | None = None,
    informer_options: Mapping[str, Any] | None = None,
    leader: Leadership | None = None,
    default_gateway: Mapping[str, str] = DEFAULT_GATEWAY,
    load: LoadSource | None = None,
) -> Controller:
    """A (not started) controller for ArksEndpoints and their HTTPRoutes.

    An edited or deleted HTTPRoute, or one whose status the Gateway's controller wrote,
    re-triggers its endpoint; any ArksApplication change
    re-triggers the endpoints of its namespace, since discovery may add or drop it (also
    when its served name changes away from an endpoint), and so does a changed live load of
    an application (`load`, started and stopped by the caller).
    """
    work = queue if queue is not None else WorkQueue()
    options = dict(informer_options or {})
    endpoints = Informer(api_client, ENDPOINTS, namespace, **options)
    # Only the routes the controller labels: its cache holds no one else's. Envoy Gateway's
    # status writes on them re-trigger the endpoint (its RouteAccepted condition).
    ours = {**options, "label_selector": f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_ENDPOINT}"}
    routes = watch_owned(
        api_client, HTTPROUTES, work, ENDPOINT_API_VERSION, ENDPOINT_KIND, namespace, **ours
    )
    applications = Informer(api_client, APPLICATIONS, namespace, **options)

    def enqueue_namespaces(namespaces: set[str]) -> None:
        for key in endpoints.keys():
            if key[0] in namespaces:
                work.add(key)

    def namespace_changed(_kind: str, app: Obj) -> None:
        enqueue_namespaces({str((app.get("metadata") or {}).get("namespace"))})

    applications.add_handler(namespace_changed)
    if load is not None:
        load.subscribe(lambda changed: enqueue_namespaces({ns for ns, _app in changed}))

    def reconcile(key: Key) -> None:
        reconcile_endpoint(
            api_client,
            key,
            field_manager=field_manager,
            default_gateway=default_gateway,
            load=load,
        )

    return Controller(
        "arksendpoint",
        endpoints,
        reconcile,
        workers,
        queue=work,
        owned=[routes, applications],
        leader=leader,
    )
