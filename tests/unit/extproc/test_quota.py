"""Quota periods, budget keys, costs and refusals (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from arks.api import ArksQuota, ObjectKey, Price, QuotaItem
from extproc.decision import Identity
from extproc.quota import (
    Refusal,
    budget_key,
    concurrency_key,
    cost_of,
    limit_units,
    period_bounds,
    price_for,
    quota_charges,
    quota_leases,
    refusal,
    token_rate_charges,
    token_rate_key,
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


def test_the_models_own_price_wins_among_several_and_the_wildcard_covers_the_rest() -> None:
    a, wildcard, b = Price("a", 1.0, 1.0), Price("*", 5.0, 5.0), Price("b", 2.0, 3.0)
    q = ArksQuota(TEAM, (QuotaItem("cost", 1, "day"),), (a, wildcard, b))
    assert price_for(q, "b") == b
    assert price_for(q, "a") == a
    assert price_for(q, "c") == wildcard
    assert price_for(ArksQuota(TEAM, (), (a, b)), "c") is None
    # leases and charges price the request's own model: 10 * 2 + 20 * 3
    (lease,) = quota_leases(q, "b", 10, 20, T)
    (charge,) = quota_charges(q, "b", 10, 20, T)
    assert lease.amount == charge.cost == 80


def test_budgets_expire_a_grace_week_after_their_period_and_none_never() -> None:
    q = ArksQuota(TEAM, (QuotaItem("total", 100, "day"), QuotaItem("total", 100, "none")))
    day_end = datetime(2026, 11, 28, tzinfo=UTC)
    expected = [(day_end + timedelta(days=7)).timestamp(), None]
    assert [lease.expires_at for lease in quota_leases(q, "m", 1, 1, T)] == expected
    assert [charge.expires_at for charge in quota_charges(q, "m", 1, 1, T)] == expected


def test_token_windows_are_keyed_by_their_start_and_expire_a_grace_week_after_their_end() -> None:
    who = Identity("default", "u", "m")
    now = T.timestamp() + 45  # 15:30:45
    minute = int(T.timestamp())
    day = int(datetime(2026, 11, 27, tzinfo=UTC).timestamp())
    grace = 7 * 86400
    assert token_rate_key(who, "tpm", now) == (f"tpm/default/u/m/{minute}", minute + 60.0)
    leases = token_rate_leases(who, {"tpm": 300, "tpd": 5000}, 40, now)
    assert [(x.key, x.limit, x.amount, x.expires_at) for x in leases] == [
        (f"tpm/default/u/m/{minute}", 300, 40, minute + 60.0 + grace),
        (f"tpd/default/u/m/{day}", 5000, 40, day + 86400.0 + grace),
    ]
    charges = token_rate_charges(who, {"tpm": 300, "tpd": 5000}, 37, now)
    assert [(c.key, c.cost, c.expires_at) for c in charges] == [
        (f"tpm/default/u/m/{minute}", 37, minute + 60.0 + grace),
        (f"tpd/default/u/m/{day}", 37, day + 86400.0 + grace),
    ]


def test_periods_are_utc_days_whatever_the_callers_timezone() -> None:
    sydney = timezone(timedelta(hours=10))
    late = datetime(2026, 11, 28, 5, 0, tzinfo=sydney)  # 2026-11-27 19:00 UTC
    assert period_bounds("day", late)[0] == datetime(2026, 11, 27, tzinfo=UTC)
    assert budget_key(TEAM, QuotaItem("total", 1, "day"), late).endswith("day-2026-11-27")


def test_a_tpm_or_tpd_refusal_says_the_window_and_when_it_ends() -> None:
    now = T + timedelta(seconds=45)  # 15:30:45 UTC
    who = Identity("default", "u", "m")
    tpm, _ = token_rate_key(who, "tpm", now.timestamp())
    tpd, _ = token_rate_key(who, "tpd", now.timestamp())
    assert refusal(tpm, 250, 40, 300, now) == Refusal(
        429,
        "rate_limit_exceeded",
        "Token rate limit reached: 300 tokens per minute; 250 used and 40 reserved in this "
        "minute. Try again in 15 s.",
        15,
        "tpm",
    )
    left = 86400 - (15 * 3600 + 30 * 60 + 45)
    assert refusal(tpd, 4900, 200, 5000, now) == Refusal(
        429,
        "rate_limit_exceeded",
        "Token rate limit reached: 5000 tokens per day; 4900 used and 200 reserved in this "
        f"day. Try again in {left} s.",
        left,
        "tpd",
    )


def test_concurrency_and_cost_refusals_in_full() -> None:
    slots = refusal(concurrency_key(Identity("default", "u", "m")), 0, 2, 2, T)
    assert slots == Refusal(
        429,
        "rate_limit_exceeded",
        "Too many concurrent requests: the limit is 2.",
        1,
        "concurrency",
    )
    cost = refusal("quota/default/team/cost/month-2026-11-01", 1_500_000, 250_000, 2_000_000, T)
    assert cost == Refusal(
        429,
        "insufficient_quota",
        "You exceeded your quota default/team (cost, period month): used 1.5 and 0.25 reserved "
        "of 2 until 2026-12-01 00:00 UTC.",
        int((datetime(2026, 12, 1, tzinfo=UTC) - T).total_seconds()),
        "quota",
    )
    last_second = datetime(2026, 11, 27, 23, 59, 59, 500_000, tzinfo=UTC)
    soon = refusal("quota/default/team/total/day-2026-11-27", 100, 0, 100, last_second)
    assert soon.retry_after_s == 1  # half a second left: at least one
    forever = refusal("quota/default/team/total/none", 5, 1, 6, T)
    assert (forever.retry_after_s, forever.message.endswith(" reserved of 6.")) == (0, True)
