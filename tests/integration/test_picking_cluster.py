"""Engine discovery in a cluster against the Kubernetes API emulator, through the real client:
the engines of a least-load endpoint follow its HTTPRoute, Services and EndpointSlices as they
change, and what discovery asks of the API server is what the extproc's RBAC allows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from kubernetes.client import ApiClient

from controller.render.endpoint import render_httproute
from extproc.cluster_policy import ClusterPolicySource
from extproc.picking.discovery import ClusterEngines
from extproc.server import USER_AGENT
from tests.support.kube import FAST_INFORMERS, RunningKubeEmulator, eventually
from tests.support.objects import backend
from tests.support.rbac import allows, roles_of

pytestmark = pytest.mark.timeout(60)

APP = "qwen-vllm"  # an ArksApplication serving "qwen", behind the Service of that name
ENGINE_PORT = 8000


def application() -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksApplication",
        "metadata": {"name": APP},
        "spec": {
            "runtime": "vllm",
            "image": "img",
            "model": {"name": "qwen2-5-7b-instruct"},
            "servedModelName": "qwen",
        },
    }


def arks_endpoint(ns: str, model: str, *route_configs: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksEndpoint",
        "metadata": {"name": model, "namespace": ns},
        "spec": {"weighting": "least-load", "routeConfigs": list(route_configs)},
    }


MANAGED = {"app.kubernetes.io/managed-by": "arks"}  # as the controller renders it


def service(name: str, port: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": MANAGED},
        "spec": {
            "type": "ClusterIP",
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def endpoint(address: str, ready: bool = True) -> dict[str, Any]:
    return {
        "addresses": [address],
        "conditions": {"ready": ready, "serving": ready, "terminating": False},
    }


def endpoint_slice(name: str, service_name: str, *endpoints: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        # the EndpointSlice controller copies the Service's labels to its slices
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/service-name": service_name, **MANAGED},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": ENGINE_PORT, "protocol": "TCP"}],
        "endpoints": list(endpoints),
    }


def extproc_client(kube: RunningKubeEmulator) -> ApiClient:
    """A client whose requests the emulator's audit attributes to the extproc."""
    client = kube.api_client()
    client.user_agent = USER_AGENT
    return client


@pytest.fixture
def client(kube: RunningKubeEmulator) -> Iterator[ApiClient]:
    with extproc_client(kube) as api:
        yield api


@pytest.fixture
def source(client: ApiClient, ns: str) -> Iterator[ClusterPolicySource]:
    policy = ClusterPolicySource(client, ns)
    policy.start()
    yield policy
    policy.stop()


@pytest.fixture
def engines(client: ApiClient, ns: str) -> Iterator[ClusterEngines]:
    found = ClusterEngines(client, ns, informer_options=FAST_INFORMERS)
    found.start()
    yield found
    found.stop()


