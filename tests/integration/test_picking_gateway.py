"""Endpoint picking as it runs behind Envoy Gateway, through real Envoy.

The cluster's side is the Kubernetes API emulator: an ArksApplication serving the model, its
Service and EndpointSlices (the engines' pods are three simulated engines on 127.0.0.1), an
ArksToken, and a least-load ArksEndpoint. The real controller reconciles the endpoint into its
HTTPRoute and EnvoyPatchPolicy. The test then plays Envoy Gateway: it builds the route's cluster
as EG would from the route's Services' EndpointSlices (`tests.support.envoy_gateway`), applies
the EnvoyPatchPolicy read back from the API server, and starts Envoy with the gateway's filter
chain in front of it. extproc runs as in the cluster (`--kube-host`): policy and engines both
come from the API server, nothing from a file.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes.client import ApiClient

from arks.adapters.kube import rest
from arks.api import token_digest
from arks.envoy_config import EnvoySettings, extproc_cluster, listener, retry_policy
from arks.resources import (
    APPLICATIONS,
    ENDPOINTS,
    ENDPOINTSLICES,
    HTTPROUTES,
    PATCH_POLICIES,
    SERVICES,
    TOKENS,
)
from controller.reconcilers.endpoint import reconcile_endpoint
from controller.render.picking import CLUSTER_TYPE, eg_route_cluster_name, picking_policy_name
from launcher.procs import Supervisor, free_port, wait_http
from launcher.stack import envoy_binary
from tests.support.envoy_gateway import apply_patches, eg_route_cluster
from tests.support.kube import RunningKubeEmulator
from tests.support.kube import get_object as get
from tests.support.objects import token
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

NS = "tenant"
MODEL = "least"
APP = "engines"
TOKEN = "sk-arks-picking-gateway-0001"
ENGINES = ("a", "b", "c")
ENGINE_PORT = 8000  # vLLM's: the application's Service port
SCRAPE_INTERVAL_S = 0.25
MANAGED = {"app.kubernetes.io/managed-by": "arks"}


def endpoint_slice(port: int, ready: bool = True) -> dict[str, Any]:
    """One slice per engine: each listens on its own port of 127.0.0.1 (a slice has one port list)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        # the EndpointSlice controller copies the Service's labels (managed-by) to its slices
        "metadata": {
            "name": f"{APP}-{port}",
            "labels": {"kubernetes.io/service-name": APP, **MANAGED},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready}}],
    }


def seed_cluster(api: ApiClient, ports: dict[str, int]) -> None:
    """What operators and Kubernetes would have made: the application (discovered by the
    endpoint), its Service and EndpointSlices, the token and the least-load endpoint."""
    app = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksApplication",
        "metadata": {"name": APP},
        "spec": {
            "runtime": "vllm",
            "image": "vllm/vllm-openai",
            "model": {"name": "m"},
            "servedModelName": MODEL,
        },
    }
    rest.request(api, "POST", APPLICATIONS.path(NS), body=app)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": APP, "labels": MANAGED},  # as the controller renders it
        "spec": {
            "ports": [
                {"name": "http", "port": ENGINE_PORT, "targetPort": "http", "protocol": "TCP"}
            ]
        },
    }
    rest.request(api, "POST", SERVICES.path(NS), body=service)
    for name in ENGINES:
        rest.request(api, "POST", ENDPOINTSLICES.path(NS), body=endpoint_slice(ports[name]))
    rest.request(
        api,
        "POST",
        TOKENS.path(NS),
        body=token("alice", [MODEL], namespace=NS, tokenHash=token_digest(TOKEN)),
    )
    endpoint = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksEndpoint",
        "metadata": {"name": MODEL},
        "spec": {"weighting": "least-load"},
    }
    rest.request(api, "POST", ENDPOINTS.path(NS), body=endpoint)


