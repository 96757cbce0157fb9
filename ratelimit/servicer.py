"""`envoy.service.ratelimit.v3.RateLimitService`: a thin gRPC shell around the limiter."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from arks.limits.limiter import Limiter
from arks.metric_rules import UNKNOWN
from ratelimit import codec
from ratelimit.metrics import CallMetrics, domain_label


class InvalidRequest(ValueError):
    """A request envoyproxy/ratelimit refuses as a service error (gRPC UNKNOWN, HTTP 400)."""


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        limiter: Limiter,
        metrics: CallMetrics,
        timer: Callable[[], float] = time.perf_counter,
        *,
        headers: codec.HeaderNames | None = None,
        openai_body: bool = False,
        dynamic_metadata: bool = False,
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics
        self.timer = timer
        self.headers = headers
        self.openai_body = openai_body
        self.dynamic_metadata = dynamic_metadata  # upstream's RESPONSE_DYNAMIC_METADATA

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        try:
            return await self.answer(request)
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.UNKNOWN, str(err))
            raise  # abort raises; this line only tells the type checker so

    async def answer(self, request: rls_pb2.RateLimitRequest) -> rls_pb2.RateLimitResponse:
        """The limiter's answer (gRPC's and the HTTP `/json`'s); each call timed by domain, its
        failures counted by type."""
        started = self.timer()
        domain = UNKNOWN
        try:
            # As envoyproxy/ratelimit answers them: an error, not an OK that limits nothing.
            if not request.domain:
                raise InvalidRequest("rate limit domain must not be empty")
            if not request.descriptors:
                raise InvalidRequest("rate limit descriptor list must not be empty")
            asked = codec.request(request)
            domain = domain_label(asked.domain, self.limiter.config().domains)
            answer = await self.limiter.decide(asked)
        except Exception:
            self.metrics.errors.labels("service_error").inc()
            raise
        finally:
            self.metrics.called(domain, self.timer() - started)
        if answer.without_store:
            self.metrics.errors.labels("redis_error").inc()
        return codec.response(
            answer,
            headers=self.headers,
            openai_body=self.openai_body,
            dynamic_metadata=codec.dynamic_metadata(request, answer)
            if self.dynamic_metadata
            else None,
        )
