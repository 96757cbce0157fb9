"""Engine discovery in a cluster, pure: from HTTPRoutes as the controller renders them, Services
and EndpointSlices to the hosts Envoy Gateway puts in each picking endpoint's cluster."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from arks.api import LEAST_LOAD, PREFIX_CACHE, STATIC
from arks.policy import Policy, build_policy
from controller.render.endpoint import render_httproute
from extproc.picking.discovery import (
    ClusterView,
    parse_route,
    parse_service,
    parse_slice,
    picking_endpoints,
    routable,
)
from tests.support.objects import backend

KEY = ("default", "qwen")
Obj = dict[str, Any]


def arks_endpoint(
    model: str,
    *route_configs: dict[str, Any],
    namespace: str = "default",
    weighting: str = LEAST_LOAD,
) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksEndpoint",
        "metadata": {"name": model, "namespace": namespace},
        "spec": {"weighting": weighting, "routeConfigs": list(route_configs)},
    }


def svc_ref(name: str, port: int = 80, **extra: Any) -> dict[str, Any]:
    return {"name": name, "port": port, **extra}


def backend_ref(name: str, **extra: Any) -> dict[str, Any]:
    return {"group": "gateway.envoyproxy.io", "kind": "Backend", "name": name, **extra}


def policy(*objects: dict[str, Any]) -> Policy:
    return build_policy([(f"document {i}", o) for i, o in enumerate(objects)])


def service(name: str, *ports: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP",
            "ports": list(ports or [{"name": "http", "port": 80, "protocol": "TCP"}]),
        },
    }


def endpoint_slice(
    name: str,
    service_name: str,
    *endpoints: dict[str, Any],
    ports: list[dict[str, Any]] | None = None,
    namespace: str = "default",
    address_type: str = "IPv4",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": address_type,
        "ports": ports
        if ports is not None
        else [{"name": "http", "port": 8000, "protocol": "TCP"}],
        "endpoints": list(endpoints),
    }


def ready(*addresses: str) -> dict[str, Any]:
    return {
        "addresses": list(addresses),
        "conditions": {"ready": True, "serving": True, "terminating": False},
    }


def not_ready(*addresses: str) -> dict[str, Any]:
    return {
        "addresses": list(addresses),
        "conditions": {"ready": False, "serving": False, "terminating": False},
    }


def view(
    routes: Sequence[Obj] = (), services: Sequence[Obj] = (), slices: Sequence[Obj] = ()
) -> ClusterView:
    return ClusterView.build(
        map(parse_route, routes), map(parse_service, services), map(parse_slice, slices)
    )


def hosts(endpoint: dict[str, Any], *objects: dict[str, Any], route: bool = True) -> list[str]:
    """The engines of `endpoint` given the cluster `objects` (and Backends), its route rendered
    by the controller unless `route` is False."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    routes = [render_httproute(endpoint, [])] if route else []
    cluster = view(routes, by_kind.get("Service", []), by_kind.get("EndpointSlice", []))
    found = picking_endpoints(policy(endpoint, *by_kind.get("Backend", [])), cluster)
    return found[(endpoint["metadata"]["namespace"], endpoint["metadata"]["name"])]


def test_the_service_port_maps_to_the_slice_port_of_the_same_name() -> None:
    svc = service("qwen", {"name": "metrics", "port": 9000}, {"name": "http", "port": 80})
    ports = [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8000}]
    qwen = arks_endpoint("qwen", svc_ref("qwen", 80))

    assert hosts(qwen, svc, endpoint_slice("qwen-1", "qwen", ready("10.0.0.1"), ports=ports)) == [
        "10.0.0.1:8000"
    ]
    metrics = arks_endpoint("qwen", svc_ref("qwen", 9000))
    assert hosts(
        metrics, svc, endpoint_slice("qwen-1", "qwen", ready("10.0.0.1"), ports=ports)
    ) == ["10.0.0.1:9090"]


def test_a_single_unnamed_port() -> None:
    svc = service("qwen", {"port": 80})
    slice_ = endpoint_slice("qwen-1", "qwen", ready("10.0.0.1", "10.0.0.2"), ports=[{"port": 8080}])
    assert hosts(arks_endpoint("qwen", svc_ref("qwen", 80)), svc, slice_) == [
        "10.0.0.1:8080",
        "10.0.0.2:8080",
    ]


