"""The xDS server driving a real Envoy over ADS: changes take effect, NACKs keep the last good
config, and Envoy rides out a restart of the server.

Envoy, the ADS server and two tiny upstreams (each answers its own name) run per test; the
server and the upstreams share the test's event loop, so every blocking wait runs in a thread.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from arks import envoy_config
from arks.envoy_config import EnvoySettings
from controller.xds.cache import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    Snapshot,
    SnapshotCache,
    snapshot_from_json,
)
from controller.xds.server import XdsServer
from launcher.procs import Supervisor, free_port, wait_http
from launcher.stack import envoy_binary

NODE = "xds-test-node"
ADS = dict(envoy_config.ADS_SOURCE)
T = TypeVar("T")


# --- resources, in the JSON shape arks/envoy_config.py renders ---------------------------------


def listener(port: int, stat_prefix: str = "ingress") -> dict[str, Any]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "rds": {"route_config_name": "local", "config_source": ADS},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "name": "ingress",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def route_config(*routes: dict[str, Any]) -> dict[str, Any]:
    default = {"match": {"prefix": "/"}, "route": {"cluster": "engines", "timeout": "5s"}}
    return {
        "name": "local",
        "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [*routes, default]}],
    }


def eds_cluster(name: str, lb_policy: str = "ROUND_ROBIN") -> dict[str, Any]:
    return {
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": ADS},
        "connect_timeout": "1s",
        "lb_policy": lb_policy,
    }


def assignment(cluster: str, weights: dict[int, int]) -> dict[str, Any]:
    """Endpoints on 127.0.0.1 by port, with their load-balancing weights."""
    return {
        "cluster_name": cluster,
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {
                                "socket_address": {"address": "127.0.0.1", "port_value": port}
                            }
                        },
                        "load_balancing_weight": weight,
                    }
                    for port, weight in weights.items()
                ]
            }
        ],
    }


def bootstrap(admin_port: int, xds_port: int, delta: bool) -> dict[str, Any]:
    """The local stack's own bootstrap (ADS for everything; its extproc cluster goes unused)."""
    settings = EnvoySettings(
        listen_port=0,
        admin_port=admin_port,
        extproc_port=free_port(),
        xds_port=xds_port,
        xds_delta=delta,
    )
    return envoy_config.bootstrap(settings, node_id=NODE)


# --- the running pieces ------------------------------------------------------------------------


async def start_upstream(name: str) -> tuple[web.AppRunner, int]:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@dataclass
class Plane:
    cache: SnapshotCache
    server: XdsServer
    registry: CollectorRegistry
    xds_port: int
    listen_port: int
    admin_port: int
    upstream_a: int
    upstream_b: int
    http: httpx.AsyncClient
    delta: bool

    def snapshot(
        self,
        version: str,
        weights: dict[int, int],
        routes: tuple[dict[str, Any], ...] = (),
        **extra: Any,
    ) -> Snapshot:
        return snapshot_from_json(
            version,
            {
                LISTENER: [listener(self.listen_port)],
                ROUTE: [route_config(*routes)],
                CLUSTER: [eds_cluster("engines", **extra)],
                ENDPOINT: [assignment("engines", weights)],
            },
        )

    async def get(self, path: str = "/") -> httpx.Response:
        return await self.http.get(f"http://127.0.0.1:{self.listen_port}{path}")

    async def answers(self, count: int = 10) -> list[str]:
        out = []
        for _ in range(count):
            response = await self.get()
            assert response.status_code == 200, response.text
            out.append(response.text)
        return out

    async def hosts(self, cluster: str = "engines") -> dict[int, int]:
        """Envoy's view from its admin /clusters: port -> weight of the cluster's hosts."""
        response = await self.http.get(f"http://127.0.0.1:{self.admin_port}/clusters?format=json")
        for status in response.json().get("cluster_statuses", []):
            if status["name"] == cluster:
                return {
                    h["address"]["socket_address"]["port_value"]: h.get("weight", 1)
                    for h in status.get("host_statuses", [])
                }
        return {}

    async def stats(self) -> dict[str, int]:
        response = await self.http.get(
            f"http://127.0.0.1:{self.admin_port}/stats",
            params={"format": "json", "filter": "_manager"},
        )
        return {s["name"]: s["value"] for s in response.json()["stats"] if "value" in s}

    async def route_version(self) -> str:
        """The RouteConfiguration version Envoy runs (what it last accepted)."""
        response = await self.http.get(
            f"http://127.0.0.1:{self.admin_port}/stats",
            params={"format": "json", "filter": "rds.local.version_text"},
        )
        return str(response.json()["stats"][0]["value"])

    def metric(self, name: str, registry: CollectorRegistry | None = None, **labels: str) -> float:
        return (registry or self.registry).get_sample_value(name, labels) or 0.0

    def pushes(self, kind: str) -> float:
        return self.metric("arks_xds_pushes_total", type=kind)


