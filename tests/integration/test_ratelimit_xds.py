"""The rate-limit service configured over xDS (envoyproxy/ratelimit's CONFIG_TYPE=GRPC_XDS_SOTW),
against our own xDS server (controller/xds): limits arrive and change, a bad resource is NACKed
and the last good limits stay, the service rides out a restart of the server, and mutual TLS as
Envoy Gateway sets it up.

The service runs as a subprocess (`Service` of test_ratelimit_service.py; the config file it
writes is ignored under xDS, as upstream ignores its file settings); the xDS server runs on an
event loop of its own in a thread, so the test's blocking gRPC calls never stall it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import CollectorRegistry

from controller.xds.cache import RATE_LIMIT_CONFIG, Snapshot, SnapshotCache, snapshot_from_messages
from controller.xds.server import AggregatedDiscoveryService, Rejection, XdsMetrics, XdsServer
from launcher.procs import Supervisor, free_port, wait_port
from rls_protos import rls_conf_pb2 as rls
from tests.integration.test_ratelimit_service import OK, OVER, Service, descriptor
from tests.support.certs import certificates
from tests.support.exposition import sample
from tests.support.waiting import wait_for

T = TypeVar("T")
RETRY = "0.2s"  # the service's CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL in these tests


class ControlPlane:
    """Our xDS server on its own event loop: `stop()` drops every stream at once and closes the
    port, `start()` serves the same cache on the same port again."""

    def __init__(self, cache: SnapshotCache, tls: grpc.ServerCredentials | None = None) -> None:
        self.cache = cache
        self.port = free_port()
        self.tls = tls
        self.registry = CollectorRegistry()
        self.service: AggregatedDiscoveryService | None = None
        self._server: XdsServer | grpc.aio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def start(self) -> None:
        self.registry = CollectorRegistry()  # a fresh server, fresh counters
        address = f"127.0.0.1:{self.port}"
        if self.tls is None:
            server = XdsServer(self.cache, address, self.registry)
            self._run(server.start())
            self.service, self._server = server.service, server
            return
        self.service = AggregatedDiscoveryService(self.cache, XdsMetrics(self.registry))

        async def serve_tls() -> grpc.aio.Server:
            server = grpc.aio.server()
            ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.service, server)
            assert self.tls is not None
            server.add_secure_port(address, self.tls)
            await server.start()
            return server

        self._server = self._run(serve_tls())

    def stop(self) -> None:
        server, self._server = self._server, None
        if isinstance(server, XdsServer):
            self._run(server.stop(grace=None))
        elif server is not None:
            self._run(server.stop(None))

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def rejected(self) -> list[Rejection]:
        assert self.service is not None
        return self.service.rejected()

    def counter(self, name: str) -> float:
        return self.registry.get_sample_value(name, {"type": "rls"}) or 0.0


def limits(domain: str, per_user: int, resource: str | None = None) -> rls.RateLimitConfig:
    """A domain like test_ratelimit_service's CONFIG: `user` per minute, an unlimited `vip`."""
    return rls.RateLimitConfig(
        name=resource or domain,
        domain=domain,
        descriptors=[
            rls.RateLimitDescriptor(
                key="user",
                rate_limit=rls.RateLimitPolicy(
                    unit=rls.MINUTE, requests_per_unit=per_user, name="per_user"
                ),
            ),
            rls.RateLimitDescriptor(key="vip", rate_limit=rls.RateLimitPolicy(unlimited=True)),
        ],
    )


def snapshot(version: str, *resources: rls.RateLimitConfig) -> Snapshot:
    return snapshot_from_messages(version, {RATE_LIMIT_CONFIG: resources})


def limit_in_force(svc: Service) -> int:
    """The `user` limit the service applies now (0: none yet), asked with a probe value."""
    status = svc.ask(descriptor(("user", "probe"))).statuses[0]
    return int(status.current_limit.requests_per_unit)


def codes(svc: Service, user: str, n: int) -> list[int]:
    return [svc.ask(descriptor(("user", user))).overall_code for _ in range(n)]


@pytest.fixture
def plane() -> Iterator[ControlPlane]:
    plane = ControlPlane(SnapshotCache())
    plane.start()
    yield plane
    plane.close()


def start_service(sup: Supervisor, tmp: Path, plane: ControlPlane, node: str) -> Service:
    return Service(
        sup,
        tmp,
        "--config-type",
        "grpc-xds-sotw",
        "--config-xds-server",
        f"127.0.0.1:{plane.port}",
        "--config-xds-node-id",
        node,
        "--config-xds-node-metadata",
        "cluster=arks,zone=local",
        "--config-xds-retry-interval",
        RETRY,
        "--force-start-without-initial-config",  # serving before the first config, as EG has it
    )


