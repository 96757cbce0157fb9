"""The per-request processor and the access-log receiver, driven with real messages, no sockets."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from arks.api import token_digest
from arks.engine_metrics import EngineLoad
from arks.limits.backends import MemoryBackend
from arks.limits.budgets import MemoryBudgets
from arks.limits.config import RateLimitConfig
from arks.limits.limiter import Limiter
from arks.limits.metrics import RateLimitMetrics
from arks.policy import build_policy
from extproc.admission import AdmissionControl
from extproc.context import Context
from extproc.decision import Identity
from extproc.picking.service import Picking, PickSettings
from extproc.servicer import AccessLogReceiver, RequestProcessor
from extproc.settlement import expire_unreported
from tests.support import objects
from tests.support.clock import FakeClock
from tests.support.gateway import (
    MAX_AGE,
    StaticPolicy,
    Totals,
    body_message,
    charged,
    headers_message,
    log_message,
    make_context,
    sample,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ctx(clock: FakeClock) -> Context:
    return make_context(clock)


# --- ext_proc: one processor per request ------------------------------------------------------


async def test_admitted_request_is_noted_with_its_max_tokens(ctx: Context) -> None:
    response = await RequestProcessor(ctx).handle(
        headers_message({"model": "qwen", "stream": False, "max_tokens": 64})
    )

    assert response.WhichOneof("response") == "request_headers"
    (entry,) = ctx.inflight.expire(ctx.monotonic() + MAX_AGE + 1)
    assert (entry.request_id, entry.identity, entry.max_tokens) == (
        "req-1",
        Identity("default", "alice", "qwen"),
        64,
    )


async def test_body_phase_admission_keeps_the_body_max_tokens(ctx: Context) -> None:
    processor = RequestProcessor(ctx)
    asked = await processor.handle(headers_message(None))
    assert asked.HasField("mode_override")

    body = {"model": "qwen", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    response = await processor.handle(body_message(body))

    assert response.WhichOneof("response") == "request_body"
    (entry,) = ctx.inflight.expire(ctx.monotonic() + MAX_AGE + 1)
    assert entry.prompt_estimate is not None and entry.prompt_estimate > 0
    assert entry.max_tokens == 64  # what a lost access-log entry would be charged


async def test_denials_are_counted_by_status_and_code(ctx: Context) -> None:
    response = await RequestProcessor(ctx).handle(
        headers_message({"model": "qwen"}, token="sk-mallory")
    )

    assert response.immediate_response.status.code == 401
    assert (
        sample(
            ctx,
            "arks_gateway_denials_total",
            {
                "status": "401",
                "code": "invalid_api_key",
                "reason": "invalid_api_key",
                "namespace": "",
                "user": "",
                "model": "",
            },
        )
        == 1
    )
    assert len(ctx.inflight) == 0


async def test_unexpected_messages_pass_through(ctx: Context) -> None:
    processor = RequestProcessor(ctx)

    body_first = await processor.handle(body_message({"model": "qwen"}))
    response_headers = await processor.handle(
        ep.ProcessingRequest(response_headers=ep.HttpHeaders())
    )

    assert body_first.WhichOneof("response") == "request_body"
    assert not body_first.request_body.HasField("response")
    assert response_headers.WhichOneof("response") == "response_headers"
    assert len(ctx.inflight) == 0


# --- access log: usage is charged -----------------------------------------------------


async def test_access_log_entry_charges_and_strikes_off_the_request(ctx: Context) -> None:
    await RequestProcessor(ctx).handle(headers_message({"model": "qwen", "stream": False}))

    await AccessLogReceiver(ctx).record(log_message(200, prompt_tokens=12, completion_tokens=34))

    assert charged(ctx)[("default", "alice", "qwen")] == Totals(1, 12, 34, 0)
    assert len(ctx.inflight) == 0
    assert await expire_unreported(ctx) == 0


async def test_error_answers_are_counted_but_not_charged(ctx: Context) -> None:
    await AccessLogReceiver(ctx).record(log_message(500))

    assert charged(ctx) == {}
    labels = {"namespace": "default", "user": "alice", "model": "qwen", "code": "500"}
    assert sample(ctx, "arks_requests_total", labels) == 1


async def test_request_without_an_access_log_entry_is_charged_its_estimate(
    ctx: Context, clock: FakeClock
) -> None:
    await RequestProcessor(ctx).handle(
        headers_message({"model": "qwen", "stream": False, "max_tokens": 64}, content_length=400)
    )

    clock.now += MAX_AGE + 1

    assert await expire_unreported(ctx) == 1
    # the prompt as admission reserved it (400 bytes / 4; it was charged 0), and max_tokens
    assert charged(ctx)[("default", "alice", "qwen")] == Totals(1, 100, 64, 1)
    assert (
        sample(
            ctx,
            "arks_usage_unreported_requests_total",
            {"namespace": "default", "user": "alice", "model": "qwen"},
        )
        == 1
    )


async def test_in_flight_counts_a_reused_id_once_and_drops_an_expired_request(
    ctx: Context, clock: FakeClock
) -> None:
    def in_flight() -> float:
        return sample(ctx, "arks_in_flight_requests", {"namespace": "default", "model": "qwen"})

    for _ in range(2):  # the same request id twice: one request in flight
        await RequestProcessor(ctx).handle(headers_message({"model": "qwen", "max_tokens": 64}))
    assert in_flight() == 1

    clock.now += MAX_AGE + 1
    assert await expire_unreported(ctx) == 1
    assert in_flight() == 0


# --- endpoint picking: least-load and prefix-cache endpoints ----------------------------------

ENGINES = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")
DESTINATION = "x-gateway-destination-endpoint"


def picking_context(
    clock: FakeClock, weighting: str, rpm: int | None = None, fail_closed: bool = False
) -> Context:
    """A context whose `qwen` endpoint picks its engine (`weighting`); engines 2 and 3 are busy."""
    alice = objects.token("alice", ["qwen"], tokenHash=token_digest("sk-alice"))
    if rpm is not None:
        alice["spec"]["qos"][0]["rateLimits"] = [{"type": "rpm", "value": rpm}]
    qwen = objects.endpoint("qwen")
    qwen["spec"]["weighting"] = weighting
    policy = StaticPolicy(build_policy([("token", alice), ("endpoint", qwen)]))
    ctx = make_context(clock)
    metrics = ctx.metrics
    picking = Picking(PickSettings(fail_closed=fail_closed), metrics, clock=clock)
    picking.store.set_endpoints({("default", "qwen"): ENGINES})
    picking.store.observe(
        {e: EngineLoad("vllm", waiting=w) for e, w in zip(ENGINES, (0, 5, 9), strict=True)}
    )
    admission = AdmissionControl(
        limiter=Limiter(
            RateLimitConfig, MemoryBackend(), RateLimitMetrics.create(), clock=lambda: 1e9
        ),
        budgets=MemoryBudgets(),
        policy=policy,
        clock=lambda: 1e9,
    )
    return dataclasses.replace(ctx, policy=policy, admission=admission, picking=picking)


def with_client_destination(message: ep.ProcessingRequest, value: str) -> ep.ProcessingRequest:
    message.request_headers.headers.headers.append(
        base_pb2.HeaderValue(key=DESTINATION, raw_value=value.encode())
    )
    return message


def set_headers(response: ep.CommonResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in response.header_mutation.set_headers}


async def test_least_load_names_the_engine_in_header_and_envoy_lb_metadata(
    clock: FakeClock,
) -> None:
    ctx = picking_context(clock, "least-load")

    response = await RequestProcessor(ctx).handle(
        with_client_destination(headers_message({"model": "qwen"}), "6.6.6.6:80")
    )

    assert response.WhichOneof("response") == "request_headers"  # one message: no body read
    common = response.request_headers.response
    expected = ",".join(ENGINES)
    assert set_headers(common)[DESTINATION] == expected  # replaces the client's value
    assert DESTINATION in common.header_mutation.remove_headers  # Envoy removes before it sets
    lb = response.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb[DESTINATION].string_value == expected
    assert (
        response.dynamic_metadata.fields["io.arks"].struct_value.fields["user"].string_value
        == "alice"
    )
    labels = {"namespace": "default", "model": "qwen", "reason": "least_load"}
    assert sample(ctx, "arks_picks_total", labels) == 1
    assert ctx.picking is not None and len(ctx.picking.store) == 1

    await AccessLogReceiver(ctx).record(log_message(200, prompt_tokens=1, completion_tokens=1))

    assert len(ctx.picking.store) == 0  # the entry ends the pick's time in flight


async def test_prefix_cache_reads_the_body_and_picks_from_the_prompt(clock: FakeClock) -> None:
    ctx = picking_context(clock, "prefix-cache")
    processor = RequestProcessor(ctx)

    asked = await processor.handle(headers_message({"model": "qwen", "stream": False}))
    assert asked.HasField("mode_override")  # the second message this mode costs
    body = {"model": "qwen", "messages": [{"role": "system", "content": "be a pirate " * 100}]}
    response = await processor.handle(body_message(body))

    assert response.WhichOneof("response") == "request_body"
    assert set_headers(response.request_body.response)[DESTINATION].split(",")[0] == ENGINES[0]
    labels = {"namespace": "default", "model": "qwen", "reason": "prefix_miss"}
    assert sample(ctx, "arks_picks_total", labels) == 1
    assert ctx.picking is not None and len(ctx.picking.index) > 0


async def test_weighted_endpoints_get_no_destination_and_clients_cannot_set_one(
    ctx: Context,
) -> None:
    response = await RequestProcessor(ctx).handle(
        with_client_destination(headers_message({"model": "qwen"}), "6.6.6.6:80")
    )

    common = response.request_headers.response
    assert DESTINATION not in set_headers(common)
    assert DESTINATION in common.header_mutation.remove_headers
    assert set(response.dynamic_metadata.fields) == {"io.arks"}


async def test_fail_closed_refuses_before_admission_when_no_engine_can_be_picked(
    clock: FakeClock,
) -> None:
    ctx = picking_context(clock, "least-load", fail_closed=True)
    assert ctx.picking is not None
    ctx.picking.store.set_endpoints({("default", "qwen"): ("10.0.0.9:8000",)})  # not scraped yet

    response = await RequestProcessor(ctx).handle(headers_message({"model": "qwen"}))

    assert response.immediate_response.status.code == 503
    assert orjson.loads(response.immediate_response.body)["error"]["code"] == "no_backend"
    assert len(ctx.inflight) == 0  # nothing admitted, nothing to charge


async def test_fail_open_forwards_without_a_destination(clock: FakeClock) -> None:
    ctx = picking_context(clock, "least-load")
    assert ctx.picking is not None
    ctx.picking.store.set_endpoints({("default", "qwen"): ("10.0.0.9:8000",)})  # not scraped yet

    response = await RequestProcessor(ctx).handle(
        with_client_destination(headers_message({"model": "qwen"}), "6.6.6.6:80")
    )

    common = response.request_headers.response
    assert DESTINATION in common.header_mutation.remove_headers
    assert "envoy.lb" not in response.dynamic_metadata.fields
    assert (
        sample(
            ctx, "arks_picks_total", {"namespace": "default", "model": "qwen", "reason": "fallback"}
        )
        == 1
    )


async def test_a_pick_refused_by_rate_limits_is_released(clock: FakeClock) -> None:
    ctx = picking_context(clock, "least-load", rpm=1)
    assert ctx.picking is not None

    first = await RequestProcessor(ctx).handle(headers_message({"model": "qwen"}, request_id="r1"))
    second = await RequestProcessor(ctx).handle(headers_message({"model": "qwen"}, request_id="r2"))

    assert first.WhichOneof("response") == "request_headers"
    assert second.immediate_response.status.code == 429
    assert len(ctx.picking.store) == 1  # only the admitted one is in flight
