"""Quota periods, budget keys, costs and refusals (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

from arks.api import ArksQuota, ObjectKey, Price, QuotaItem
from extproc.decision import Identity
from extproc.quota import (
    budget_key,
    concurrency_key,
    cost_of,
    limit_units,
    period_bounds,
    quota_charges,
    quota_leases,
    refusal,
    token_rate_leases,
)

T = datetime(2026, 11, 27, 15, 30, tzinfo=UTC)  # a Friday
TEAM = ObjectKey("default", "team")


def test_calendar_periods_in_utc() -> None:
    assert period_bounds("day", T) == (
        datetime(2026, 11, 27, tzinfo=UTC),
        datetime(2026, 11, 28, tzinfo=UTC),
    )
    assert period_bounds("week", T) == (
        datetime(2026, 11, 23, tzinfo=UTC),
        datetime(2026, 11, 30, tzinfo=UTC),
    )
    assert period_bounds("month", T) == (
        datetime(2026, 11, 1, tzinfo=UTC),
        datetime(2026, 12, 1, tzinfo=UTC),
    )
    assert period_bounds("month", datetime(2026, 12, 31, 23, 59, tzinfo=UTC))[1] == datetime(
        2027, 1, 1, tzinfo=UTC
    )
    assert period_bounds("none", T)[1] is None


def test_each_period_is_its_own_budget_and_resets_at_the_boundary() -> None:
    item = QuotaItem("total", 100, "day")
    assert budget_key(TEAM, item, T) == "quota/default/team/total/day-2026-11-27"
    assert budget_key(TEAM, item, datetime(2026, 11, 27, 23, 59, 59, tzinfo=UTC)) == budget_key(
        TEAM, item, T
    )
    assert budget_key(TEAM, item, datetime(2026, 11, 28, tzinfo=UTC)).endswith("day-2026-11-28")
    assert budget_key(TEAM, QuotaItem("total", 1, "none"), T).endswith("/none")


def test_costs_by_type_and_price_per_million() -> None:
    price = Price("m", input=2.0, output=8.0)
    assert cost_of(QuotaItem("prompt", 1), 10, 5, price) == 10
    assert cost_of(QuotaItem("response", 1), 10, 5, price) == 5
    assert cost_of(QuotaItem("total", 1), 10, 5, price) == 15
    assert cost_of(QuotaItem("cost", 1), 10, 5, price) == 60  # micro-units
    assert cost_of(QuotaItem("cost", 1), 10, 5, None) == 0
    assert limit_units(QuotaItem("cost", 2.5)) == 2_500_000
    assert limit_units(QuotaItem("total", 1000)) == 1000


def test_leases_and_charges_use_the_admission_period() -> None:
    q = ArksQuota(
        TEAM, (QuotaItem("total", 100, "day"), QuotaItem("cost", 1, "month")), (Price("*", 1, 1),)
    )
    leases = quota_leases(q, "any-model", 10, 20, T)
    assert [(lease.limit, lease.amount) for lease in leases] == [(100, 30), (1_000_000, 30)]
    assert all(lease.expires_at and lease.expires_at > T.timestamp() for lease in leases)
    charges = quota_charges(q, "any-model", 12, 3, T)
    assert [c.key for c in charges] == [lease.key for lease in leases]
    assert [c.cost for c in charges] == [15, 15]


def test_refusals_say_which_budget_and_until_when() -> None:
    why = refusal("quota/default/team/total/day-2026-11-27", 90, 8, 100, T)
    assert why.code == "insufficient_quota" and why.status == 429
    assert "default/team" in why.message and "used 90 and 8 reserved of 100" in why.message
    assert why.retry_after_s == 8.5 * 3600
    slots = refusal(concurrency_key(Identity("default", "u", "m")), 0, 2, 2, T)
    assert slots.code == "rate_limit_exceeded" and slots.retry_after_s == 1


def test_a_reservation_bigger_than_the_budget_is_capped_so_it_can_run_on_an_untouched_budget() -> (
    None
):
    small = ArksQuota(TEAM, (QuotaItem("total", 500, "day"),))
    (lease,) = quota_leases(small, "m", 20, 1024, T)
    assert (lease.limit, lease.amount) == (500, 500)
    (rate,) = token_rate_leases(Identity("default", "u", "m"), {"tpm": 300}, 1044, T.timestamp())
    assert (rate.limit, rate.amount) == (300, 300)


def test_quota_status_round_trips_the_current_period_and_ignores_old_ones() -> None:
    from arks.policy import Policy
    from extproc.durability import QuotaStatus, quota_status

    q = ArksQuota(TEAM, (QuotaItem("total", 100, "day"), QuotaItem("cost", 2, "month")))
    key_total, key_cost = budget_key(TEAM, q.quotas[0], T), budget_key(TEAM, q.quotas[1], T)
    status = {"quotaStatus": quota_status(q, {key_total: 42, key_cost: 1_500_000}, T)}
    assert [e["used"] for e in status["quotaStatus"]] == [42, 1.5]  # cost in currency units
    policy = Policy(quotas={TEAM: q})
    durable = QuotaStatus(api_client=None, read_status=lambda _: status)
    assert durable.load(policy, T) == {key_total: 42, key_cost: 1_500_000}
    tomorrow = datetime(2026, 11, 28, 1, tzinfo=UTC)
    assert durable.load(policy, tomorrow) == {
        key_cost: 1_500_000
    }  # yesterday's daily total is not today's