def envoy_gateway_config(
    api: ApiClient, settings: EnvoySettings, ports: dict[str, int]
) -> dict[str, Any]:
    """Envoy's configuration as Envoy Gateway would program it for this endpoint: the route to
    the HTTPRoute rule's cluster, the cluster over the Services' ready endpoints, and the
    controller's EnvoyPatchPolicy applied to it."""
    route = get(api, HTTPROUTES, NS, MODEL)
    assert route is not None
    [rule] = route["spec"]["rules"]
    assert [ref["name"] for ref in rule["backendRefs"]] == [APP]
    cluster_name = eg_route_cluster_name(NS, MODEL)
    hosts = [("127.0.0.1", ports[name]) for name in ENGINES]
    resources = {
        (CLUSTER_TYPE, cluster_name): eg_route_cluster(
            cluster_name, [hosts], [rule["backendRefs"][0]["weight"]]
        )
    }
    policy = get(api, PATCH_POLICIES, "arks-system", picking_policy_name(NS, MODEL))
    assert policy is not None
    apply_patches(resources, [policy])

    gateway = listener(settings)
    hcm = gateway["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["rds"]
    headers = [
        {"name": "x-arks-model", "string_match": {"exact": MODEL}},
        {"name": "x-arks-namespace", "string_match": {"exact": NS}},
    ]
    hcm["route_config"] = {
        "name": "eg",
        "virtual_hosts": [
            {
                "name": "eg",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/v1", "headers": headers},
                        "route": {
                            "cluster": cluster_name,
                            "timeout": "60s",
                            "retry_policy": retry_policy(),
                        },
                    },
                ],
            }
        ],
    }
    return {
        "admin": {
            "address": {
                "socket_address": {"address": "127.0.0.1", "port_value": settings.admin_port}
            }
        },
        "static_resources": {
            "listeners": [gateway],
            "clusters": [extproc_cluster(settings), *resources.values()],
        },
    }


@dataclass
class Gateway:
    api: ApiClient
    url: str
    ports: dict[str, int]
    metrics_url: str

    def loads(self, **waiting: int) -> None:
        for name in ENGINES:
            answer = httpx.put(
                f"http://127.0.0.1:{self.ports[name]}/sim/load",
                json={"waiting": waiting.get(name, 0)},
                timeout=5,
            )
            answer.raise_for_status()
        time.sleep(2.5 * SCRAPE_INTERVAL_S)  # two scrape rounds: extproc saw them all

    def ask(self, client: httpx.Client) -> str:
        answer = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert answer.status_code == 200, answer.text
        return answer.headers["x-sim-instance"]

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10
        )

    def served(self, requests: int = 30) -> collections.Counter[str]:
        with self.client() as client:
            return collections.Counter(self.ask(client) for _ in range(requests))

    def picks_move_to(self, name: str) -> None:
        with self.client() as client:
            wait_for(lambda: self.ask(client), lambda served: served == name, timeout=10)