def test_nothing_is_served_before_the_first_config_unless_forced(
    plane: ControlPlane, tmp_path: Path
) -> None:
    """Upstream's default (FORCE_START_WITHOUT_INITIAL_CONFIG unset): no port opens until the
    xDS server's first config has arrived, so no call is answered without the limits (a
    fail-closed Envoy refuses meanwhile instead of passing everything)."""
    node = f"rls-{uuid.uuid4().hex[:8]}"
    domain = f"test-{uuid.uuid4().hex[:8]}"
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        child = sup.python(
            "ratelimit-waiting",
            "ratelimit",
            "--config-type",
            "grpc-xds-sotw",
            "--config-xds-server",
            f"127.0.0.1:{plane.port}",
            "--config-xds-node-id",
            node,
            "--config-xds-retry-interval",
            RETRY,
            "--grpc-address",
            f"127.0.0.1:{port}",
            "--metrics-port",
            str(metrics_port),
            "--port",
            str(http_port),
            "--debug-port",
            str(free_port()),
        )
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # the stream is open, no snapshot for the node yet
            assert child.alive()
            for closed in (port, http_port):
                with socket.socket() as s:
                    assert s.connect_ex(("127.0.0.1", closed)) != 0, "a port opened early"
            time.sleep(0.1)
        plane.cache.set(snapshot("1", limits(domain, per_user=1)), node_id=node)
        wait_port(child, port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            request = rls_pb2.RateLimitRequest(
                domain=domain, descriptors=[descriptor(("user", "a"))]
            )
            first = [stub.ShouldRateLimit(request, timeout=5).overall_code for _ in range(2)]
    assert first == [OK, OVER]  # the very first answers already under the limits


def test_limits_arrive_over_xds_and_an_update_replaces_them(
    plane: ControlPlane, tmp_path: Path
) -> None:
    node = f"rls-{uuid.uuid4().hex[:8]}"
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = start_service(sup, tmp_path, plane, node)
        try:
            assert limit_in_force(svc) == 0  # no config yet: no domain, every answer OK
            plane.cache.set(snapshot("1", limits(svc.domain, per_user=3)), node_id=node)
            wait_for(lambda: limit_in_force(svc), lambda n: n == 3)
            assert codes(svc, "alice", 4) == [OK, OK, OK, OVER]
            assert svc.ask(descriptor(("vip", "x"))).overall_code == OK

            plane.cache.set(snapshot("2", limits(svc.domain, per_user=5)), node_id=node)
            wait_for(lambda: limit_in_force(svc), lambda n: n == 5)
            # The window's counter carries over: alice used 4 of the new 5.
            assert codes(svc, "alice", 2) == [OK, OVER]
            assert codes(svc, "bob", 6) == [OK] * 5 + [OVER]

            assert plane.rejected() == []
            assert plane.counter("arks_xds_pushes_total") == 2
            wait_for(lambda: plane.counter("arks_xds_answer_seconds_count"), lambda n: n == 2)
            text = svc.metrics()
            assert sample(text, "arks_ratelimit_config_reloads_total") == 2
            assert sample(text, "arks_ratelimit_config_errors_total") == 0
        finally:
            svc.channel.close()


def missing_unit(domain: str) -> list[rls.RateLimitConfig]:
    broken = limits(domain, per_user=7, resource="broken")
    broken.descriptors[0].rate_limit.unit = rls.UNKNOWN
    return [broken]


def domain_twice(domain: str) -> list[rls.RateLimitConfig]:
    return [limits(domain, 7, resource="first"), limits(domain, 8, resource="second")]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (missing_unit, "RateLimitConfig 'broken': descriptors[0].rate_limit.unit: required"),
        (domain_twice, "duplicate domain"),
    ],
    ids=["missing-unit", "domain-in-two-resources"],
)
def test_a_bad_resource_is_nacked_and_the_last_good_limits_keep_working(
    plane: ControlPlane, tmp_path: Path, bad: Any, reason: str
) -> None:
    node = f"rls-{uuid.uuid4().hex[:8]}"
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = start_service(sup, tmp_path, plane, node)
        try:
            good = snapshot("1", limits(svc.domain, per_user=3))
            plane.cache.set(good, node_id=node)
            wait_for(lambda: limit_in_force(svc), lambda n: n == 3)
            assert codes(svc, "alice", 2) == [OK, OK]

            plane.cache.set(snapshot("2", *bad(svc.domain)), node_id=node)
            (rejection,) = wait_for(plane.rejected, lambda r: len(r) == 1)
            assert (rejection.node, rejection.type_url) == (node, RATE_LIMIT_CONFIG)
            assert rejection.version == plane.cache.get(node).versions[RATE_LIMIT_CONFIG]
            assert reason in rejection.message
            assert plane.counter("arks_xds_nacks_total") == 1
            # The last good limits, and their counters, go on.
            assert limit_in_force(svc) == 3
            assert codes(svc, "alice", 2) == [OK, OVER]
            assert sample(svc.metrics(), "arks_ratelimit_config_errors_total") == 1

            plane.cache.set(snapshot("3", limits(svc.domain, per_user=4)), node_id=node)
            wait_for(lambda: limit_in_force(svc), lambda n: n == 4)
            wait_for(plane.rejected, lambda r: r == [])  # the ACK of a later version clears it
        finally:
            svc.channel.close()


