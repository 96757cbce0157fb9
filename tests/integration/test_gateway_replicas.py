"""Several gateway replicas share Redis: a request admitted by one and reported to another is
charged once, by the one that got its usage; a request reported nowhere is still charged."""

from __future__ import annotations

import pytest

from extproc.context import Context
from extproc.inflight import FIRST_CHECK_S
from extproc.reported import RedisReported
from extproc.servicer import AccessLogReceiver, RequestProcessor
from extproc.settlement import expire_unreported, release_reported_elsewhere
from launcher.procs import free_port
from tests.support.clock import FakeClock
from tests.support.gateway import (
    MAX_AGE,
    Totals,
    charged,
    headers_message,
    log_message,
    make_context,
    sample,
)
from tests.support.redis_server import SHARED_REDIS, fresh_prefix

ALICE = ("default", "alice", "qwen")

pytestmark = pytest.mark.timeout(30)


def totals(ctx: Context) -> Totals | None:
    return charged(ctx).get(ALICE)


async def admit(ctx: Context, request_id: str) -> None:
    facts = {"model": "qwen", "stream": False, "max_tokens": 64}
    await RequestProcessor(ctx).handle(headers_message(facts, request_id=request_id))


async def test_a_request_reported_to_another_replica_is_charged_once() -> None:
    async with fresh_prefix("reported") as prefix:
        clock_a, clock_b = FakeClock(), FakeClock()
        a = make_context(clock_a, RedisReported(SHARED_REDIS, ttl_s=2 * MAX_AGE, prefix=prefix))
        b = make_context(clock_b, RedisReported(SHARED_REDIS, ttl_s=2 * MAX_AGE, prefix=prefix))
        await admit(a, "req-elsewhere")
        await admit(a, "req-lost")  # its entry never reaches any replica

        await AccessLogReceiver(b).record(
            log_message(200, request_id="req-elsewhere", prompt_tokens=12, completion_tokens=34)
        )
        assert totals(b) == Totals(1, 12, 34, 0)

        clock_a.now += MAX_AGE + 1
        assert await expire_unreported(a) == 1  # only req-lost
        assert totals(a) == Totals(1, 0, 64, 1)
        assert sample(a, "arks_usage_reported_elsewhere_requests_total") == 1
        assert len(a.inflight) == 0


async def test_a_request_charged_elsewhere_stops_being_in_flight_within_seconds() -> None:
    """Not after the longest answer: until then it held memory, the in-flight gauge, its lease
    renewals and its engine pick on the replica that admitted it."""
    async with fresh_prefix("reported") as prefix:
        clock_a, clock_b = FakeClock(), FakeClock()
        a = make_context(clock_a, RedisReported(SHARED_REDIS, ttl_s=2 * MAX_AGE, prefix=prefix))
        b = make_context(clock_b, RedisReported(SHARED_REDIS, ttl_s=2 * MAX_AGE, prefix=prefix))
        await admit(a, "req-elsewhere")
        await admit(a, "req-long")  # still running: its entry comes later
        in_flight = {"namespace": "default", "model": "qwen"}
        assert sample(a, "arks_in_flight_requests", in_flight) == 2

        await AccessLogReceiver(b).record(
            log_message(200, request_id="req-elsewhere", prompt_tokens=12, completion_tokens=34)
        )
        assert await release_reported_elsewhere(a) == 0  # not due yet: entries take a moment
        clock_a.now += FIRST_CHECK_S
        assert await release_reported_elsewhere(a) == 1
        assert len(a.inflight) == 1 and "req-elsewhere" not in a.admission.held
        assert sample(a, "arks_in_flight_requests", in_flight) == 1
        assert sample(a, "arks_usage_reported_elsewhere_requests_total") == 1

        # The long one is looked at again later and further apart, and released once reported.
        clock_a.now += FIRST_CHECK_S
        assert await release_reported_elsewhere(a) == 0  # next look: 4 s after the first
        await AccessLogReceiver(b).record(
            log_message(200, request_id="req-long", prompt_tokens=1, completion_tokens=2)
        )
        clock_a.now += 2 * FIRST_CHECK_S
        assert await release_reported_elsewhere(a) == 1
        assert len(a.inflight) == 0 and sample(a, "arks_in_flight_requests", in_flight) == 0
        clock_a.now += MAX_AGE + 1
        assert await expire_unreported(a) == 0  # nothing charged twice
        assert totals(a) is None and totals(b) == Totals(2, 13, 36, 0)


async def test_without_the_shared_store_an_unreported_request_is_still_charged() -> None:
    clock = FakeClock()
    down = RedisReported(f"redis://127.0.0.1:{free_port()}/0", ttl_s=2 * MAX_AGE, timeout_s=0.2)
    a = make_context(clock, down)
    await admit(a, "req-1")
    await AccessLogReceiver(a).record(
        log_message(200, request_id="someone-elses", prompt_tokens=1, completion_tokens=1)
    )
    clock.now += MAX_AGE + 1
    assert await expire_unreported(a) == 1
    assert totals(a) == Totals(2, 1, 65, 1)
