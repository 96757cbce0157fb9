"""TLS on the rate-limit service's gRPC port, as Envoy Gateway runs envoyproxy/ratelimit:
GRPC_SERVER_USE_TLS with the Secret `envoy-rate-limit` mounted at /certs (`tls.crt`, `tls.key`,
`ca.crt`), client certificates verified against GRPC_CLIENT_TLS_CACERT, GRPC_CLIENT_TLS_SAN, a
rotated Secret served without a restart, and real Envoy dialling the service with its client
certificate as EG's `internal/xds/translator/globalresources.go` sets the cluster up.

The service runs as a subprocess (`Service` of test_ratelimit_service.py, whose plaintext
`channel` is unused here); each client makes its own TLS channel or socket.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
import pytest
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launcher.procs import Supervisor, free_port, wait_http
from launcher.stack import envoy_binary
from tests.integration.test_ratelimit_service import OK, OVER, Service, descriptor, envoy_bootstrap
from tests.support.certs import authority, issue

T = TypeVar("T")
SERVER_NAME = "envoy-ratelimit"  # the SAN of the service's certificate, as a client checks it


@dataclass(frozen=True)
class Certs:
    """The mounted Secret (`mount`: ca.crt, tls.crt, tls.key behind Kubernetes' `..data`
    symlink) and the clients' certificates, by name: (certificate, key)."""

    root: Path
    mount: Path
    ca: dict[str, Path]
    clients: dict[str, tuple[Path, Path]]

    def env(self, **extra: str) -> dict[str, str]:
        """What EG's ratelimit Deployment sets (GRPC_SERVER_TLS_CA_CERT: read by no upstream)."""
        return {
            "GRPC_SERVER_USE_TLS": "true",
            "GRPC_SERVER_TLS_CERT": str(self.mount / "tls.crt"),
            "GRPC_SERVER_TLS_KEY": str(self.mount / "tls.key"),
            "GRPC_CLIENT_TLS_CACERT": str(self.mount / "ca.crt"),
            "GRPC_SERVER_TLS_CA_CERT": str(self.mount / "ca.crt"),
            **extra,
        }

    def publish(self, version: str, crt: Path, key: Path) -> None:
        """Kubernetes' atomic update of a mounted Secret: the files in a new directory, then the
        `..data` symlink swapped to it in one rename."""
        target = self.mount / f"..{version}"
        target.mkdir()
        for name, source in (("ca.crt", self.ca["ca.crt"]), ("tls.crt", crt), ("tls.key", key)):
            (target / name).write_bytes(source.read_bytes())
            if not (self.mount / name).is_symlink():
                (self.mount / name).symlink_to(Path("..data") / name)
        (self.mount / "..data_tmp").symlink_to(target.name)
        os.replace(self.mount / "..data_tmp", self.mount / "..data")


def make_certs(root: Path) -> Certs:
    root.mkdir(exist_ok=True)
    ca = authority(root)
    server = issue(root, ca, "server", SERVER_NAME)
    clients = {name: issue(root, ca, name, name) for name in ("envoy", "stranger")}
    (root / "foreign").mkdir()
    foreign = authority(root / "foreign", "foreign-ca")  # a CA the service does not trust
    clients["foreign"] = issue(root / "foreign", foreign, "foreign", "envoy")
    mount = root / "certs"
    mount.mkdir()
    certs = Certs(root, mount, ca, clients)
    certs.publish("v1", *server)
    return certs


def credentials(certs: Certs, client: str | None) -> grpc.ChannelCredentials:
    crt, key = certs.clients[client] if client else (None, None)
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca["ca.crt"].read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=crt.read_bytes() if crt else None,
    )


def tls_channel(
    port: int, certs: Certs, client: str | None, server_name: str = SERVER_NAME
) -> grpc.Channel:
    return grpc.secure_channel(
        f"127.0.0.1:{port}",
        credentials(certs, client),
        options=[("grpc.ssl_target_name_override", server_name)],
    )