def test_the_service_rides_out_a_restart_of_the_xds_server(
    plane: ControlPlane, tmp_path: Path
) -> None:
    node = f"rls-{uuid.uuid4().hex[:8]}"
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = start_service(sup, tmp_path, plane, node)
        try:
            plane.cache.set(snapshot("1", limits(svc.domain, per_user=3)), node_id=node)
            wait_for(lambda: limit_in_force(svc), lambda n: n == 3)
            assert codes(svc, "alice", 2) == [OK, OK]

            plane.stop()  # every stream cut, the port closed
            # Several retry intervals without a server: the last config keeps being enforced.
            for _ in range(5):
                assert limit_in_force(svc) == 3
                threading.Event().wait(0.2)
            assert codes(svc, "alice", 2) == [OK, OVER]
            assert svc.child.alive()

            plane.cache.set(snapshot("2", limits(svc.domain, per_user=10)), node_id=node)
            plane.start()  # a fresh server, knowing nothing of the service
            wait_for(lambda: limit_in_force(svc), lambda n: n == 10)
            assert codes(svc, "alice", 7) == [OK] * 6 + [OVER]  # 4 used of the new 10
            assert plane.counter("arks_xds_pushes_total") == 1
            assert plane.rejected() == []
        finally:
            svc.channel.close()


# --- mutual TLS, as Envoy Gateway sets it up ----------------------------------------------------


def test_mutual_tls_to_the_xds_server_with_envoy_gateways_environment(tmp_path: Path) -> None:
    certs = certificates(tmp_path)
    tls = grpc.ssl_server_credentials(
        [(certs["server.key"].read_bytes(), certs["server.crt"].read_bytes())],
        root_certificates=certs["ca.crt"].read_bytes(),
        require_client_auth=True,
    )
    plane = ControlPlane(SnapshotCache(), tls=tls)
    plane.start()
    # What internal/infrastructure/kubernetes/ratelimit/resource.go sets for the xDS side (its
    # /certs mount here in tmp_path; the server's name given by SAN, the URL being an address).
    env = {
        "CONFIG_TYPE": "GRPC_XDS_SOTW",
        "CONFIG_GRPC_XDS_SERVER_URL": f"127.0.0.1:{plane.port}",
        "CONFIG_GRPC_XDS_NODE_ID": "envoy-ratelimit",
        "CONFIG_GRPC_XDS_SERVER_USE_TLS": "true",
        "CONFIG_GRPC_XDS_CLIENT_TLS_CERT": str(certs["client.crt"]),
        "CONFIG_GRPC_XDS_CLIENT_TLS_KEY": str(certs["client.key"]),
        "CONFIG_GRPC_XDS_SERVER_TLS_CACERT": str(certs["ca.crt"]),
        "CONFIG_GRPC_XDS_SERVER_TLS_SAN": "envoy-gateway",
        "CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL": RETRY,
        "FORCE_START_WITHOUT_INITIAL_CONFIG": "true",  # EG's too
    }
    try:
        with Supervisor(log_dir=tmp_path / "logs") as sup:
            svc = Service(sup, tmp_path, env=env)
            try:
                plane.cache.set(snapshot("1", limits(svc.domain, per_user=2)))  # every node
                wait_for(lambda: limit_in_force(svc), lambda n: n == 2)
                assert codes(svc, "alice", 3) == [OK, OK, OVER]
                assert plane.counter("arks_xds_pushes_total") == 1
            finally:
                svc.channel.close()
    finally:
        plane.close()
