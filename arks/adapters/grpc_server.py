"""How every gRPC service starts and stops: its servicers, the standard health service, one port."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


@dataclass(frozen=True)
class GrpcServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int  # the bound port (useful with `host:0`)

    async def stop(self, grace_s: float | None = 2.0) -> None:
        """NOT_SERVING first (so load balancers stop sending), then let calls in flight finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_grpc(
    address: str, register: Callable[[grpc.aio.Server], None], *, reuse_port: bool = False
) -> GrpcServer:
    """Serve the servicers `register` adds, plus grpc.health.v1 (SERVING once started), on `address`.

    SO_REUSEPORT only with `reuse_port` (a service's workers, `arks.workers`): otherwise a
    second server on the same port must fail, not share it silently."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return GrpcServer(server, health_servicer, port)