def test_the_engines_of_a_picking_endpoint_follow_its_route_services_and_slices(
    api: ApiClient, ns: str, source: ClusterPolicySource, engines: ClusterEngines
) -> None:
    core = kubernetes.client.CoreV1Api(api)
    discovery = kubernetes.client.DiscoveryV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    qwen = arks_endpoint(
        ns, "qwen", {"group": "gateway.envoyproxy.io", "kind": "Backend", "name": "sim"}
    )
    llama = arks_endpoint(ns, "llama")
    custom.create_namespaced_custom_object(
        "gateway.envoyproxy.io", "v1alpha1", ns, "backends", backend("sim", 9001, ns)
    )
    for obj in (qwen, llama):
        custom.create_namespaced_custom_object("arks.ai", "v1", ns, "arksendpoints", obj)
    route = render_httproute(qwen, [application()])
    (service_ref, _backend_ref) = route["spec"]["rules"][0]["backendRefs"]
    assert service_ref["name"] == APP
    custom.create_namespaced_custom_object(
        "gateway.networking.k8s.io", "v1", ns, "httproutes", route
    )
    # A route the controller did not render is not read, even if it names the model.
    unmanaged = render_httproute(
        arks_endpoint(ns, "llama", {"name": APP, "port": service_ref["port"]}), []
    )
    del unmanaged["metadata"]["labels"]
    custom.create_namespaced_custom_object(
        "gateway.networking.k8s.io", "v1", ns, "httproutes", unmanaged
    )
    core.create_namespaced_service(ns, service(APP, service_ref["port"]))
    discovery.create_namespaced_endpoint_slice(
        ns,
        endpoint_slice(
            f"{APP}-a",
            APP,
            endpoint("10.1.0.1"),
            endpoint("10.1.0.2"),
            endpoint("10.1.0.9", ready=False),
        ),
    )

    def engines_now() -> dict[tuple[str, str], list[str]]:
        return engines.picking_endpoints(source.current())

    def becomes(qwen_hosts: list[str]) -> None:
        wanted = {(ns, "qwen"): qwen_hosts, (ns, "llama"): []}
        eventually(lambda: engines_now() == wanted, timeout_s=5)

    becomes(["10.1.0.1:8000", "10.1.0.2:8000", "127.0.0.1:9001"])

    # an engine stops being ready
    discovery.patch_namespaced_endpoint_slice(
        f"{APP}-a", ns, {"endpoints": [endpoint("10.1.0.1"), endpoint("10.1.0.2", ready=False)]}
    )
    becomes(["10.1.0.1:8000", "127.0.0.1:9001"])

    # the Service gets a second slice
    discovery.create_namespaced_endpoint_slice(
        ns, endpoint_slice(f"{APP}-b", APP, endpoint("10.1.0.3"))
    )
    becomes(["10.1.0.1:8000", "10.1.0.3:8000", "127.0.0.1:9001"])

    # the application is drained: its backendRef's weight drops to 0
    drained = render_httproute(qwen, [application()], capacities={APP: 0})
    assert drained["spec"]["rules"][0]["backendRefs"][0]["weight"] == 0
    custom.patch_namespaced_custom_object(
        "gateway.networking.k8s.io", "v1", ns, "httproutes", "qwen", {"spec": drained["spec"]}
    )
    becomes(["127.0.0.1:9001"])
    custom.patch_namespaced_custom_object(
        "gateway.networking.k8s.io", "v1", ns, "httproutes", "qwen", {"spec": route["spec"]}
    )
    becomes(["10.1.0.1:8000", "10.1.0.3:8000", "127.0.0.1:9001"])

    # the Service goes away
    core.delete_namespaced_service(APP, ns)
    becomes(["127.0.0.1:9001"])


def test_what_engine_discovery_asks_of_the_api_server_its_rbac_allows(
    kube: RunningKubeEmulator,
) -> None:
    """Watches every namespace, as the extproc does by default."""
    with extproc_client(kube) as client:
        found = ClusterEngines(client, informer_options=FAST_INFORMERS)
        found.start()
        try:
            watched = {
                ("watch", "gateway.networking.k8s.io", "httproutes"),
                ("watch", "", "services"),
                ("watch", "discovery.k8s.io", "endpointslices"),
            }
            eventually(
                lambda: watched <= {e[1:4] for e in kube.emulator.audit if e[0] == USER_AGENT}
            )
        finally:
            found.stop()
    cluster, own_namespace = roles_of("arks-extproc")
    assert own_namespace == []
    asked = {entry[1:] for entry in kube.emulator.audit if entry[0] == USER_AGENT}
    assert {(verb, group, resource) for verb, group, resource, *_ in asked} >= {
        (verb, group, resource)
        for verb in ("list", "watch")
        for group, resource in (
            ("gateway.networking.k8s.io", "httproutes"),
            ("", "services"),
            ("discovery.k8s.io", "endpointslices"),
        )
    }
    refused = sorted(a for a in asked if not allows(cluster, a[0], a[1], a[2], a[4]))
    assert refused == []
