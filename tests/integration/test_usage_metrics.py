"""Cost, budget and rate-limit gauges and the gateway's decision latency on its /metrics, through
real Envoy, the real openai client and simulated engines, with the budgets in memory and in the
real Redis; and every service's scraped metrics against the cardinality rules."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from arks.api import token_digest
from arks.metric_rules import declared_in_families, violations
from tests.support.objects import token
from tests.support.redis_server import SHARED_REDIS
from tests.support.stack import Stack, running_stack
from tests.support.waiting import wait_for

PRICED = "sk-arks-test-usage-priced-01"
INPUT, OUTPUT = 0.15, 0.6  # per million tokens
RPM, TPM, SLOTS = 50, 100_000, 4


def documents(suffix: str) -> list[dict]:
    priced = token(f"priced-{suffix}", ["model-a"], tokenHash=token_digest(PRICED))
    grant = priced["spec"]["qos"][0]
    grant["quota"] = {"name": f"budget-{suffix}"}
    grant["rateLimits"] = [
        {"type": "rpm", "value": RPM},
        {"type": "tpm", "value": TPM},
        {"type": "concurrency", "value": SLOTS},
    ]
    budget = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksQuota",
        "metadata": {"name": f"budget-{suffix}", "namespace": "default"},
        "spec": {
            "quotas": [
                {"type": "cost", "value": 5, "period": "month"},
                {"type": "total", "value": 1_000_000, "period": "none"},
            ],
            "prices": [{"model": "model-a", "input": INPUT, "output": OUTPUT}],
        },
    }
    return [budget, priced]


@pytest.fixture(scope="module", params=["memory", "redis"])
def usage_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    suffix = uuid.uuid4().hex[:6]
    redis = SHARED_REDIS if request.param == "redis" else None
    tmp = tmp_path_factory.mktemp(f"usage-{request.param}")
    with running_stack(tmp, documents(suffix), redis=redis) as running:
        running.suffix = suffix  # type: ignore[attr-defined]
        yield running


def test_cost_budgets_and_remaining_limits_follow_the_engines_usage(usage_stack: Stack) -> None:
    stack, suffix = usage_stack, usage_stack.suffix  # type: ignore[attr-defined]
    user = f"priced-{suffix}"
    client = stack.client(PRICED)
    prompt = completion = 0
    for tokens in (7, 13, 21):
        answer = client.chat.completions.create(
            model="model-a",
            messages=[{"role": "user", "content": "What does a lighthouse keeper do?"}],
            max_tokens=50,
            extra_headers={"x-sim-output-tokens": str(tokens)},
        )
        assert answer.usage is not None
        prompt += answer.usage.prompt_tokens
        completion += answer.usage.completion_tokens
    assert completion == 7 + 13 + 21
    stack.usage(user, "model-a")  # every request settled

    who = {"namespace": "default", "user": user, "model": "model-a"}
    cost = stack.metric("arks_usage_cost_total", **who)
    assert math.isclose(cost, (prompt * INPUT + completion * OUTPUT) / 1e6, rel_tol=1e-12)

    # The gauges come from the snapshot timer (0.5 s here): wait for the settled figures.
    money = {"namespace": "default", "quota": f"budget-{suffix}", "type": "cost", "period": "month"}
    spent = math.ceil(prompt * INPUT + completion * OUTPUT)  # the budget's micro-units, rounded up
    wait_for(
        lambda: stack.metric("arks_quota_used", **money), lambda v: v == spent / 1e6, timeout=10
    )
    m = stack.metrics()

    def gauge(name: str, **labels: str) -> float | None:
        return m.get((name, tuple(sorted(labels.items()))))

    assert gauge("arks_quota_reserved", **money) == 0.0  # nothing in flight
    assert gauge("arks_quota_limit", **money) == 5.0
    now = datetime.now(UTC)
    next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    assert gauge("arks_quota_reset_timestamp_seconds", **money) == next_month.timestamp()
    tokens = {**money, "type": "total", "period": "none"}
    assert gauge("arks_quota_used", **tokens) == prompt + completion
    assert gauge("arks_quota_reset_timestamp_seconds", **tokens) is None

    left = {**who, "limit": "rpm"}
    assert gauge("arks_rate_limit_limit", **left) == RPM
    assert gauge("arks_rate_limit_remaining", **left) in (RPM - 3, RPM)  # a minute may turn
    assert gauge("arks_rate_limit_remaining", **who, limit="concurrency") == SLOTS
    tpm = gauge("arks_rate_limit_remaining", **who, limit="tpm")
    assert tpm in (TPM - prompt - completion, TPM)
    assert gauge("arks_rate_limit_limit", **who, limit="rpd") is None  # not configured

    # Decision latency: every request's headers, admission and settlement were timed.
    for phase in ("headers", "admission", "settlement"):
        assert (gauge("arks_gateway_decision_seconds_count", phase=phase) or 0) >= 3


def test_a_deleted_token_and_quota_disappear_from_the_gauges(usage_stack: Stack) -> None:
    stack, suffix = usage_stack, usage_stack.suffix  # type: ignore[attr-defined]
    who = {"namespace": "default", "user": f"priced-{suffix}", "model": "model-a", "limit": "rpm"}
    money = {"namespace": "default", "quota": f"budget-{suffix}", "type": "cost", "period": "month"}
    wait_for(lambda: stack.metric("arks_rate_limit_limit", **who), lambda v: v == RPM, timeout=10)
    kept = [
        d for d in stack.documents if d["metadata"]["name"] not in (who["user"], money["quota"])
    ]
    stack.write_policy(kept)

    def present() -> tuple[bool, bool]:
        m = stack.metrics()
        return (
            ("arks_rate_limit_limit", tuple(sorted(who.items()))) in m,
            ("arks_quota_limit", tuple(sorted(money.items()))) in m,
        )

    assert wait_for(present, lambda p: p == (False, False), timeout=10) == (False, False)


def test_every_services_scraped_metrics_keep_the_cardinality_rules(usage_stack: Stack) -> None:
    stack = usage_stack
    for url in (stack.local.metrics_url, f"{stack.local.controller_url}/metrics"):
        text = httpx.get(url, timeout=5).text
        found = declared_in_families(text_string_to_metric_families(text))
        assert len(found) > 10
        assert violations(found) == [], url
