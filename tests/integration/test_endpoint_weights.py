"""ArksEndpoint weights from live engine load, in a cluster: real simulated engines behind
emulated Pods, the real client against the API emulator, the controller's own threads.

Two applications serve `qwen-7b`, one Pod each; the Pods' IPs are 127.0.0.2 and 127.0.0.3 and
both engines listen on the same port there, as two pods of a cluster would. A busier engine
lowers its application's HTTPRoute weight, a dead one drains it, `weighting: static` ignores
load.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes.client import ApiClient
from prometheus_client import CollectorRegistry

from arks.adapters.kube import rest
from arks.adapters.kube.conditions import find_condition
from arks.resources import APPLICATIONS, ENDPOINTS, HTTPROUTES, PODS
from controller.load.cluster import ClusterLoad
from controller.load.metrics import EngineMetrics
from controller.reconcilers.endpoint import endpoint_controller, reconcile_endpoint
from controller.render.application import render_application
from launcher.procs import Child, Supervisor, free_port, wait_http
from tests.support.kube import FAST_INFORMERS, eventually, set_status
from tests.support.kube import get_object as get

pytestmark = pytest.mark.timeout(60)

SERVED = "qwen-7b"
DEFAULT_WEIGHT = 10
SCRAPE_S = 0.2
BUSY = {"waiting": 20, "running": 8, "kv_cache_usage": 0.6}
APPS = {"qwen-a": "127.0.0.2", "qwen-b": "127.0.0.3"}  # application -> its pod's IP


def shared_port(hosts: list[str]) -> int:
    """A port free on every one of `hosts` (loopback addresses)."""
    while True:
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port


@dataclass
class Sim:
    host: str
    port: int
    child: Child

    def set_load(self, **load: float) -> None:
        answer = httpx.put(f"http://{self.host}:{self.port}/sim/load", json=load, timeout=5)
        assert answer.status_code == 200, answer.text


@dataclass
class Cluster:
    api: ApiClient
    ns: str
    sims: dict[str, Sim]  # by application
    load: ClusterLoad
    registry: CollectorRegistry  # what the controller's /metrics would show of the load

    def engine(self, name: str, pod: str) -> float | None:
        labels = {"namespace": self.ns, "model": SERVED, "engine": pod}
        return self.registry.get_sample_value(name, labels)

    def scrape_errors(self) -> float:
        labels = {"namespace": self.ns, "model": SERVED}
        return self.registry.get_sample_value("arks_engine_scrape_errors_total", labels) or 0.0

    def weights(self) -> dict[str, int]:
        route = get(self.api, HTTPROUTES, self.ns, SERVED)
        if route is None:
            return {}
        return {ref["name"]: ref["weight"] for ref in route["spec"]["rules"][0]["backendRefs"]}

    def status(self) -> dict[str, Any]:
        endpoint = get(self.api, ENDPOINTS, self.ns, SERVED)
        assert endpoint is not None
        return dict(endpoint.get("status") or {})


def create_app(api: ApiClient, ns: str, name: str) -> dict[str, Any]:
    body = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksApplication",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"runtime": "vllm", "image": "vllm:test", "model": {"name": "qwen"},
                 "servedModelName": SERVED},
    }  # fmt: skip
    return rest.request(api, "POST", APPLICATIONS.path(ns), body=body)


def create_engine_pod(api: ApiClient, app: dict[str, Any], ip: str, port: int) -> None:
    """The Pod the application's Deployment would make, Running and Ready at `ip`; its engine
    listens on `port` (the sim's) instead of vLLM's 8000."""
    model = {"metadata": {"name": "qwen", "namespace": app["metadata"]["namespace"]},
             "spec": {"source": {"huggingface": {"repo": "Qwen/Qwen2.5-7B-Instruct"}}}}  # fmt: skip
    deployment = render_application(app, model)[0]
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    (http,) = [p for p in container["ports"] if p["name"] == "http"]
    http["containerPort"] = port
    ns, name = app["metadata"]["namespace"], f"{app['metadata']['name']}-0"
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {**template["metadata"], "name": name}, "spec": template["spec"]}  # fmt: skip
    rest.request(api, "POST", PODS.path(ns), body=pod)
    set_status(api, PODS, ns, name, phase="Running", podIP=ip,
               conditions=[{"type": "Ready", "status": "True"}])  # fmt: skip


def create_endpoint(api: ApiClient, ns: str, **spec: Any) -> None:
    body = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksEndpoint",
        "metadata": {"name": SERVED},
        "spec": {"gatewayRef": {"name": "arks-gateway"}, "defaultWeight": DEFAULT_WEIGHT, **spec},
    }
    rest.request(api, "POST", ENDPOINTS.path(ns), body=body)


@pytest.fixture
def cluster(api: ApiClient, ns: str, tmp_path: Path) -> Iterator[Cluster]:
    port = shared_port(list(APPS.values()))
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        children = {
            app: sup.python(f"sim-{app}", "launcher.sim", "--host", ip, "--port", str(port),
                            "--model", SERVED, "--name", app)
            for app, ip in APPS.items()
        }  # fmt: skip
        sims = {}
        for app, ip in APPS.items():
            wait_http(children[app], f"http://{ip}:{port}/health")
            sims[app] = Sim(ip, port, children[app])
            create_engine_pod(api, create_app(api, ns, app), ip, port)
        registry = CollectorRegistry()
        load = ClusterLoad(
            api,
            ns,
            interval_s=SCRAPE_S,
            informer_options=FAST_INFORMERS,
            metrics=EngineMetrics(registry),
        )
        load.start()
        try:
            yield Cluster(api, ns, sims, load, registry)
        finally:
            load.stop()


@pytest.fixture
def running(cluster: Cluster) -> Iterator[Cluster]:
    """`cluster` with the endpoint controller running on its load."""
    controller = endpoint_controller(
        cluster.api, cluster.ns, informer_options=FAST_INFORMERS, load=cluster.load
    )
    controller.start()
    try:
        yield cluster
    finally:
        controller.stop()


def test_the_busier_application_loses_weight_and_gets_it_back(running: Cluster) -> None:
    create_endpoint(running.api, running.ns)
    even = {"qwen-a": DEFAULT_WEIGHT, "qwen-b": DEFAULT_WEIGHT}
    eventually(lambda: running.weights() == even, timeout_s=10)

    running.sims["qwen-a"].set_load(**BUSY)
    weights = eventually(
        lambda: (w := running.weights()) and w["qwen-a"] <= DEFAULT_WEIGHT // 2 and w, timeout_s=10
    )
    assert weights["qwen-b"] == DEFAULT_WEIGHT
    capacity = running.load.capacity_of(running.ns, "qwen-a")
    assert capacity is not None and capacity < 50
    # The status shows what the route says, with each backend's share of the traffic.
    status = eventually(
        lambda: (
            (s := running.status())
            and [r["weight"] for r in s["routes"]] == [weights["qwen-a"], weights["qwen-b"]]
            and s
        )
    )
    total = weights["qwen-a"] + weights["qwen-b"]
    assert status["routes"] == [
        {"kind": "Service", "name": app, "port": 8000, "weight": weights[app],
         "share": round(100 * weights[app] / total)}
        for app in ("qwen-a", "qwen-b")
    ]  # fmt: skip
    assert status["backends"] == 2

    # Idle again: most of the way back. Not exactly even: the weight tracker's dead band
    # holds the score where the move settled (a steady error of up to ~20% here).
    running.sims["qwen-a"].set_load()
    eventually(lambda: running.weights()["qwen-a"] >= DEFAULT_WEIGHT * 7 // 10, timeout_s=10)
    assert running.weights()["qwen-b"] == DEFAULT_WEIGHT


def test_a_dead_engine_drains_its_application(running: Cluster) -> None:
    create_endpoint(running.api, running.ns)
    eventually(lambda: running.weights() == {"qwen-a": DEFAULT_WEIGHT, "qwen-b": DEFAULT_WEIGHT})

    running.sims["qwen-b"].child.stop()
    eventually(lambda: running.weights() == {"qwen-a": DEFAULT_WEIGHT, "qwen-b": 0}, timeout_s=10)
    assert running.load.capacity_of(running.ns, "qwen-b") == 0
    status = eventually(lambda: (s := running.status()) and s.get("backends") == 1 and s)
    assert [(r["name"], r["weight"], r["share"]) for r in status["routes"]] == [
        ("qwen-a", DEFAULT_WEIGHT, 100),
        ("qwen-b", 0, 0),
    ]
    ready = find_condition(status["conditions"], "Ready")
    assert ready is not None and ready["status"] == "True"
    assert "drained (failing their metrics scrapes): qwen-b" in ready["message"]


def test_static_weighting_ignores_load_until_switched_to_weighted(cluster: Cluster) -> None:
    create_endpoint(cluster.api, cluster.ns, weighting="static")
    cluster.sims["qwen-a"].set_load(**BUSY)
    eventually(lambda: (cluster.load.capacity_of(cluster.ns, "qwen-a") or 100) < 50, timeout_s=10)

    key = (cluster.ns, SERVED)
    reconcile_endpoint(cluster.api, key, load=cluster.load)
    assert cluster.weights() == {"qwen-a": DEFAULT_WEIGHT, "qwen-b": DEFAULT_WEIGHT}

    rest.request(cluster.api, "PATCH", ENDPOINTS.path(cluster.ns, SERVED),
                 body={"spec": {"weighting": "weighted"}}, content_type=rest.MERGE_PATCH)  # fmt: skip
    reconcile_endpoint(cluster.api, key, load=cluster.load)
    weights = cluster.weights()
    assert weights["qwen-a"] < DEFAULT_WEIGHT // 2 and weights["qwen-b"] == DEFAULT_WEIGHT


def test_engine_load_series_follow_the_pods_and_count_failed_scrapes(cluster: Cluster) -> None:
    """The exported load is the scraped one, per pod; an engine that stops answering (its
    process stopped: scrapes time out) counts errors and loses its load series but shows its
    drained weight; a deleted pod leaves no series."""
    cluster.sims["qwen-a"].set_load(**BUSY)
    eventually(lambda: cluster.engine("arks_engine_waiting_requests", "qwen-a-0") == 20)
    assert cluster.engine("arks_engine_running_requests", "qwen-a-0") == 8
    assert cluster.engine("arks_engine_kv_cache_usage_ratio", "qwen-a-0") == pytest.approx(0.6)
    assert cluster.engine("arks_engine_waiting_requests", "qwen-b-0") == 0
    eventually(lambda: cluster.engine("arks_engine_weight", "qwen-b-0") == 100)
    assert cluster.scrape_errors() == 0

    hung = cluster.sims["qwen-b"].child.popen.pid
    os.killpg(hung, signal.SIGSTOP)
    try:
        eventually(lambda: cluster.engine("arks_engine_weight", "qwen-b-0") == 0, timeout_s=10)
        assert cluster.scrape_errors() >= 3  # drained after three failures in a row
        assert cluster.engine("arks_engine_waiting_requests", "qwen-b-0") is None
        assert cluster.engine("arks_engine_running_requests", "qwen-b-0") is None
    finally:
        os.killpg(hung, signal.SIGCONT)
    eventually(lambda: cluster.engine("arks_engine_waiting_requests", "qwen-b-0") == 0)

    rest.request(cluster.api, "DELETE", PODS.path(cluster.ns, "qwen-a-0"))
    for name in ("arks_engine_weight", "arks_engine_waiting_requests"):
        eventually(lambda name=name: cluster.engine(name, "qwen-a-0") is None)
    assert cluster.engine("arks_engine_weight", "qwen-b-0") is not None
