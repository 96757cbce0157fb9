"""The budget and rate-limit gauges: what the snapshot timer shows for each quota item and each
configured token limit, read from the real memory stores after real admissions."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from arks.api import token_digest
from arks.limits.backends import MemoryBackend
from arks.limits.budgets import Level, MemoryBudgets
from arks.limits.config import RateLimitConfig
from arks.limits.limiter import Limiter
from arks.limits.metrics import RateLimitMetrics
from arks.policy import Policy, build_policy
from arks.wire import METADATA_NAMESPACE
from extproc import levels
from extproc.admission import AdmissionControl
from extproc.decision import Forward, Identity
from extproc.gateway import decide_headers
from extproc.levels import LevelGauges, Levels, TokenLimit
from extproc.request import BodyFacts, RequestInfo
from tests.support import objects

NOW = datetime(2026, 11, 27, 15, 30, 10, tzinfo=UTC)  # a Friday


class Source:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def current(self) -> Policy:
        return self.policy


def team_policy(*, with_bob: bool = True) -> Policy:
    alice = objects.token("alice", ["qwen", "ghost"], tokenHash=token_digest("sk-a"))
    grant = alice["spec"]["qos"][0]
    grant["quota"] = {"name": "team"}
    grant["rateLimits"] = [
        {"type": "rpm", "value": 5},
        {"type": "tpm", "value": 1000},
        {"type": "concurrency", "value": 3},
    ]
    alice["spec"]["qos"][1]["rateLimits"] = [{"type": "rpm", "value": 9}]  # ghost: no endpoint
    bob = objects.token("bob", ["qwen"], tokenHash=token_digest("sk-b"))
    bob["spec"]["qos"][0]["rateLimits"] = [{"type": "rpd", "value": 50}]
    off = objects.token("off", ["qwen"], tokenHash=token_digest("sk-off"), disabled=True)
    off["spec"]["qos"][0]["rateLimits"] = [{"type": "rpm", "value": 1}]
    team = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksQuota",
        "metadata": {"name": "team"},
        "spec": {
            "quotas": [
                {"type": "cost", "value": 2.5, "period": "month"},
                {"type": "total", "value": 10000, "period": "none"},
            ],
            "prices": [{"model": "qwen", "input": 10, "output": 30}],
        },
    }
    docs = [("a", alice), ("o", off), ("e", objects.endpoint("qwen")), ("q", team)]
    if with_bob:
        docs.append(("b", bob))
    return build_policy(docs)


def test_every_configured_limit_of_a_usable_token_for_an_existing_model_is_listed() -> None:
    found = {limit.labels: limit.value for limit in levels.token_limits(team_policy(), NOW)}
    assert found == {
        ("default", "alice", "qwen", "rpm"): 5,
        ("default", "alice", "qwen", "tpm"): 1000,
        ("default", "alice", "qwen", "concurrency"): 3,
        ("default", "bob", "qwen", "rpd"): 50,
    }  # not the ghost model's, nor the disabled token's


def test_what_is_left_of_each_kind_of_limit() -> None:
    who = Identity("default", "alice", "qwen")
    assert levels.remaining(TokenLimit(who, "rpm", 5), None, 2) == 2
    assert levels.remaining(TokenLimit(who, "rpm", 5), None, None) == 5  # never counted
    assert levels.remaining(TokenLimit(who, "tpm", 100), Level(30, 50), None) == 20
    assert levels.remaining(TokenLimit(who, "tpm", 100), Level(90, 50), None) == 0  # overshoot
    assert levels.remaining(TokenLimit(who, "concurrency", 3), Level(0, 2), None) == 1


async def test_the_gauges_show_used_reserved_limit_reset_and_remaining() -> None:
    policy = team_policy()
    clock = NOW.timestamp
    budgets, counters = MemoryBudgets(), MemoryBackend()
    limiter = Limiter(RateLimitConfig, counters, RateLimitMetrics.create(), clock=clock)
    admission = AdmissionControl(limiter, budgets, Source(policy), clock, default_max_tokens=40)

    def request(rid: str) -> tuple[RequestInfo, Forward]:
        info = RequestInfo(
            "POST",
            "/v1/chat/completions",
            {"authorization": "Bearer sk-a", "x-request-id": rid, "content-length": "40"},
            BodyFacts(model="qwen", max_tokens=100),
        )
        decision = decide_headers(info, policy, NOW)
        assert isinstance(decision, Forward)
        return info, decision

    # One request finished (200 prompt + 100 completion tokens), one still in flight.
    info, decision = request("r1")
    done = await admission.admit(info, decision)
    assert isinstance(done, Forward)
    ours = done.metadata[METADATA_NAMESPACE]
    await admission.settle("r1", done.identity, done.reservation, ours["limits"], 200, 100)
    info, decision = request("r2")
    assert isinstance(await admission.admit(info, decision), Forward)

    registry = CollectorRegistry()
    refresh = Levels(LevelGauges(registry), budgets, counters)
    reads = await refresh.refresh(policy, {}, clock())
    assert reads == 2  # one budget read (4 budgets), one counter read (2 counters)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    cost = {"namespace": "default", "quota": "team", "type": "cost", "period": "month"}
    # 200 x 10 + 100 x 30 per million tokens = 0.005; r2 reserves 10 + 100 tokens' worth.
    assert value("arks_quota_used", **cost) == 0.005
    assert value("arks_quota_reserved", **cost) == (10 * 10 + 100 * 30) / 1e6
    assert value("arks_quota_limit", **cost) == 2.5
    assert (
        value("arks_quota_reset_timestamp_seconds", **cost)
        == datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    )
    total = {**cost, "type": "total", "period": "none"}
    assert value("arks_quota_used", **total) == 300
    assert value("arks_quota_limit", **total) == 10000
    assert value("arks_quota_reset_timestamp_seconds", **total) is None  # a period that never ends

    alice = {"namespace": "default", "user": "alice", "model": "qwen"}
    assert value("arks_rate_limit_remaining", **alice, limit="rpm") == 3  # two admitted
    assert value("arks_rate_limit_limit", **alice, limit="rpm") == 5
    assert value("arks_rate_limit_remaining", **alice, limit="tpm") == 1000 - 300 - 110
    assert value("arks_rate_limit_remaining", **alice, limit="concurrency") == 2
    bob = {"namespace": "default", "user": "bob", "model": "qwen", "limit": "rpd"}
    assert value("arks_rate_limit_remaining", **bob) == 50

    # Reading counted nothing: the rpm allowance is what it was.
    await refresh.refresh(policy, {}, clock())
    assert value("arks_rate_limit_remaining", **alice, limit="rpm") == 3

    # A deleted token's series are gone at the next refresh.
    await refresh.refresh(team_policy(with_bob=False), {}, clock())
    assert value("arks_rate_limit_remaining", **bob) is None
    assert value("arks_rate_limit_limit", **bob) is None


async def test_the_snapshot_wins_when_the_store_lost_a_total() -> None:
    policy = team_policy()
    registry = CollectorRegistry()
    refresh = Levels(LevelGauges(registry), MemoryBudgets(), MemoryBackend())
    [period] = [p for p in levels.quota_periods(policy, NOW) if p.labels[2] == "total"]
    await refresh.refresh(policy, {period.key: 1234}, NOW.timestamp())
    labels = {"namespace": "default", "quota": "team", "type": "total", "period": "none"}
    assert registry.get_sample_value("arks_quota_used", labels) == 1234
