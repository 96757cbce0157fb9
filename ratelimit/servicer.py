"""`envoy.service.ratelimit.v3.RateLimitService`: a thin gRPC shell around the limiter."""

from __future__ import annotations

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from arks.limits.limiter import Limiter
from ratelimit import codec


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        return codec.response(await self.limiter.decide(codec.request(request)))