def ask(channel: grpc.Channel, domain: str, user: str) -> int:
    request = rls_pb2.RateLimitRequest(domain=domain, descriptors=[descriptor(("user", user))])
    return (
        rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(request, timeout=5).overall_code
    )


def four_in_one_minute(user: str, call: Callable[[str], T]) -> list[T]:
    """`call` four times for a fresh `user` (named per attempt) within one minute: CONFIG's
    `user` limit is 3 a minute in epoch-aligned windows, so four calls that straddle a minute's
    end are made again."""
    for attempt in range(3):
        started = time.time()
        answers = [call(f"{user}-{attempt}") for _ in range(4)]
        if started // 60 == time.time() // 60:
            break
    return answers


def refusal(channel: grpc.Channel, domain: str) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        ask(channel, domain, "anyone")
    code: grpc.StatusCode = refused.value.code()  # type: ignore[attr-defined]
    return code


def served_certificate(port: int, certs: Certs) -> tuple[str, tuple[str, ...]]:
    """The CN and SANs of the certificate the port serves to a new connection, verified against
    the CA (ALPN h2, a client certificate: what a gRPC client sends)."""
    context = ssl.create_default_context(cafile=certs.ca["ca.crt"])
    context.check_hostname = False  # the name is what is read here
    context.load_cert_chain(*certs.clients["envoy"])
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        cert = tls.getpeercert()
    assert cert is not None
    subject = dict(pair for rdn in cert["subject"] for pair in rdn)  # type: ignore[misc]
    return str(subject["commonName"]), tuple(str(v) for _, v in cert["subjectAltName"])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def mtls(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service with Envoy Gateway's environment."""
    tmp = tmp_path_factory.mktemp("mtls")
    with Supervisor(log_dir=tmp / "logs") as sup:
        svc = Service(sup, tmp, env=certs.env())
        svc.channel.close()  # plaintext: of no use on this port
        yield svc


def test_a_client_with_its_certificate_is_answered_over_tls(mtls: Service, certs: Certs) -> None:
    with tls_channel(mtls.port, certs, "envoy") as channel:
        answers = four_in_one_minute("alice", lambda user: ask(channel, mtls.domain, user))
        assert answers == [OK, OK, OK, OVER]
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="ratelimit"), timeout=5
        )  # the gRPC health is on the TLS port, as upstream's
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    # upstream's HTTP port stays plain
    assert httpx.get(f"http://127.0.0.1:{mtls.http_port}/healthcheck").status_code == 200


@pytest.mark.parametrize("client", [None, "foreign"])
def test_without_a_certificate_from_the_client_ca_a_client_is_refused(
    mtls: Service, certs: Certs, client: str | None
) -> None:
    with tls_channel(mtls.port, certs, client) as channel:
        assert refusal(channel, mtls.domain) == grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_client_is_refused(mtls: Service) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{mtls.port}") as channel:
        assert refusal(channel, mtls.domain) == grpc.StatusCode.UNAVAILABLE


def test_a_client_certificate_without_the_client_san_is_refused_per_call(
    certs: Certs, tmp_path: Path
) -> None:
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(sup, tmp_path, env=certs.env(GRPC_CLIENT_TLS_SAN="envoy"))
        svc.channel.close()
        with tls_channel(svc.port, certs, "stranger") as channel:
            assert refusal(channel, svc.domain) == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as health:  # the whole port, as upstream's
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        with tls_channel(svc.port, certs, "envoy") as channel:
            answers = four_in_one_minute("bob", lambda user: ask(channel, svc.domain, user))
            assert answers == [OK, OK, OK, OVER]
        log = sup.children[0].log_tail(200)
    assert "without the SAN 'envoy'" in log and "stranger" in log


