"""How every gRPC service starts and stops: its servicers, the standard health service, one port."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from arks.adapters.grpc_tls import ServerTls, interceptors, server_credentials


@dataclass(frozen=True)
class GrpcServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int  # the bound port (useful with `host:0`)
    names: tuple[str, ...] = ("",)  # the health service names it answers for

    async def set_serving(self, serving: bool) -> None:
        """Every name SERVING, or NOT_SERVING (a store the service needs is away)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.names:
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = 2.0) -> None:
        """NOT_SERVING first (so load balancers stop sending), then let calls in flight finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_grpc(
    address: str,
    register: Callable[[grpc.aio.Server], None],
    *,
    reuse_port: bool = False,
    health_names: tuple[str, ...] = (),
    tls: ServerTls | None = None,
    max_connection_age_s: float | None = None,
    max_connection_age_grace_s: float | None = None,
) -> GrpcServer:
    """Serve the servicers `register` adds, plus grpc.health.v1 (SERVING once started, for the
    server as a whole, "", and each of `health_names`), on `address`.

    SO_REUSEPORT only with `reuse_port` (a service's workers, `arks.workers`): otherwise a
    second server on the same port must fail, not share it silently.

    With `tls` the port, health included, serves TLS only (`arks.adapters.grpc_tls`; its
    TlsFilesError when the files cannot be read); without it, plaintext.

    With `max_connection_age_s` a connection is sent GOAWAY after that long (gRPC core adds
    +/-10 % jitter), so clients reconnect and spread over the replicas a Service adds; it is
    closed `max_connection_age_grace_s` later, calls still in flight or not."""
    options: list[tuple[str, int]] = [("grpc.so_reuseport", 1 if reuse_port else 0)]
    if max_connection_age_s is not None:
        options.append(("grpc.max_connection_age_ms", round(max_connection_age_s * 1000)))
    if max_connection_age_grace_s is not None:
        options.append(
            ("grpc.max_connection_age_grace_ms", round(max_connection_age_grace_s * 1000))
        )
    server = grpc.aio.server(interceptors=interceptors(tls) or None, options=options)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, server_credentials(tls))
    await server.start()
    grpc_server = GrpcServer(server, health_servicer, port, ("", *health_names))
    await grpc_server.set_serving(True)
    return grpc_server