@pytest.fixture(scope="module")
def gateway(
    kube: RunningKubeEmulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    tmp: Path = tmp_path_factory.mktemp("picking-gateway")
    ports = {name: free_port() for name in ENGINES}
    with kube.api_client() as api, Supervisor(log_dir=tmp / "logs") as sup:
        seed_cluster(api, ports)
        reconcile_endpoint(api, (NS, MODEL))  # the controller: HTTPRoute and EnvoyPatchPolicy
        for name in ENGINES:
            sim = sup.python(
                f"sim-{name}",
                "launcher.sim",
                "--port",
                str(ports[name]),
                "--model",
                MODEL,
                "--name",
                name,
            )
            wait_http(sim, f"http://127.0.0.1:{ports[name]}/health")
        settings = EnvoySettings(
            listen_port=free_port(), admin_port=free_port(), extproc_port=free_port()
        )
        metrics_port = free_port()
        extproc = sup.python(
            "extproc",
            "extproc",
            "--kube-host",
            kube.url,
            "--grpc-address",
            f"127.0.0.1:{settings.extproc_port}",
            "--metrics-port",
            str(metrics_port),
            "--picker-fail-closed",
            "--picker-interval-s",
            str(SCRAPE_INTERVAL_S),
        )
        wait_http(extproc, f"http://127.0.0.1:{metrics_port}/metrics")
        config = tmp / "envoy.json"
        config.write_text(json.dumps(envoy_gateway_config(api, settings, ports)))
        envoy = sup.start(
            "envoy",
            [
                envoy_binary(),
                "-c",
                str(config),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warning",
            ],
        )
        wait_http(envoy, f"http://127.0.0.1:{settings.admin_port}/ready")
        ready = Gateway(
            api,
            f"http://127.0.0.1:{settings.listen_port}",
            ports,
            f"http://127.0.0.1:{metrics_port}/metrics",
        )
        with (
            ready.client() as client
        ):  # fail closed: 503 until extproc knows the engines and their load
            wait_for(
                lambda: (
                    client.post(
                        "/v1/chat/completions",
                        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                    ).status_code
                ),
                lambda status: status == 200,
                timeout=20,
            )
        yield ready


def test_least_load_picks_the_least_loaded_pod_behind_envoy_gateways_cluster(
    gateway: Gateway,
) -> None:
    gateway.loads(a=40, b=0, c=90)
    gateway.picks_move_to("b")
    assert gateway.served() == {"b": 30}

    gateway.loads(a=40, b=200, c=90)
    gateway.picks_move_to("a")
    assert gateway.served() == {"a": 30}


def test_a_pod_that_turns_unready_is_no_longer_picked(gateway: Gateway) -> None:
    gateway.loads(a=40, b=0, c=90)
    gateway.picks_move_to("b")
    b = endpoint_slice(gateway.ports["b"], ready=False)
    rest.request(gateway.api, "PUT", ENDPOINTSLICES.path(NS, b["metadata"]["name"]), body=b)
    gateway.picks_move_to("a")  # b is still in Envoy's cluster here, but extproc no longer picks it
    assert gateway.served() == {"a": 30}

    b = endpoint_slice(gateway.ports["b"], ready=True)
    rest.request(gateway.api, "PUT", ENDPOINTSLICES.path(NS, b["metadata"]["name"]), body=b)
    gateway.picks_move_to("b")


def picks_so_far(gateway: Gateway) -> float:
    text = httpx.get(gateway.metrics_url, timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("arks_picks_total{")
    )


def test_a_stored_response_reaches_its_engine_on_an_endpoint_balanced_by_weight(
    gateway: Gateway,
) -> None:
    """Runs last: the endpoint stops picking. Its EnvoyPatchPolicy stays (the controller writes
    it for every endpoint), so `GET /v1/responses/{id}` still reaches the engine that holds
    the response through Envoy Gateway's cluster, though nothing picks per request any more."""
    gateway.loads()  # idle again
    rest.request(
        gateway.api,
        "PATCH",
        ENDPOINTS.path(NS, MODEL),
        body={"spec": {"weighting": "weighted"}},
        content_type=rest.MERGE_PATCH,
    )
    reconcile_endpoint(gateway.api, (NS, MODEL))
    assert get(gateway.api, PATCH_POLICIES, "arks-system", picking_policy_name(NS, MODEL))
    with gateway.client() as client:

        def picked_one() -> bool:
            before = picks_so_far(gateway)
            gateway.ask(client)
            return picks_so_far(gateway) > before

        wait_for(picked_one, lambda picked: not picked, timeout=20)  # extproc saw the change
        homes: dict[str, str] = {}
        for _ in range(6):
            answer = client.post("/v1/responses", json={"model": MODEL, "input": "hi"})
            assert answer.status_code == 200, answer.text
            homes[answer.json()["id"]] = answer.headers["x-sim-instance"]
        for response_id, home in homes.items():
            # The first may come before the gateway heard where the response was stored.
            wait_for(
                lambda rid=response_id: client.get(f"/v1/responses/{rid}"),
                lambda got, home=home: (
                    got.status_code == 200 and got.headers["x-sim-instance"] == home
                ),
                timeout=10,
            )
            for _ in range(3):
                got = client.get(f"/v1/responses/{response_id}")
                assert got.status_code == 200, got.text
                assert got.headers["x-sim-instance"] == home
