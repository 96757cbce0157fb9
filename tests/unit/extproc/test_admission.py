"""AdmissionControl and settlement with a controlled clock: windows and periods turn, reservations hold."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime

import pytest

from arks.api import ObjectKey, token_digest
from arks.limits.backends import MemoryBackend
from arks.limits.budgets import MemoryBudgets
from arks.limits.config import RateLimitConfig
from arks.limits.limiter import Limiter
from arks.limits.metrics import RateLimitMetrics
from arks.policy import Policy, build_policy
from arks.wire import METADATA_NAMESPACE
from extproc import qos, quota
from extproc.admission import AdmissionControl
from extproc.decision import Deny, Forward
from extproc.gateway import decide_headers
from extproc.request import BodyFacts, RequestInfo
from tests.support import objects

DAY_END = datetime(2026, 11, 27, 23, 59, 30, tzinfo=UTC).timestamp()


class Source:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def current(self) -> Policy:
        return self.policy


def setup(**rate_limits: int) -> tuple[AdmissionControl, Policy, list[float]]:
    alice = objects.token("alice", ["qwen"], tokenHash=token_digest("sk-a"))
    alice["spec"]["qos"][0]["quota"] = {"name": "team"}
    alice["spec"]["qos"][0]["rateLimits"] = [
        {"type": k, "value": v} for k, v in rate_limits.items()
    ]
    team = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksQuota",
        "metadata": {"name": "team"},
        "spec": {"quotas": [{"type": "total", "value": 100, "period": "day"}]},
    }
    policy = build_policy([("t", alice), ("e", objects.endpoint("qwen")), ("q", team)])
    now = [DAY_END]
    clock = lambda: now[0]  # noqa: E731
    limiter = Limiter(RateLimitConfig, MemoryBackend(), RateLimitMetrics.create(), clock=clock)
    return (
        AdmissionControl(limiter, MemoryBudgets(), Source(policy), clock, default_max_tokens=40),
        policy,
        now,
    )


def request(policy: Policy, request_id: str, max_tokens: int = 40) -> tuple[RequestInfo, Forward]:
    info = RequestInfo(
        "POST",
        "/v1/chat/completions",
        {"authorization": "Bearer sk-a", "x-request-id": request_id, "content-length": "40"},
        BodyFacts(model="qwen", max_tokens=max_tokens),
    )
    decision = decide_headers(info, policy, datetime.fromtimestamp(DAY_END, UTC))
    assert isinstance(decision, Forward)
    return info, decision


async def admit_and_settle(
    admission: AdmissionControl, policy: Policy, rid: str, tokens: int
) -> bool:
    info, decision = request(policy, rid)
    admitted = await admission.admit(info, decision)
    if isinstance(admitted, Deny):
        return False
    ours = admitted.metadata[METADATA_NAMESPACE]
    await admission.settle(
        rid,
        admitted.identity,
        admitted.reservation,
        ours.get("limits", {}),
        10,
        tokens - 10,
    )
    return True


async def test_a_daily_quota_resets_at_midnight_utc() -> None:
    admission, policy, now = setup()
    assert await admit_and_settle(admission, policy, "r1", 45)
    assert await admit_and_settle(
        admission, policy, "r2", 45
    )  # 90 used; 50 reserved would pass 100
    info, decision = request(policy, "r3")
    refused = await admission.admit(info, decision)
    assert isinstance(refused, Deny) and refused.code == "insufficient_quota"
    assert dict(refused.headers)["retry-after"] == "30"  # until midnight
    now[0] += 30  # midnight: a new day, a new budget
    assert await admit_and_settle(admission, policy, "r3", 45)


async def test_all_budgets_are_leased_at_once_and_the_tightest_binds() -> None:
    admission, policy, now = setup(tpm=1000)
    now[0] = 1_800_000_000.0  # the start of a minute
    infos = [request(policy, f"c{i}") for i in range(100)]
    admitted = await asyncio.gather(*(admission.admit(info, d) for info, d in infos))
    winners = [a for a in admitted if isinstance(a, Forward)]
    # each reserves 10 (prompt, from the body size) + 40 (max_tokens) = 50 tokens on the minute's
    # tpm budget (1000) and on the day's quota (100): the quota binds, and nothing is half-taken
    assert len(winners) == 100 // 50
    for i, winner in enumerate(winners):
        ours = winner.metadata[METADATA_NAMESPACE]
        await admission.settle(f"c{i}", winner.identity, winner.reservation, ours["limits"], 10, 40)


@pytest.mark.parametrize(
    ("endpoint_max", "request_max", "admitted"),
    [
        (None, None, 100 // (10 + 40)),  # the gateway's default (40) per answer
        (20, None, 100 // (10 + 20)),  # the endpoint's maxTokens per answer
        (20, 1000, 100 // (10 + 20)),  # a larger max_tokens is capped to it
        (90, None, 100 // (10 + 90)),  # a context larger than the default is reserved whole
        (90, 30, 100 // (10 + 30)),  # the request's own smaller max_tokens wins
    ],
)
async def test_an_answer_is_reserved_up_to_the_endpoints_max_tokens(
    endpoint_max: int | None, request_max: int | None, admitted: int
) -> None:
    admission, _, now = setup()
    alice = objects.token("alice", ["qwen"], tokenHash=token_digest("sk-a"))
    alice["spec"]["qos"][0]["quota"] = {"name": "team"}
    team = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksQuota",
        "metadata": {"name": "team"},
        "spec": {"quotas": [{"type": "total", "value": 100, "period": "day"}]},
    }
    qwen = objects.endpoint("qwen", max_tokens=endpoint_max)
    policy = build_policy([("t", alice), ("e", qwen), ("q", team)])
    admission.policy = Source(policy)
    infos = []
    for i in range(10):
        info = RequestInfo(
            "POST",
            "/v1/chat/completions",
            {"authorization": "Bearer sk-a", "x-request-id": f"m{i}", "content-length": "40"},
            BodyFacts(model="qwen", max_tokens=request_max),
        )
        decision = decide_headers(info, policy, datetime.fromtimestamp(now[0], UTC))
        assert isinstance(decision, Forward)
        infos.append((info, decision))
    results = await asyncio.gather(*(admission.admit(info, d) for info, d in infos))
    assert sum(isinstance(r, Forward) for r in results) == admitted


async def test_tpm_alone_admits_what_fits_and_settles_real_costs() -> None:
    admission, policy, now = setup(tpm=1000)
    admission.policy = Source(
        build_policy(
            [
                (
                    "t",
                    {
                        **objects.token("alice", ["qwen"], tokenHash=token_digest("sk-a")),
                        "spec": {
                            "tokenHash": token_digest("sk-a"),
                            "qos": [
                                {
                                    "arksEndpoint": {"name": "qwen"},
                                    "rateLimits": [{"type": "tpm", "value": 1000}],
                                }
                            ],
                        },
                    },
                ),
                ("e", objects.endpoint("qwen")),
            ]
        )
    )
    policy = admission.policy.current()
    now[0] = 1_800_000_000.0
    infos = [request(policy, f"c{i}") for i in range(100)]
    admitted = await asyncio.gather(*(admission.admit(info, d) for info, d in infos))
    winners = [(i, a) for i, a in enumerate(admitted) if isinstance(a, Forward)]
    assert len(winners) == 1000 // 50  # reservations of 50 fill the minute exactly
    await asyncio.gather(
        *(
            admission.settle(
                f"c{i}",
                a.identity,
                a.reservation,
                a.metadata[METADATA_NAMESPACE]["limits"],
                10,
                30,
            )
            for i, a in winners
        )
    )
    used = await admission.budgets.used([f"tpm/default/alice/qwen/{int(now[0]) // 60 * 60}"])
    assert list(used.values()) == [40 * len(winners)]  # real costs replaced the reservations
    now[0] += 60  # the next minute
    info, decision = request(policy, "late")
    assert isinstance(await admission.admit(info, decision), Forward)


# --- a refused request charges nothing, whichever check refused it -----------------------------


async def admit(admission: AdmissionControl, policy: Policy, rid: str) -> Forward | Deny:
    info, decision = request(policy, rid, max_tokens=1)
    admitted = await admission.admit(info, decision)
    assert isinstance(admitted, Forward | Deny)
    return admitted


async def settle(admission: AdmissionControl, admitted: Forward, rid: str) -> None:
    ours = admitted.metadata[METADATA_NAMESPACE]
    await admission.settle(
        rid, admitted.identity, admitted.reservation, ours.get("limits", {}), 1, 1
    )


async def test_requests_refused_for_concurrency_do_not_use_up_rpm() -> None:
    admission, policy, now = setup(rpm=3, concurrency=1)
    now[0] = 1_800_000_000.0  # the start of a minute
    first = await admit(admission, policy, "r1")
    assert isinstance(first, Forward)
    for i in range(20):  # all refused while r1 runs: none may count against rpm
        refused = await admit(admission, policy, f"busy{i}")
        assert isinstance(refused, Deny) and "concurrent" in refused.message
    await settle(admission, first, "r1")
    for rid in ("r2", "r3"):  # rpm 3: two more fit in this minute
        admitted = await admit(admission, policy, rid)
        assert isinstance(admitted, Forward), admitted
        await settle(admission, admitted, rid)
    over = await admit(admission, policy, "r4")
    assert isinstance(over, Deny) and over.code == "rate_limit_exceeded"
    assert "per minute" in over.message or "ratelimit-limit" in dict(over.headers)


async def test_a_request_refused_by_rpm_holds_no_concurrency_slot_and_no_quota() -> None:
    admission, policy, now = setup(rpm=1, concurrency=1)
    now[0] = 1_800_000_000.0
    first = await admit(admission, policy, "r1")
    assert isinstance(first, Forward)
    await settle(admission, first, "r1")
    refused = await admit(admission, policy, "r2")  # over rpm
    assert isinstance(refused, Deny) and "ratelimit-limit" in dict(refused.headers)
    team = policy.quotas[ObjectKey("default", "team")]
    (lease,) = quota.quota_leases(team, "qwen", 0, 0, datetime.fromtimestamp(now[0], UTC))
    probe = await admission.budgets.admit(
        "probe", [dataclasses.replace(lease, amount=98)], 1, now[0]
    )
    assert probe.admitted, probe  # 100 - r1's 2: r2 reserved 11, then gave them back
    now[0] += 60  # the next minute: the slot must be free at once (not after the lease's TTL)
    second = await admit(admission, policy, "r3")
    assert isinstance(second, Forward), second


async def test_a_request_refused_by_rpd_does_not_count_against_rpm() -> None:
    admission, policy, now = setup(rpm=5, rpd=2)
    now[0] = 1_800_000_000.0
    for rid in ("r1", "r2"):
        admitted = await admit(admission, policy, rid)
        assert isinstance(admitted, Forward)
        await settle(admission, admitted, rid)
    for i in range(10):
        refused = await admit(admission, policy, f"x{i}")
        assert isinstance(refused, Deny) and refused.code == "rate_limit_exceeded"
    # rpm's counter holds the two admitted requests only: 3 of 5 remain
    _, decision = request(policy, "read")
    asked = qos.admission(decision.identity, decision.qos)
    assert asked is not None
    read = dataclasses.replace(
        asked, descriptors=tuple(dataclasses.replace(d, hits=0) for d in asked.descriptors)
    )
    statuses = {
        s.limit.name: s.remaining
        for s in (await admission.limiter.decide(read)).statuses
        if s.limit
    }
    assert statuses == {"rpm": 3, "rpd": 0}


# --- leases of a gateway that died are free again within one lease ttl --------------------------


async def test_a_slot_whose_gateway_died_is_free_within_the_lease_ttl_and_a_live_one_is_kept() -> (
    None
):
    admission, policy, now = setup(concurrency=1)
    admission.lease_ttl_s = 60.0
    now[0] = 1_800_000_000.0
    assert isinstance(await admit(admission, policy, "running"), Forward)
    now[0] += 30
    assert await admission.renew_leases() == 2  # alive: it renews (its quota and slot leases)
    now[0] += 40  # 70 s after admission, 40 s after the renewal: still held
    assert isinstance(await admit(admission, policy, "second"), Deny)
    admission.held.clear()  # as if this process died: nobody renews any more
    now[0] += 21
    assert isinstance(await admit(admission, policy, "third"), Forward)


async def test_a_settled_request_is_no_longer_renewed() -> None:
    admission, policy, now = setup(concurrency=2)
    now[0] = 1_800_000_000.0
    first = await admit(admission, policy, "r1")
    assert isinstance(first, Forward) and "r1" in admission.held
    await settle(admission, first, "r1")
    assert "r1" not in admission.held
    assert await admission.renew_leases() == 0


async def test_tokenizer_requests_count_against_rpm_but_take_no_tokens() -> None:
    """tpm 1 and a 100-token quota would refuse any request reserving tokens: a tokenizer
    request reserves none, and only rpm counts it."""
    admission, policy, now = setup(rpm=3, tpm=1)
    now[0] = 1_800_000_000.0
    for i in range(4):
        info = RequestInfo(
            "POST",
            "/tokenize",
            {"authorization": "Bearer sk-a", "x-request-id": f"t{i}", "content-length": "4000"},
            BodyFacts(model="qwen"),
        )
        decision = decide_headers(info, policy, datetime.fromtimestamp(now[0], UTC))
        assert isinstance(decision, Forward)
        admitted = await admission.admit(info, decision)
        if i < 3:
            assert isinstance(admitted, Forward), admitted
            assert "limits" not in admitted.metadata[METADATA_NAMESPACE]
            assert admitted.reservation is not None and admitted.reservation.quota is None
        else:
            assert isinstance(admitted, Deny) and admitted.reason == "rpm"


async def test_a_reloaded_policy_applies_its_new_limits_and_quota_at_once() -> None:
    """Admission works out each tenant's limits once per policy: a reload must not keep the old."""
    admission, policy, _ = setup(rpm=1)
    assert await admit_and_settle(admission, policy, "r1", 20)
    info, decision = request(policy, "r2")
    refused = await admission.admit(info, decision)
    assert isinstance(refused, Deny) and refused.code == "rate_limit_exceeded"

    def reload(rpm: int, quota_value: int) -> Policy:
        alice = objects.token("alice", ["qwen"], tokenHash=token_digest("sk-a"))
        alice["spec"]["qos"][0]["quota"] = {"name": "team"}
        alice["spec"]["qos"][0]["rateLimits"] = [{"type": "rpm", "value": rpm}]
        team = {
            "apiVersion": "arks.ai/v1",
            "kind": "ArksQuota",
            "metadata": {"name": "team"},
            "spec": {"quotas": [{"type": "total", "value": quota_value, "period": "day"}]},
        }
        reloaded = build_policy([("t", alice), ("e", objects.endpoint("qwen")), ("q", team)])
        assert isinstance(admission.policy, Source)
        admission.policy.policy = reloaded
        return reloaded

    policy = reload(rpm=5, quota_value=1000)
    assert await admit_and_settle(admission, policy, "r3", 5)  # rpm 5: the second is admitted
    # Only the quota changes (25 used of 25 now); the tokens are the very same objects, as a
    # policy index that rebuilds only what changed would keep them.
    (key, team) = next(iter(policy.quotas.items()))
    smaller = dataclasses.replace(team, quotas=(dataclasses.replace(team.quotas[0], value=25),))
    policy = dataclasses.replace(policy, quotas={key: smaller})
    assert isinstance(admission.policy, Source)
    admission.policy.policy = policy
    info, decision = request(policy, "r4")
    refused = await admission.admit(info, decision)
    assert isinstance(refused, Deny) and refused.code == "insufficient_quota"
