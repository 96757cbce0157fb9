"""The ArksEndpoint reconciler against the Kubernetes API emulator, through the real client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from kubernetes.client import ApiClient

from arks.adapters.kube import rest
from arks.adapters.kube.conditions import find_condition
from arks.resources import APPLICATIONS, ENDPOINTS, EVENTS, HTTPROUTES
from controller.reconcilers.endpoint import endpoint_controller, reconcile_endpoint
from tests.support.kube import FAST_INFORMERS, eventually, set_status
from tests.support.kube import get_object as get

pytestmark = pytest.mark.timeout(60)

SERVED = "qwen-7b"


def create_app(api: ApiClient, ns: str, name: str, runtime: str, gpu: str) -> dict[str, Any]:
    body = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksApplication",
        "metadata": {"name": name},
        "spec": {
            "runtime": runtime,
            "image": "engine:latest",
            "model": {"name": "qwen2-5-7b-instruct"},
            "servedModelName": SERVED,
            "instanceSpec": {"nodeSelector": {"nvidia.com/gpu.product": gpu}},
        },
    }
    return rest.request(api, "POST", APPLICATIONS.path(ns), body=body)


def create_endpoint(api: ApiClient, ns: str, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksEndpoint",
        "metadata": {"name": SERVED},
        "spec": {"gatewayRef": {"name": "arks-gateway"}, "defaultWeight": 5, **spec},
    }
    return rest.request(api, "POST", ENDPOINTS.path(ns), body=body)


def endpoint_status(api: ApiClient, ns: str) -> dict[str, Any]:
    endpoint = get(api, ENDPOINTS, ns, SERVED)
    assert endpoint is not None
    return dict(endpoint.get("status") or {})


def test_two_apps_become_two_owned_backends_with_status(api: ApiClient, ns: str) -> None:
    create_app(api, ns, "qwen-l40s", "vllm", "NVIDIA-L40S")
    create_app(api, ns, "qwen-h100", "sglang", "NVIDIA-H100")
    endpoint = create_endpoint(api, ns, routeConfigs=[{"name": "spill", "port": 80}])
    reconcile_endpoint(api, (ns, SERVED))

    route = get(api, HTTPROUTES, ns, SERVED)
    assert route is not None
    (ref,) = route["metadata"]["ownerReferences"]
    assert ref["uid"] == endpoint["metadata"]["uid"] and ref["controller"] is True
    assert route["spec"]["parentRefs"] == [{"name": "arks-gateway"}]
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {"kind": "Service", "name": "qwen-h100", "port": 30000, "weight": 5},
        {"kind": "Service", "name": "qwen-l40s", "port": 8000, "weight": 5},
        {"kind": "Service", "name": "spill", "port": 80, "weight": 1},
    ]
    assert {"type": "Exact", "name": "x-arks-model", "value": SERVED} in (
        rule["matches"][0]["headers"]
    )

    status = endpoint_status(api, ns)
    assert [(r["name"], r["weight"]) for r in status["routes"]] == [
        ("qwen-h100", 5),
        ("qwen-l40s", 5),
        ("spill", 1),
    ]
    assert status["backends"] == 3
    assert status["observedGeneration"] == endpoint["metadata"]["generation"]
    ready = find_condition(status["conditions"], "Ready")
    assert ready is not None and ready["status"] == "True"


def test_reconciling_twice_changes_nothing(api: ApiClient, ns: str) -> None:
    create_app(api, ns, "qwen-l40s", "vllm", "NVIDIA-L40S")
    create_app(api, ns, "qwen-h100", "sglang", "NVIDIA-H100")
    create_endpoint(api, ns)
    reconcile_endpoint(api, (ns, SERVED))

    def versions() -> list[str]:
        objs = [get(api, HTTPROUTES, ns, SERVED), get(api, ENDPOINTS, ns, SERVED)]
        return [str(o["metadata"]["resourceVersion"]) for o in objs if o is not None]

    before = versions()
    reconcile_endpoint(api, (ns, SERVED))
    assert len(before) == 2
    assert versions() == before


def test_a_new_app_joins_and_a_route_without_backends_is_not_ready(api: ApiClient, ns: str) -> None:
    create_endpoint(api, ns)
    reconcile_endpoint(api, (ns, SERVED))
    route = get(api, HTTPROUTES, ns, SERVED)
    assert route is not None and "backendRefs" not in route["spec"]["rules"][0]
    status = endpoint_status(api, ns)
    assert (status["routes"], status["backends"]) == ([], 0)
    ready = find_condition(status["conditions"], "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "NoBackends")

    create_app(api, ns, "qwen-l40s", "vllm", "NVIDIA-L40S")
    reconcile_endpoint(api, (ns, SERVED))
    route = get(api, HTTPROUTES, ns, SERVED)
    assert route is not None
    assert [r["name"] for r in route["spec"]["rules"][0]["backendRefs"]] == ["qwen-l40s"]
    assert endpoint_status(api, ns)["backends"] == 1


def test_deleting_the_endpoint_cascades_to_the_route(api: ApiClient, ns: str) -> None:
    create_app(api, ns, "qwen-l40s", "vllm", "NVIDIA-L40S")
    create_endpoint(api, ns)
    reconcile_endpoint(api, (ns, SERVED))
    assert get(api, HTTPROUTES, ns, SERVED) is not None
    rest.request(api, "DELETE", ENDPOINTS.path(ns, SERVED))
    reconcile_endpoint(api, (ns, SERVED))  # its EnvoyPatchPolicy goes, then its finalizer
    eventually(lambda: get(api, HTTPROUTES, ns, SERVED) is None)
    reconcile_endpoint(api, (ns, SERVED))  # a gone endpoint is nothing to do
    assert get(api, HTTPROUTES, ns, SERVED) is None


def test_the_running_controller_follows_applications_and_repairs_its_route(
    api: ApiClient, ns: str
) -> None:
    controller = endpoint_controller(api, ns, informer_options=FAST_INFORMERS)
    controller.start()
    try:
        create_endpoint(api, ns)
        route = eventually(lambda: get(api, HTTPROUTES, ns, SERVED))
        assert "backendRefs" not in route["spec"]["rules"][0]

        create_app(api, ns, "qwen-l40s", "vllm", "NVIDIA-L40S")  # discovered without a poke
        eventually(lambda: endpoint_status(api, ns).get("backends") == 1)

        rest.request(api, "DELETE", HTTPROUTES.path(ns, SERVED))  # repaired
        route = eventually(lambda: get(api, HTTPROUTES, ns, SERVED))
        assert [r["name"] for r in route["spec"]["rules"][0]["backendRefs"]] == ["qwen-l40s"]

        rest.request(api, "DELETE", APPLICATIONS.path(ns, "qwen-l40s"))  # and dropped
        eventually(lambda: endpoint_status(api, ns).get("backends") == 0)
        events = rest.request(api, "GET", EVENTS.path(ns))["items"]
        seen = [(e["type"], e["reason"]) for e in events if e["involvedObject"]["name"] == SERVED]
        assert ("Normal", "BackendsRouted") in seen and ("Warning", "NoBackends") in seen
    finally:
        controller.stop()


class FixedLoad:
    """A `LoadSource` whose capacities the test sets, telling listeners like ClusterLoad does."""

    def __init__(self, capacities: dict[tuple[str, str], int] | None = None) -> None:
        self.capacities = dict(capacities or {})
        self.listeners: list[Callable[[set[tuple[str, str]]], None]] = []

    def capacity_of(self, namespace: str, application: str) -> int | None:
        return self.capacities.get((namespace, application))

    def subscribe(self, listener: Callable[[set[tuple[str, str]]], None]) -> None:
        self.listeners.append(listener)

    def set(self, namespace: str, application: str, capacity: int) -> None:
        self.capacities[(namespace, application)] = capacity
        for listener in self.listeners:
            listener({(namespace, application)})


def test_live_load_weighs_the_route_and_status_and_a_second_pass_writes_nothing(
    api: ApiClient, ns: str
) -> None:
    create_app(api, ns, "qwen-l40s", "vllm", "NVIDIA-L40S")
    create_app(api, ns, "qwen-h100", "sglang", "NVIDIA-H100")
    create_endpoint(api, ns, defaultWeight=10, routeConfigs=[{"name": "spill", "port": 80}])
    # Two free H100 pods; one L40S pod, a third free. Same-named apps elsewhere do not count.
    load = FixedLoad({(ns, "qwen-h100"): 200, (ns, "qwen-l40s"): 33, ("other", "qwen-l40s"): 0})
    reconcile_endpoint(api, (ns, SERVED), load=load)

    def versions() -> list[str]:
        objs = [get(api, HTTPROUTES, ns, SERVED), get(api, ENDPOINTS, ns, SERVED)]
        return [str(o["metadata"]["resourceVersion"]) for o in objs if o is not None]

    route = get(api, HTTPROUTES, ns, SERVED)
    assert route is not None
    assert [(r["name"], r["weight"]) for r in route["spec"]["rules"][0]["backendRefs"]] == [
        ("qwen-h100", 20),
        ("qwen-l40s", 3),
        ("spill", 1),
    ]
    status = endpoint_status(api, ns)
    assert [(r["name"], r["weight"], r["share"]) for r in status["routes"]] == [
        ("qwen-h100", 20, 83),
        ("qwen-l40s", 3, 12),
        ("spill", 1, 4),
    ]
    before = versions()
    reconcile_endpoint(api, (ns, SERVED), load=load)
    assert len(before) == 2 and versions() == before

    load.capacities[(ns, "qwen-l40s")] = 0  # drained: no traffic, and the status says why
    reconcile_endpoint(api, (ns, SERVED), load=load)
    status = endpoint_status(api, ns)
    assert [(r["name"], r["weight"]) for r in status["routes"]] == [
        ("qwen-h100", 20),
        ("qwen-l40s", 0),
        ("spill", 1),
    ]
    ready = find_condition(status["conditions"], "Ready")
    assert ready is not None and ready["status"] == "True"
    assert ready["message"].endswith("drained (failing their metrics scrapes): qwen-l40s")


def test_a_load_change_retriggers_the_endpoints_of_its_namespace(api: ApiClient, ns: str) -> None:
    load = FixedLoad()
    controller = endpoint_controller(api, ns, informer_options=FAST_INFORMERS, load=load)
    controller.start()
    try:
        create_app(api, ns, "qwen-l40s", "vllm", "NVIDIA-L40S")
        create_endpoint(api, ns)
        eventually(lambda: endpoint_status(api, ns).get("backends") == 1)
        assert endpoint_status(api, ns)["routes"][0]["weight"] == 5  # no load known: defaultWeight

        load.set(ns, "qwen-l40s", 40)
        eventually(lambda: endpoint_status(api, ns)["routes"][0]["weight"] == 2)
        load.set(ns, "qwen-l40s", 0)  # the only backend drained: fail open to defaultWeight
        eventually(lambda: "drained" in str(endpoint_status(api, ns)["conditions"]))
        assert endpoint_status(api, ns)["routes"][0]["weight"] == 5
    finally:
        controller.stop()


def _route(name: str, owner: dict[str, Any] | None) -> dict[str, Any]:
    """An HTTPRoute labelled as the endpoint's, controlled by `owner` (or by nobody)."""
    meta: dict[str, Any] = {
        "name": name,
        "labels": {"app.kubernetes.io/managed-by": "arks", "arks.ai/endpoint": SERVED},
    }
    if owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": "arks.ai/v1",
                "kind": "ArksEndpoint",
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "controller": True,
            }
        ]
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": meta,
        "spec": {"parentRefs": [{"name": "arks-gateway"}], "rules": [{}]},
    }


