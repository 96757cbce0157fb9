"""The floor of a rate-limit decision: `RateLimitService.ShouldRateLimit` answering a constant OK.

Same gRPC and event-loop setup as `ratelimit/server.py` (uvloop, `grpc.aio.server` with the same
options, the gRPC health service), no work per call beyond decoding the request and encoding one
prebuilt answer, so no Python rate-limit service can decide more cheaply.

    python -m tests.bench.empty_unary --grpc-address 127.0.0.1:50053
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import uvloop
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

_OK = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)


class EmptyRateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        return _OK


async def serve(address: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(EmptyRateLimitService(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(address)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.empty_unary", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--grpc-address", default="127.0.0.1:50053")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.grpc_address))


if __name__ == "__main__":
    main()