def test_a_ref_to_a_port_the_service_lacks_or_a_missing_service_gives_nothing() -> None:
    slice_ = endpoint_slice("qwen-1", "qwen", ready("10.0.0.1"))
    assert hosts(arks_endpoint("qwen", svc_ref("qwen", 81)), service("qwen"), slice_) == []
    assert hosts(arks_endpoint("qwen", svc_ref("qwen", 80)), slice_) == []


def test_the_protocol_must_match_too() -> None:
    svc = service("qwen", {"name": "http", "port": 80, "protocol": "UDP"})
    slice_ = endpoint_slice("qwen-1", "qwen", ready("10.0.0.1"))  # http/TCP
    assert hosts(arks_endpoint("qwen", svc_ref("qwen", 80)), svc, slice_) == []


def test_endpoints_not_ready_or_terminating_are_left_out() -> None:
    terminating = {
        "addresses": ["10.0.0.3"],
        "conditions": {"ready": False, "serving": True, "terminating": True},
    }
    slice_ = endpoint_slice("qwen-1", "qwen", ready("10.0.0.1"), not_ready("10.0.0.2"), terminating)
    assert hosts(arks_endpoint("qwen", svc_ref("qwen")), service("qwen"), slice_) == [
        "10.0.0.1:8000"
    ]


def test_readiness_follows_the_endpointslice_api() -> None:
    assert routable(None) and routable({})  # unknown counts as ready
    assert routable({"ready": True}) and not routable({"ready": False})
    assert not routable({"terminating": True})  # unknown readiness while terminating: not ready
    assert routable({"ready": True, "terminating": True})  # publishNotReadyAddresses overrides
    # serving and terminating, when both set, decide (Envoy Gateway drains the others)
    assert routable({"ready": False, "serving": True, "terminating": False})
    assert not routable({"ready": True, "serving": True, "terminating": True})
    assert not routable({"serving": False, "terminating": False})


def test_an_endpoint_without_conditions_counts_as_ready() -> None:
    slice_ = endpoint_slice(
        "qwen-1", "qwen", {"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"], "conditions": {}}
    )
    assert hosts(arks_endpoint("qwen", svc_ref("qwen")), service("qwen"), slice_) == [
        "10.0.0.1:8000",
        "10.0.0.2:8000",
    ]


def test_backend_refs_of_weight_0_are_left_out() -> None:
    qwen = arks_endpoint("qwen", svc_ref("a", weight=0), svc_ref("b"))
    objects = (
        service("a"),
        service("b"),
        endpoint_slice("a-1", "a", ready("10.0.0.1")),
        endpoint_slice("b-1", "b", ready("10.0.0.2")),
    )
    assert hosts(qwen, *objects) == ["10.0.0.2:8000"]


def test_a_ref_to_another_namespace_uses_that_namespaces_service_and_slices() -> None:
    qwen = arks_endpoint("qwen", svc_ref("shared", namespace="engines"))
    objects = (
        service("shared", namespace="engines"),
        endpoint_slice("shared-1", "shared", ready("10.0.1.1"), namespace="engines"),
        service("shared"),  # same name in the route's namespace: not the one referred to
        endpoint_slice("shared-1", "shared", ready("10.0.0.1")),
    )
    assert hosts(qwen, *objects) == ["10.0.1.1:8000"]


def test_backend_refs_give_the_backends_endpoints_from_the_policy() -> None:
    qwen = arks_endpoint(
        "qwen", backend_ref("sim-a"), backend_ref("sim-b", weight=0), svc_ref("qwen")
    )
    objects = (
        backend("sim-a", 9001),
        backend("sim-b", 9002),
        service("qwen"),
        endpoint_slice("qwen-1", "qwen", ready("10.0.0.1")),
    )
    assert hosts(qwen, *objects) == [
        "10.0.0.1:8000",
        "127.0.0.1:9001",
    ]  # the route sorts Backends after Services


def test_ipv6_addresses_are_bracketed() -> None:
    slice_ = endpoint_slice("qwen-1", "qwen", ready("fd00::1"), address_type="IPv6")
    assert hosts(arks_endpoint("qwen", svc_ref("qwen")), service("qwen"), slice_) == [
        "[fd00::1]:8000"
    ]


def test_fqdn_slices_give_no_hosts() -> None:
    slice_ = endpoint_slice("qwen-1", "qwen", ready("engine.example.com"), address_type="FQDN")
    assert hosts(arks_endpoint("qwen", svc_ref("qwen")), service("qwen"), slice_) == []