def test_a_route_the_endpoint_no_longer_renders_is_deleted_and_others_are_kept(
    api: ApiClient, ns: str
) -> None:
    """A route of the endpoint under another name (what a render that names its route
    differently leaves behind) keeps routing the public name: it is pruned. A look-alike the
    endpoint does not control (a user's) stays."""
    endpoint = create_endpoint(api, ns)
    rest.request(api, "POST", HTTPROUTES.path(ns), body=_route("qwen-7b-old", endpoint))
    rest.request(api, "POST", HTTPROUTES.path(ns), body=_route("users-own", None))

    reconcile_endpoint(api, (ns, SERVED))

    assert get(api, HTTPROUTES, ns, SERVED) is not None
    assert get(api, HTTPROUTES, ns, "qwen-7b-old") is None
    assert get(api, HTTPROUTES, ns, "users-own") is not None
    events = rest.request(api, "GET", EVENTS.path(ns))["items"]
    assert [e["message"] for e in events if e["reason"] == "Pruned"] == [
        "deleted HTTPRoute/qwen-7b-old: no longer rendered"
    ]


# --- the Gateway's word on the route (HTTPRoute status.parents) --------------------------------

ENVOY_GATEWAY = "gateway.envoyproxy.io/gatewayclass-controller"
NOT_ALLOWED = (
    "False",
    "NotAllowedByListeners",
    "No listeners included by this parent ref allowed this attachment.",
)  # Envoy Gateway's own words (internal/gatewayapi/route.go)


