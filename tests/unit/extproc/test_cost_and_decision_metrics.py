"""The cost counter and the decision-latency histogram, driven through the real processor and
access-log receiver over in-memory stores (no sockets)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from arks.api import ArksQuota, ObjectKey, Price, QuotaItem, token_digest
from arks.policy import build_policy
from extproc.context import Context
from extproc.decision import Identity
from extproc.metrics import PHASES, GatewayMetrics
from extproc.quota import currency_cost, price_for
from extproc.reservation import Reservation
from extproc.servicer import AccessLogReceiver, RequestProcessor
from extproc.settlement import QuotaCharge, expire_unreported, quota_charge
from tests.support import objects
from tests.support.clock import FakeClock
from tests.support.gateway import MAX_AGE, StaticPolicy, headers_message, log_message, make_context

PRICES = [
    {"model": "qwen", "input": 0.15, "output": 0.6},
    {"model": "*", "input": 1, "output": 2},
]


def priced_context(clock: FakeClock, prices: list[dict[str, object]] = PRICES) -> Context:
    alice = objects.token("alice", ["qwen"], tokenHash=token_digest("sk-alice"))
    alice["spec"]["qos"][0]["quota"] = {"name": "team"}
    team = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksQuota",
        "metadata": {"name": "team", "namespace": "default"},
        "spec": {"quotas": [{"type": "total", "value": 10**9, "period": "day"}], "prices": prices},
    }
    policy = StaticPolicy(
        build_policy([("t", alice), ("e", objects.endpoint("qwen")), ("q", team)])
    )
    ctx = make_context(clock)
    return dataclasses.replace(
        ctx, policy=policy, admission=dataclasses.replace(ctx.admission, policy=policy)
    )


def test_a_cost_is_exact_in_the_currency_of_the_price_table() -> None:
    quota = ArksQuota(
        ObjectKey("default", "team"),
        (QuotaItem("cost", 10, "month"),),
        (Price("qwen", 0.15, 0.6), Price("*", 1, 2)),
    )
    qwen, other = price_for(quota, "qwen"), price_for(quota, "other")
    assert qwen is not None and other is not None
    assert currency_cost(1234, 567, qwen) == (1234 * 0.15 + 567 * 0.6) / 1e6
    assert currency_cost(10, 20, other) == (10 * 1 + 20 * 2) / 1e6  # the "*" price
    assert price_for(dataclasses.replace(quota, prices=()), "qwen") is None


def test_a_cost_applies_only_through_the_quota_the_admission_reserved_against() -> None:
    team = ArksQuota(ObjectKey("default", "team"), (), (Price("qwen", 2, 4),))
    policy = build_policy([])
    policy = dataclasses.replace(policy, quotas={team.key: team})
    who = Identity("default", "alice", "qwen")
    assert quota_charge(policy, who, Reservation(1.0, "team"), 100, 50) == QuotaCharge(
        "default/team", 1.0, 400 / 1e6, 400
    )
    assert quota_charge(policy, who, Reservation(1.0, None), 100, 50) is None  # no quota
    assert quota_charge(policy, who, None, 100, 50) is None
    assert quota_charge(policy, who, Reservation(1.0, "deleted"), 100, 50) is None


async def test_settlement_counts_the_engine_reported_usages_cost() -> None:
    ctx = priced_context(FakeClock())
    await RequestProcessor(ctx).handle(headers_message({"model": "qwen", "max_tokens": 64}))
    reservation = {"admitted_at": 1e9, "quota": "team"}
    log = log_message(200, prompt_tokens=1234, completion_tokens=567, **reservation)
    await AccessLogReceiver(ctx).record(log)
    labels = {"namespace": "default", "user": "alice", "model": "qwen"}
    expected = (1234 * 0.15 + 567 * 0.6) / 1e6
    assert ctx.metrics.registry.get_sample_value("arks_usage_cost_total", labels) == expected


async def test_an_unreported_request_costs_what_it_was_charged() -> None:
    clock = FakeClock()
    ctx = priced_context(clock)
    await RequestProcessor(ctx).handle(
        headers_message({"model": "qwen", "max_tokens": 64}, content_length=400)
    )
    clock.advance(MAX_AGE + 1)
    assert await expire_unreported(ctx) == 1
    labels = {"namespace": "default", "user": "alice", "model": "qwen"}
    get = ctx.metrics.registry.get_sample_value
    prompt = get("arks_usage_tokens_total", {**labels, "type": "prompt"})
    completion = get("arks_usage_tokens_total", {**labels, "type": "completion"})
    assert (prompt, completion) == (100, 64)  # the estimate: 400 bytes, max_tokens
    assert get("arks_usage_cost_total", labels) == (100 * 0.15 + 64 * 0.6) / 1e6


async def test_no_price_no_cost_series() -> None:
    ctx = priced_context(FakeClock(), prices=[])
    await RequestProcessor(ctx).handle(headers_message({"model": "qwen", "max_tokens": 64}))
    log = log_message(200, prompt_tokens=10, completion_tokens=5, admitted_at=1e9, quota="team")
    await AccessLogReceiver(ctx).record(log)
    labels = {"namespace": "default", "user": "alice", "model": "qwen"}
    assert ctx.metrics.registry.get_sample_value("arks_usage_cost_total", labels) is None


async def test_each_phase_is_timed_once_per_message_admission_and_entry() -> None:
    ticks = itertools.count()
    ctx = dataclasses.replace(make_context(FakeClock()), timer=lambda: next(ticks) * 1e-4)
    await RequestProcessor(ctx).handle(headers_message({"model": "qwen", "max_tokens": 64}))
    await AccessLogReceiver(ctx).record(log_message(200, prompt_tokens=10, completion_tokens=5))

    def observed(phase: str) -> tuple[float | None, float | None]:
        get = ctx.metrics.registry.get_sample_value
        return (
            get("arks_gateway_decision_seconds_count", {"phase": phase}),
            get("arks_gateway_decision_seconds_sum", {"phase": phase}),
        )

    # The headers message reads the timer at its start and end, admission twice within it.
    assert observed("admission") == (1.0, pytest.approx(1e-4))
    assert observed("headers") == (1.0, pytest.approx(3e-4))
    # An entry's own work (two reads) plus its share of its batch's settlement (two reads).
    assert observed("settlement") == (1.0, pytest.approx(2e-4))


def test_every_phase_exists_at_zero_from_the_start() -> None:
    metrics = GatewayMetrics.create()
    for phase in PHASES:
        labels = {"phase": phase}
        assert metrics.registry.get_sample_value("arks_gateway_decision_seconds_count", labels) == 0
    bounds = metrics.decision_seconds._upper_bounds
    assert bounds[0] == 1e-5 and bounds[-2] == 1.0  # 10 µs to 1 s, then +Inf
