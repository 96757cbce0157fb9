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
from tests.support.kube import FAST_INFORMERS, eventually
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