RESOLVED = ("True", "ResolvedRefs", "Resolved all the Object references for the Route")


def play_envoy_gateway(
    api: ApiClient,
    ns: str,
    accepted: tuple[str, str, str],
    controller: str = ENVOY_GATEWAY,
    others: list[dict[str, Any]] | None = None,
    resolved: tuple[str, str, str] = RESOLVED,
) -> None:
    """Write the route's status as Envoy Gateway does: one RouteParentStatus per parentRef."""
    route = get(api, HTTPROUTES, ns, SERVED)
    assert route is not None
    status, reason, message = accepted
    resolved_status, resolved_reason, resolved_message = resolved
    conditions = [
        {"type": "Accepted", "status": status, "reason": reason, "message": message,
         "observedGeneration": route["metadata"]["generation"],
         "lastTransitionTime": "2026-12-05T00:00:00Z"},
        {"type": "ResolvedRefs", "status": resolved_status, "reason": resolved_reason,
         "message": resolved_message,
         "observedGeneration": route["metadata"]["generation"],
         "lastTransitionTime": "2026-12-05T00:00:00Z"},
    ]  # fmt: skip
    (parent,) = route["spec"]["parentRefs"]
    entry = {"parentRef": parent, "controllerName": controller, "conditions": conditions}
    set_status(api, HTTPROUTES, ns, SERVED, parents=[*(others or []), entry])