def test_a_rotated_certificate_is_served_to_new_connections_and_a_broken_one_is_not(
    tmp_path: Path,
) -> None:
    certs = make_certs(tmp_path / "secret")
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(sup, tmp_path, env=certs.env())
        svc.channel.close()
        assert served_certificate(svc.port, certs) == (SERVER_NAME, (SERVER_NAME,))
        with tls_channel(svc.port, certs, "envoy") as before:
            assert ask(before, svc.domain, "carol") == OK
            rotated = issue(certs.root, certs.ca, "rotated", "rotated", ("DNS:rotated.example",))
            certs.publish("v2", *rotated)
            assert served_certificate(svc.port, certs) == ("rotated", ("rotated.example",))
            with tls_channel(svc.port, certs, "envoy", server_name="rotated.example") as after:
                assert ask(after, svc.domain, "carol") == OK
            assert ask(before, svc.domain, "carol") == OK  # a connection made before goes on
            # a certificate with another's key: the last good one stays, logged
            certs.publish("v3", rotated[0], certs.clients["envoy"][1])
            assert served_certificate(svc.port, certs) == ("rotated", ("rotated.example",))
            assert served_certificate(svc.port, certs) == ("rotated", ("rotated.example",))
        log = sup.children[0].log_tail(200)
    assert log.count("TLS certificate reloaded") == 1
    assert log.count("TLS certificate not reloaded, keeping the last good one") == 1


def test_envoy_dials_the_service_with_its_client_certificate_and_the_client_gets_429(
    mtls: Service, certs: Certs, tmp_path: Path
) -> None:
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        engine_port = free_port()
        engine = sup.python("engine", "launcher.sim", "--port", str(engine_port), "--model", "m")
        wait_http(engine, f"http://127.0.0.1:{engine_port}/health")
        listen, admin = free_port(), free_port()
        bootstrap = envoy_bootstrap(listen, admin, mtls.port, engine_port, mtls.domain)
        crt, key = certs.clients["envoy"]
        (cluster,) = (
            c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "ratelimit"
        )
        cluster["transport_socket"] = {  # as EG's buildEnvoyClientTLSSocket
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {
                    "tls_params": {"tls_maximum_protocol_version": "TLSv1_3"},
                    "validation_context": {"trusted_ca": {"filename": str(certs.mount / "ca.crt")}},
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(crt)},
                            "private_key": {"filename": str(key)},
                        }
                    ],
                },
            },
        }
        path = tmp_path / "envoy.json"
        path.write_text(json.dumps(bootstrap))
        envoy = sup.start(
            "envoy",
            [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--log-level", "warning"],
        )
        wait_http(envoy, f"http://127.0.0.1:{admin}/ready")
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        statuses = four_in_one_minute(
            "dave",
            lambda user: (
                httpx.post(
                    f"http://127.0.0.1:{listen}/v1/chat/completions",
                    json=body,
                    headers={"x-user": user},
                ).status_code
            ),
        )
        stats = httpx.get(f"http://127.0.0.1:{admin}/stats?filter=^cluster\\.ratelimit\\.ssl\\.")
    # Envoy fails open (failure_mode_deny false): the 429 proves the answers came over TLS.
    assert statuses == [200, 200, 200, 429]
    handshakes = {
        name: int(value)
        for name, _, value in (line.partition(": ") for line in stats.text.splitlines())
        if name.endswith((".ssl.handshake", ".ssl.connection_error"))
    }
    assert handshakes["cluster.ratelimit.ssl.handshake"] >= 1
    assert handshakes["cluster.ratelimit.ssl.connection_error"] == 0


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"GRPC_SERVER_TLS_CERT": ""}, "GRPC_SERVER_USE_TLS=true needs GRPC_SERVER_TLS_CERT"),
        (
            {"GRPC_SERVER_TLS_KEY": "/nonexistent/tls.key"},
            "(GRPC_SERVER_TLS_KEY): /nonexistent/tls.key: No such file",
        ),
    ],
)
def test_a_tls_setting_that_cannot_serve_stops_the_start_up_with_one_line(
    certs: Certs, env: dict[str, str], named: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ratelimit", "--grpc-address", f"127.0.0.1:{free_port()}"],
        env={**os.environ, **certs.env(**env)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert done.stderr.startswith("ratelimit: ") and done.stderr.count("\n") == 1
    assert named in done.stderr
