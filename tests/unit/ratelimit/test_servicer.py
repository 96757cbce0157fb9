"""The servicer keeps each request it has worked out (by its bytes); a configuration swapped in
since must still decide it."""

from __future__ import annotations

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common
from envoy.service.ratelimit.v3 import rls_pb2

from arks.limits.backends import MemoryBackend
from arks.limits.config import RateLimitConfig, parse_config
from arks.limits.decision import DescriptorRequest, LimitRequest
from arks.limits.limiter import Limiter
from arks.limits.metrics import RateLimitMetrics
from ratelimit.metrics import CallMetrics
from ratelimit.servicer import RateLimitService

NOW = 1_700_000_010.0
OK, OVER = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT


def config(per_minute: int) -> RateLimitConfig:
    limit = {"unit": "minute", "requests_per_unit": per_minute}
    return parse_config(
        [("inline", {"domain": "d", "descriptors": [{"key": "user", "rate_limit": limit}]})]
    )


def request() -> rls_pb2.RateLimitRequest:  # a new message each time, as gRPC hands them over
    entry = common.RateLimitDescriptor.Entry(key="user", value="a")
    return rls_pb2.RateLimitRequest(
        domain="d", descriptors=[common.RateLimitDescriptor(entries=[entry])]
    )


async def test_a_configuration_swapped_in_decides_a_request_already_asked() -> None:
    current = [config(10)]
    metrics = RateLimitMetrics.create()
    limiter = Limiter(lambda: current[0], MemoryBackend(), metrics, lambda: NOW)
    service = RateLimitService(limiter, CallMetrics.create(metrics.registry))
    first = await service.answer(request())
    assert first.overall_code == OK and first.statuses[0].current_limit.requests_per_unit == 10
    current[0] = config(1)  # a reload: a new snapshot, the counter already at 1
    second = await service.answer(request())
    assert second.overall_code == OVER and second.statuses[0].current_limit.requests_per_unit == 1
    current[0] = parse_config([])  # the domain gone: no limit, nothing counted
    third = await service.answer(request())
    assert third.overall_code == OK and not third.statuses[0].HasField("current_limit")


async def test_a_request_prepared_under_an_old_configuration_is_decided_under_the_new() -> None:
    current = [config(10)]
    limiter = Limiter(lambda: current[0], MemoryBackend(), RateLimitMetrics.create(), lambda: NOW)
    prepared = limiter.prepare(LimitRequest("d", (DescriptorRequest((("user", "a"),)),)))
    current[0] = config(0)
    decided = await limiter.decide(prepared)
    assert decided.over_limit and decided.statuses[0].limit is not None
    assert decided.statuses[0].limit.requests_per_unit == 0


async def test_large_requests_are_decided_but_never_kept() -> None:
    """The plans are kept by the request's bytes: a client sending large distinct requests
    (gRPC takes up to 4 MiB each) must not make the cache hold gigabytes."""
    metrics = RateLimitMetrics.create()
    limiter = Limiter(lambda: config(2), MemoryBackend(), metrics, lambda: NOW)
    service = RateLimitService(limiter, CallMetrics.create(metrics.registry))
    large = rls_pb2.RateLimitRequest(
        domain="d",
        descriptors=[
            common.RateLimitDescriptor(
                entries=[common.RateLimitDescriptor.Entry(key="user", value="x" * 5000)]
            )
        ],
    )
    codes = [(await service.answer(large)).overall_code for _ in range(3)]
    assert codes == [OK, OK, OVER]  # decided as any other
    assert not service._plans
    await service.answer(request())
    assert len(service._plans) == 1  # a small one is kept