def conditions_of(api: ApiClient, ns: str) -> dict[str, tuple[str, str, str]]:
    return {
        c["type"]: (c["status"], c["reason"], c["message"])
        for c in endpoint_status(api, ns).get("conditions") or []
    }


def test_the_gateways_refusal_of_the_route_is_the_endpoints_status(api: ApiClient, ns: str) -> None:
    create_app(api, ns, "qwen-l40s", "vllm", "NVIDIA-L40S")
    create_endpoint(api, ns)
    reconcile_endpoint(api, (ns, SERVED))
    conditions = conditions_of(api, ns)
    assert conditions["RouteAccepted"][:2] == ("Unknown", "Pending")  # no word yet: not False
    assert conditions["Ready"][:2] == ("True", "BackendsRouted")

    play_envoy_gateway(api, ns, NOT_ALLOWED)
    reconcile_endpoint(api, (ns, SERVED))
    conditions = conditions_of(api, ns)
    status, reason, message = conditions["RouteAccepted"]
    assert (status, reason) == ("False", "NotAllowedByListeners")
    assert f"namespace {ns} labelled arks.ai/tenant=true" in message
    assert conditions["Ready"][:2] == ("False", "RouteNotAccepted")
    events = rest.request(api, "GET", EVENTS.path(ns))["items"]
    assert ("Warning", "RouteNotAccepted") in [(e["type"], e["reason"]) for e in events]

    play_envoy_gateway(api, ns, ("True", "Accepted", "Route is accepted"))  # labelled now
    reconcile_endpoint(api, (ns, SERVED))
    conditions = conditions_of(api, ns)
    assert conditions["RouteAccepted"][:2] == ("True", "Accepted")
    assert conditions["Ready"][:2] == ("True", "BackendsRouted")