async def eventually(
    get: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float = 5.0
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s; last value: {value!r}")
        await asyncio.sleep(0.02)


async def timed_until(
    get: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float = 5.0
) -> float:
    start = time.monotonic()
    await eventually(get, ok, timeout)
    return time.monotonic() - start


@pytest.fixture(params=["sotw", "delta"])
async def plane(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Plane]:
    """Envoy on state-of-the-world ADS, or on delta ADS (what the local stack uses)."""
    runner_a, port_a = await start_upstream("a")
    runner_b, port_b = await start_upstream("b")
    registry = CollectorRegistry()
    cache = SnapshotCache()
    xds_port, listen_port, admin_port = free_port(), free_port(), free_port()
    server = XdsServer(cache, f"127.0.0.1:{xds_port}", registry)
    http = httpx.AsyncClient(timeout=5)
    supervisor = Supervisor(log_dir=tmp_path / "logs")
    delta = request.param == "delta"
    p = Plane(
        cache, server, registry, xds_port, listen_port, admin_port, port_a, port_b, http, delta
    )
    try:
        await server.start()
        cache.set(p.snapshot("v1", {port_a: 1}))
        path = tmp_path / "bootstrap.json"
        path.write_text(json.dumps(bootstrap(admin_port, xds_port, delta)))
        envoy = supervisor.start(
            "envoy",
            [
                envoy_binary(),
                "-c",
                str(path),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warning",
            ],
        )
        # /ready turns 200 once the first LDS and CDS (and their RDS, EDS) are in: served by ADS
        await asyncio.to_thread(wait_http, envoy, f"http://127.0.0.1:{admin_port}/ready")
        yield p
    finally:
        supervisor.close()
        await http.aclose()
        await p.server.stop(grace=0)
        await runner_a.cleanup()
        await runner_b.cleanup()


# --- the behaviour -----------------------------------------------------------------------------


async def test_endpoint_and_weight_changes_reach_envoy_within_a_second(plane: Plane) -> None:
    assert set(await plane.answers()) == {"a"}
    assert plane.metric("arks_xds_connected_streams") == 1
    listener_pushes = plane.pushes("lds")

    plane.cache.set(plane.snapshot("v2", {plane.upstream_a: 3, plane.upstream_b: 5}))
    expected = {plane.upstream_a: 3, plane.upstream_b: 5}
    assert await timed_until(plane.hosts, lambda hosts: hosts == expected) < 1.0
    assert set(await plane.answers(20)) == {"a", "b"}

    plane.cache.set(plane.snapshot("v3", {plane.upstream_b: 2}))
    assert await timed_until(plane.hosts, lambda hosts: hosts == {plane.upstream_b: 2}) < 1.0
    assert set(await plane.answers()) == {"b"}
    # Only endpoints changed: listeners (and their filter chains) were not sent again.
    assert plane.pushes("lds") == listener_pushes
    # Envoy answered every endpoint push, each timed from sending to its ACK.
    answered = await eventually(
        lambda: asyncio.sleep(0, plane.metric("arks_xds_answer_seconds_count", type="eds")),
        lambda n: n == plane.pushes("eds"),
    )
    assert answered >= 3


async def test_changed_and_new_clusters_and_listeners_finish_warming(plane: Plane) -> None:
    def warm(stats: dict[str, int]) -> bool:
        return (
            stats.get("cluster_manager.warming_clusters") == 0
            and stats.get("listener_manager.total_listeners_warming") == 0
        )

    # A replaced cluster (and listener) with the same endpoints (and routes) as before: Envoy
    # asks again for what it already has, and warms until it gets it.
    plane.cache.set(plane.snapshot("v2", {plane.upstream_a: 1}, lb_policy="LEAST_REQUEST"))
    await eventually(
        plane.stats, lambda s: s.get("cluster_manager.cluster_modified") == 1 and warm(s)
    )
    changed_listener = snapshot_from_json(
        "v3",
        {
            LISTENER: [listener(plane.listen_port, stat_prefix="renamed")],
            ROUTE: [route_config()],
            CLUSTER: [eds_cluster("engines", lb_policy="LEAST_REQUEST")],
            ENDPOINT: [assignment("engines", {plane.upstream_a: 1})],
        },
    )
    plane.cache.set(changed_listener)
    await eventually(
        plane.stats, lambda s: s.get("listener_manager.listener_modified") == 1 and warm(s)
    )
    assert set(await plane.answers()) == {"a"}

    # A new cluster: Envoy subscribes to its endpoints by name.
    with_new_cluster = snapshot_from_json(
        "v4",
        {
            LISTENER: [listener(plane.listen_port)],
            ROUTE: [route_config({"match": {"prefix": "/b"}, "route": {"cluster": "engines-b"}})],
            CLUSTER: [eds_cluster("engines", lb_policy="LEAST_REQUEST"), eds_cluster("engines-b")],
            ENDPOINT: [
                assignment("engines", {plane.upstream_a: 2}),
                assignment("engines-b", {plane.upstream_b: 1}),
            ],
        },
    )
    plane.cache.set(with_new_cluster)
    await eventually(plane.hosts, lambda hosts: hosts == {plane.upstream_a: 2})
    await eventually(lambda: plane.hosts("engines-b"), lambda hosts: hosts == {plane.upstream_b: 1})
    assert (await eventually(lambda: plane.get("/b"), lambda r: r.status_code == 200)).text == "b"
    assert set(await plane.answers()) == {"a"}
    assert warm(await plane.stats())


async def test_a_nacked_update_leaves_traffic_on_the_last_good_config(plane: Plane) -> None:
    assert set(await plane.answers()) == {"a"}
    serving = plane.cache.get(NODE)
    assert serving is not None
    good_routes = serving.versions[ROUTE]
    assert await plane.route_version() == good_routes
    # Protobuf accepts any string as a regex; Envoy's RE2 refuses this one, so Envoy NACKs.
    broken_route = {"match": {"safe_regex": {"regex": "(["}}, "direct_response": {"status": 418}}
    broken = plane.snapshot("v2-broken", {plane.upstream_a: 1}, routes=(broken_route,))
    plane.cache.set(broken)

    rejections = await eventually(lambda: asyncio.to_thread(plane.server.rejected), bool)
    assert len(rejections) == 1
    rejection = rejections[0]
    assert (rejection.node, rejection.type_url, rejection.version) == (
        NODE,
        ROUTE,
        broken.versions[ROUTE],
    )
    assert "missing ]" in rejection.message, rejection.message  # RE2's own words
    assert plane.metric("arks_xds_nacks_total", type="rds") == 1
    assert await plane.route_version() == good_routes
    assert set(await plane.answers()) == {"a"}

    # The rejected version is not pushed again and again.
    route_pushes = plane.pushes("rds")
    await asyncio.sleep(0.5)
    assert plane.pushes("rds") == route_pushes
    assert plane.metric("arks_xds_nacks_total", type="rds") == 1

    healthz = {
        "match": {"path": "/healthz"},
        "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
    }
    fixed = plane.snapshot("v3", {plane.upstream_a: 1}, routes=(healthz,))
    plane.cache.set(fixed)
    assert (
        await eventually(lambda: plane.get("/healthz"), lambda r: r.text == "ok")
    ).status_code == 200
    assert await plane.route_version() == fixed.versions[ROUTE]
    assert (
        await eventually(lambda: asyncio.to_thread(plane.server.rejected), lambda r: r == []) == []
    )
    assert set(await plane.answers()) == {"a"}


async def test_envoy_keeps_serving_while_the_server_is_away_and_reconnects(plane: Plane) -> None:
    assert set(await plane.answers()) == {"a"}
    await plane.server.stop(grace=0)
    for _ in range(5):
        assert set(await plane.answers(4)) == {"a"}
        await asyncio.sleep(0.1)

    registry = CollectorRegistry()
    plane.server = XdsServer(plane.cache, f"127.0.0.1:{plane.xds_port}", registry)
    await plane.server.start()

    async def connected() -> float:
        return plane.metric("arks_xds_connected_streams", registry)

    await eventually(connected, lambda n: n == 1)
    if plane.delta:
        # Envoy told the new server what it holds (initial_resource_versions): nothing to resend.
        await asyncio.sleep(0.3)
        assert plane.metric("arks_xds_pushes_total", registry, type="cds") == 0
        assert plane.metric("arks_xds_pushes_total", registry, type="eds") == 0
    else:
        # The new server answers the reconnected stream (the stream counts as connected a moment
        # before its first answer is counted); Envoy still has what it had.
        async def cds_pushes() -> float:
            return plane.metric("arks_xds_pushes_total", registry, type="cds")

        assert await eventually(cds_pushes, lambda n: n >= 1) >= 1
    assert set(await plane.answers()) == {"a"}

    plane.cache.set(plane.snapshot("v2", {plane.upstream_b: 4}))
    assert await timed_until(plane.hosts, lambda hosts: hosts == {plane.upstream_b: 4}) < 1.0
    assert set(await plane.answers()) == {"b"}


async def test_one_engine_weight_change_sends_one_endpoint_assignment_on_delta(
    plane: Plane,
) -> None:
    """Two endpoints' clusters; one engine's weight changes. Delta sends that endpoint's
    assignment alone, the state of the world every assignment (what the metric shows)."""

    def two(weight: int) -> Snapshot:
        return snapshot_from_json(
            f"w{weight}",
            {
                LISTENER: [listener(plane.listen_port)],
                ROUTE: [route_config()],
                CLUSTER: [eds_cluster("engines"), eds_cluster("spare")],
                ENDPOINT: [
                    assignment("engines", {plane.upstream_a: 1}),
                    assignment("spare", {plane.upstream_b: weight}),
                ],
            },
        )

    plane.cache.set(two(1))
    await eventually(lambda: plane.hosts("spare"), lambda hosts: hosts == {plane.upstream_b: 1})
    before = plane.metric("arks_xds_resources_sent_total", type="eds")
    plane.cache.set(two(6))
    await eventually(lambda: plane.hosts("spare"), lambda hosts: hosts == {plane.upstream_b: 6})
    assert plane.metric("arks_xds_resources_sent_total", type="eds") - before == (
        1 if plane.delta else 2
    )
    assert set(await plane.answers()) == {"a"}
