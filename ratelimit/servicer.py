"""`envoy.service.ratelimit.v3.RateLimitService`: a thin gRPC shell around the limiter."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from arks.limits.limiter import Limiter, Prepared
from arks.metric_rules import UNKNOWN
from ratelimit import codec
from ratelimit.metrics import CallMetrics, domain_label


class InvalidRequest(ValueError):
    """A request envoyproxy/ratelimit refuses as a service error (gRPC UNKNOWN, HTTP 400)."""


# Requests prepared, by their bytes: Envoy asks the same few descriptors over and over, and working
# one out (our types, the configuration's limits, counter keys, stats series) costs more than the
# rest of the decision. Forgotten all at once when full (a flood of distinct values only refills).
MAX_PLANS = 10_000
# Only requests this small are kept: Envoy's are a few hundred bytes, and a client sending large
# distinct ones (gRPC takes up to 4 MiB) must not make the cache hold gigabytes.
MAX_PLAN_BYTES = 4096


class _Plan(NamedTuple):
    prepared: Prepared
    domain: str  # the metrics' label


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
        self._plans: dict[bytes, _Plan] = {}

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
            plan = self._plan(request)
            domain = plan.domain
            answer = await self.limiter.decide(plan.prepared)
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

    def _plan(self, request: rls_pb2.RateLimitRequest) -> _Plan:
        key = request.SerializeToString()
        plan = self._plans.get(key)
        config = self.limiter.config()
        if plan is not None and (plan.prepared.config is config or plan.prepared.config is None):
            return plan
        # As envoyproxy/ratelimit answers them: an error, not an OK that limits nothing.
        if not request.domain:
            raise InvalidRequest("rate limit domain must not be empty")
        if not request.descriptors:
            raise InvalidRequest("rate limit descriptor list must not be empty")
        asked = codec.request(request)
        plan = _Plan(self.limiter.prepare(asked), domain_label(asked.domain, config.domains))
        if len(key) <= MAX_PLAN_BYTES:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        return plan