def test_only_envoy_gateways_entry_for_our_gateway_counts(api: ApiClient, ns: str) -> None:
    create_app(api, ns, "qwen-l40s", "vllm", "NVIDIA-L40S")
    create_endpoint(api, ns)
    reconcile_endpoint(api, (ns, SERVED))
    play_envoy_gateway(api, ns, NOT_ALLOWED, controller="example.net/other-controller")
    reconcile_endpoint(api, (ns, SERVED))
    assert conditions_of(api, ns)["RouteAccepted"][:2] == ("Unknown", "Pending")
    assert conditions_of(api, ns)["Ready"][0] == "True"

    # Envoy Gateway accepted it for our Gateway; another Gateway's refusal is not ours.
    elsewhere = {
        "parentRef": {"name": "other-gateway", "namespace": "arks-system"},
        "controllerName": ENVOY_GATEWAY,
        "conditions": [{"type": "Accepted", "status": "False", "reason": "NotAllowedByListeners",
                        "message": "no", "lastTransitionTime": "2026-12-05T00:00:00Z"}],
    }  # fmt: skip
    play_envoy_gateway(api, ns, ("True", "Accepted", "Route is accepted"), others=[elsewhere])
    reconcile_endpoint(api, (ns, SERVED))
    assert conditions_of(api, ns)["RouteAccepted"][:2] == ("True", "Accepted")


def test_the_running_controller_follows_the_gateways_word_on_its_route(
    api: ApiClient, ns: str
) -> None:
    controller = endpoint_controller(api, ns, informer_options=FAST_INFORMERS)
    controller.start()
    try:
        create_app(api, ns, "qwen-l40s", "vllm", "NVIDIA-L40S")
        create_endpoint(api, ns)
        eventually(lambda: conditions_of(api, ns).get("RouteAccepted", ("",))[0] == "Unknown")

        play_envoy_gateway(api, ns, NOT_ALLOWED)  # nothing else changes: the route's watch
        eventually(lambda: conditions_of(api, ns)["Ready"][1] == "RouteNotAccepted")
        assert conditions_of(api, ns)["RouteAccepted"][1] == "NotAllowedByListeners"

        play_envoy_gateway(api, ns, ("True", "Accepted", "Route is accepted"))
        eventually(lambda: conditions_of(api, ns)["Ready"][0] == "True")
        assert conditions_of(api, ns)["RouteAccepted"][0] == "True"
    finally:
        controller.stop()


def test_an_accepted_route_with_a_backend_the_gateway_cannot_find_is_not_ready(
    api: ApiClient, ns: str
) -> None:
    create_app(api, ns, "qwen-l40s", "vllm", "NVIDIA-L40S")
    create_endpoint(api, ns, routeConfigs=[{"name": "spill", "port": 80}])
    reconcile_endpoint(api, (ns, SERVED))
    missing = ("False", "BackendNotFound", f"Failed to process route rule 0 backendRef 2: service {ns}/spill not found.")  # fmt: skip
    play_envoy_gateway(api, ns, ("True", "Accepted", "Route is accepted"), resolved=missing)
    reconcile_endpoint(api, (ns, SERVED))
    conditions = conditions_of(api, ns)
    assert conditions["RouteAccepted"][0] == "True"
    status, reason, message = conditions["Ready"]
    assert (status, reason) == ("False", "BackendNotFound")
    assert f"service {ns}/spill not found" in message and "over 2 backends" in message