def test_every_slice_of_a_service_counts_each_with_its_own_ports() -> None:
    # mid-rollout: the new pods listen on another port
    old = endpoint_slice("qwen-a", "qwen", ready("10.0.0.1"), ready("10.0.0.2"))
    new = endpoint_slice(
        "qwen-b", "qwen", ready("10.0.0.3"), ports=[{"name": "http", "port": 8001}]
    )
    other = endpoint_slice("llama-a", "llama", ready("10.0.0.9"))
    assert hosts(arks_endpoint("qwen", svc_ref("qwen")), service("qwen"), new, old, other) == [
        "10.0.0.1:8000",
        "10.0.0.2:8000",
        "10.0.0.3:8001",
    ]


def test_hosts_are_deduplicated_in_a_stable_order() -> None:
    qwen = arks_endpoint("qwen", svc_ref("qwen"), svc_ref("qwen-canary"))
    objects = (
        service("qwen"),
        service("qwen-canary"),
        endpoint_slice("qwen-1", "qwen", ready("10.0.0.2", "10.0.0.1")),
        endpoint_slice("canary-1", "qwen-canary", ready("10.0.0.1", "10.0.0.3")),
    )
    assert hosts(qwen, *objects) == ["10.0.0.2:8000", "10.0.0.1:8000", "10.0.0.3:8000"]


def test_without_its_route_an_endpoint_keeps_its_own_backends_but_no_services() -> None:
    qwen = arks_endpoint("qwen", backend_ref("sim-a"), svc_ref("qwen"))
    objects = (
        backend("sim-a", 9001),
        service("qwen"),
        endpoint_slice("qwen-1", "qwen", ready("10.0.0.1")),
    )
    assert hosts(qwen, *objects, route=False) == ["127.0.0.1:9001"]
    assert hosts(arks_endpoint("qwen", svc_ref("qwen")), *objects, route=False) == []


def test_the_route_is_found_by_its_served_model_name() -> None:
    route = render_httproute(arks_endpoint("qwen", svc_ref("qwen")), [])
    route["metadata"]["name"] = "qwen-route"
    decoy = render_httproute(arks_endpoint("qwen", svc_ref("llama")), [])
    decoy["metadata"]["annotations"]["arks.ai/served-model-name"] = (
        "llama"  # named qwen, serves llama
    )
    objects = [service("qwen"), service("llama")]
    slices = [
        endpoint_slice("qwen-1", "qwen", ready("10.0.0.1")),
        endpoint_slice("llama-1", "llama", ready("10.0.0.9")),
    ]
    cluster = view([decoy, route], objects, slices)
    assert picking_endpoints(policy(arks_endpoint("qwen")), cluster) == {KEY: ["10.0.0.1:8000"]}

    unannotated = render_httproute(arks_endpoint("qwen", svc_ref("qwen")), [])
    del unannotated["metadata"]["annotations"]
    cluster = view([unannotated], objects, slices)
    assert picking_endpoints(policy(arks_endpoint("qwen")), cluster) == {KEY: ["10.0.0.1:8000"]}


def test_routes_are_matched_in_the_endpoints_namespace() -> None:
    theirs = render_httproute(arks_endpoint("qwen", svc_ref("qwen"), namespace="team-b"), [])
    cluster = view(
        [theirs],
        [service("qwen", namespace="team-b")],
        [endpoint_slice("qwen-1", "qwen", ready("10.0.0.1"), namespace="team-b")],
    )
    found = picking_endpoints(
        policy(arks_endpoint("qwen"), arks_endpoint("qwen", namespace="team-b")), cluster
    )
    assert found == {KEY: [], ("team-b", "qwen"): ["10.0.0.1:8000"]}


def test_only_endpoints_that_pick_per_request_are_listed() -> None:
    objects = [service("qwen")]
    slices = [endpoint_slice("qwen-1", "qwen", ready("10.0.0.1"))]
    endpoints = [
        arks_endpoint("least", svc_ref("qwen"), weighting=LEAST_LOAD),
        arks_endpoint("prefix", svc_ref("qwen"), weighting=PREFIX_CACHE),
        arks_endpoint("static", svc_ref("qwen"), weighting=STATIC),
        {**arks_endpoint("weighted", svc_ref("qwen")), "spec": {"routeConfigs": [svc_ref("qwen")]}},
    ]
    cluster = view([render_httproute(e, []) for e in endpoints], objects, slices)
    assert picking_endpoints(policy(*endpoints), cluster) == {
        ("default", "least"): ["10.0.0.1:8000"],
        ("default", "prefix"): ["10.0.0.1:8000"],
    }
