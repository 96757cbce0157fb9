"""Rate-limit decisions: which limit applies, what is charged, what Envoy is told."""

from __future__ import annotations

import orjson
import pytest

from arks.limits.decision import (
    DescriptorRequest,
    LimitRequest,
    Status,
    answer,
    counter_key,
    hit_stats,
    hits_for,
    limits_for,
    passed_metadata,
)
from arks.limits.model import Algorithm, Hit, Outcome, RateLimit, Unit

PER_MINUTE = RateLimit(10, Unit.MINUTE, name="per_minute", stats_key="d.user")
PER_DAY = RateLimit(
    100, Unit.DAY, name="per_day", replaces=("per_minute",), stats_key="d.user.model"
)


def lookup_table(table: dict[tuple[tuple[str, str], ...], RateLimit]):  # type: ignore[no-untyped-def]
    return lambda domain, entries: table.get(tuple(entries))


def request(*descriptors: DescriptorRequest, hits_addend: int = 0) -> LimitRequest:
    return LimitRequest("d", descriptors, hits_addend)


def test_configured_limit_applies_and_unknown_descriptors_are_unlimited() -> None:
    lookup = lookup_table({(("user", "a"),): PER_MINUTE})
    limits = limits_for(
        request(DescriptorRequest((("user", "a"),)), DescriptorRequest((("user", "b"),))), lookup
    )
    assert limits == [PER_MINUTE, None]


def test_envoys_override_wins_over_the_configuration() -> None:
    override = RateLimit(3, Unit.SECOND, name="override")
    lookup = lookup_table({(("user", "a"),): PER_MINUTE})
    assert limits_for(request(DescriptorRequest((("user", "a"),), override)), lookup) == [override]
    # and it applies even where nothing is configured
    assert limits_for(request(DescriptorRequest((("user", "z"),), override)), lookup) == [override]


def test_a_limit_named_in_replaces_is_not_applied() -> None:
    lookup = lookup_table({(("user", "a"),): PER_MINUTE, (("user", "a"), ("model", "m")): PER_DAY})
    req = request(
        DescriptorRequest((("user", "a"),)), DescriptorRequest((("user", "a"), ("model", "m")))
    )
    assert limits_for(req, lookup) == [None, PER_DAY]


def test_unlimited_is_never_charged_and_says_so() -> None:
    unlimited = RateLimit(0, Unit.SECOND, unlimited=True)
    req = request(DescriptorRequest((("k", "v"),)))
    limits = limits_for(req, lookup_table({(("k", "v"),): unlimited}))
    assert limits == [unlimited]
    assert hits_for(req, limits) == [None]
    decided = answer(limits, [None])
    assert not decided.over_limit and decided.headers == ()
    assert decided.statuses[0] == Status(over_limit=False, unlimited=True)


def test_hits_default_to_one_and_descriptor_hits_win() -> None:
    req = request(
        DescriptorRequest((("a", "1"),)),
        DescriptorRequest((("a", "2"),), hits=0),
        DescriptorRequest((("a", "3"),), hits=500),
    )
    hits = hits_for(req, [PER_MINUTE, PER_MINUTE, PER_MINUTE])
    assert [h.hits for h in hits if h] == [1, 0, 500]
    assert [
        h.hits
        for h in hits_for(request(DescriptorRequest((("a", "1"),)), hits_addend=7), [PER_MINUTE])
        if h
    ] == [7]


def test_counter_keys_follow_envoyproxy_and_keep_algorithms_and_windows_apart() -> None:
    entries = (("user", "alice"), ("model", "m"))
    assert counter_key("arks", entries, PER_MINUTE) == "arks_user_alice_model_m_60"
    gcra = RateLimit(10, Unit.MINUTE, algorithm=Algorithm.GCRA)
    assert counter_key("arks", entries, gcra) == "gcra:arks_user_alice_model_m_60"
    assert counter_key("arks", entries, RateLimit(10, Unit.HOUR)) != counter_key(
        "arks", entries, PER_MINUTE
    )


def test_over_limit_answer_has_statuses_headers_and_an_openai_body() -> None:
    decided = answer(
        [PER_MINUTE, PER_DAY, None],
        [Outcome(True, 0, 12.2, 11), Outcome(False, 40, 3600, 60), None],
    )
    assert decided.over_limit
    assert [s.over_limit for s in decided.statuses] == [True, False, False]
    headers = dict(decided.headers)
    assert headers["retry-after"] == "13"
    assert headers["ratelimit-limit"] == "10, 10;w=60"
    assert headers["ratelimit-remaining"] == "0"
    assert headers["content-type"] == "application/json"
    error = orjson.loads(decided.body)["error"]
    assert error["code"] == "rate_limit_exceeded" and "per_minute" in error["message"]


def test_within_limits_reports_the_tightest_and_no_body() -> None:
    decided = answer([PER_MINUTE, PER_DAY], [Outcome(False, 1, 30, 9), Outcome(False, 50, 100, 50)])
    assert not decided.over_limit and decided.body == b""
    headers = dict(decided.headers)
    assert headers["ratelimit-remaining"] == "1" and "retry-after" not in headers
    # near: above floor(10 * 0.8) = 8, as upstream
    assert decided.statuses[0].near_limit and not decided.statuses[1].near_limit
    at_eight = answer([PER_MINUTE], [Outcome(False, 2, 30, 8)])
    assert not at_eight.statuses[0].near_limit


@pytest.mark.parametrize(
    ("limit", "hits", "after", "split"),
    [
        # envoyproxy/ratelimit's TestNearLimit (test/redis/fixed_cache_impl_test.go), ratio 0.8:
        # (over, near, within, shadow) of `hits` that brought the counter to `after`.
        (15, 1, 11, (0, 0, 1, 0)),
        (15, 1, 13, (0, 1, 1, 0)),
        (15, 1, 16, (1, 0, 0, 0)),
        (20, 3, 5, (0, 0, 3, 0)),
        (8, 2, 7, (0, 1, 2, 0)),
        (20, 3, 19, (0, 3, 3, 0)),
        (20, 3, 22, (2, 1, 0, 0)),
    ],
)
def test_hits_are_split_over_near_and_within_as_upstream(
    limit: int, hits: int, after: int, split: tuple[int, int, int, int]
) -> None:
    rate = RateLimit(limit, Unit.SECOND)
    outcome = Outcome(after > limit, max(0, limit - after), 1, after)
    (status,) = answer([rate], [outcome]).statuses
    assert hit_stats(status, hits, 0.8) == split


def test_shadow_mode_hits_count_over_and_shadow_and_the_global_switch_changes_no_stat() -> None:
    shadowed = RateLimit(5, Unit.SECOND, shadow_mode=True)
    (status,) = answer([shadowed], [Outcome(True, 0, 1, 7)]).statuses
    assert hit_stats(status, 3, 0.8) == (2, 1, 0, 2)  # 4 -> 7: two over, one near (4 -> 5)
    (status,) = answer(
        [RateLimit(5, Unit.SECOND)], [Outcome(True, 0, 1, 7)], shadow_mode=True
    ).statuses
    assert hit_stats(status, 3, 0.8) == (2, 1, 0, 0)


def test_shadow_mode_reports_but_does_not_enforce() -> None:
    shadow = RateLimit(1, Unit.SECOND, shadow_mode=True)
    decided = answer([shadow], [Outcome(True, 0, 1, 2)])
    assert not decided.over_limit and decided.statuses[0].shadowed
    assert not answer([PER_MINUTE], [Outcome(True, 0, 1, 11)], shadow_mode=True).over_limit


def test_the_lookup_is_asked_with_the_requests_domain() -> None:
    asked: list[str] = []

    def lookup(domain: str, entries: object) -> RateLimit:
        asked.append(domain)
        return PER_MINUTE

    limits_for(LimitRequest("arks", (DescriptorRequest((("user", "a"),)),)), lookup)
    assert asked == ["arks"]


def test_each_hit_is_wired_to_its_domain_key_window_and_algorithm() -> None:
    gcra = RateLimit(7, Unit.HOUR, algorithm=Algorithm.GCRA)
    entries = (("user", "a"),)
    (hit,) = hits_for(LimitRequest("arks", (DescriptorRequest(entries),)), [gcra])
    assert hit == Hit(counter_key("arks", entries, gcra), 7, 3600, 1, Algorithm.GCRA)
    assert hit.key == "gcra:arks_user_a_3600"


def test_descriptors_after_an_unmatched_one_are_still_charged_and_answered() -> None:
    req = request(DescriptorRequest((("none", "x"),)), DescriptorRequest((("user", "a"),)))
    hits = hits_for(req, [None, PER_MINUTE])
    assert hits[0] is None and hits[1] is not None and hits[1].key == "d_user_a_60"
    decided = answer([None, PER_MINUTE], [None, Outcome(True, 0, 5, 11)])
    assert decided.over_limit
    assert [s.limit for s in decided.statuses] == [None, PER_MINUTE]


def test_a_limit_without_an_outcome_reports_no_status() -> None:
    decided = answer([PER_MINUTE, PER_DAY], [None, Outcome(False, 5, 30, 95)])
    assert decided.statuses[0] == Status(over_limit=False)
    assert decided.statuses[1].limit == PER_DAY


def test_limits_outcomes_and_descriptors_must_line_up() -> None:
    with pytest.raises(ValueError):
        answer([PER_MINUTE, PER_DAY], [Outcome(False, 5, 30, 5)])
    with pytest.raises(ValueError):
        hits_for(request(DescriptorRequest((("user", "a"),))), [PER_MINUTE, PER_DAY])


def test_reset_is_never_negative_and_keeps_fractions() -> None:
    decided = answer(
        [PER_MINUTE, PER_DAY], [Outcome(False, 5, -2.0, 5), Outcome(False, 50, 0.4, 50)]
    )
    assert [s.reset_s for s in decided.statuses] == [0.0, 0.4]


def test_ratelimit_reset_header_rounds_the_tightest_reset_up() -> None:
    within = answer([PER_MINUTE], [Outcome(False, 3, 41.2, 7)])
    assert dict(within.headers)["ratelimit-reset"] == "42"
    over = answer([PER_DAY, PER_MINUTE], [Outcome(False, 50, 3000, 50), Outcome(True, 0, 0.0, 11)])
    # the tightest is the one over the limit, though another has more time left
    assert dict(over.headers) == {
        "ratelimit-limit": "10, 10;w=60",
        "ratelimit-remaining": "0",
        "ratelimit-reset": "0",
        "retry-after": "1",
        "content-type": "application/json",
    }


def test_the_429_body_names_the_limit_over_and_says_when_to_retry() -> None:
    decided = answer(
        [PER_DAY, PER_MINUTE], [Outcome(False, 50, 3000, 50), Outcome(True, 0, 0.3, 11)]
    )
    assert orjson.loads(decided.body) == {
        "error": {
            "message": "Rate limit reached for per_minute: 10 per minute. Try again in 1 s.",
            "type": "rate_limit_error",
            "code": "rate_limit_exceeded",
        }
    }
    unnamed = RateLimit(3, Unit.SECOND)
    body = orjson.loads(answer([unnamed], [Outcome(True, 0, 0.0, 4)]).body)
    assert body["error"]["message"] == "Rate limit reached: 3 per second. Try again in 1 s."


# --- quota mode, as envoyproxy/ratelimit's service tests (TestService*QuotaMode*) ------------

QUOTA = RateLimit(5, Unit.MINUTE, quota_mode=True)
RATE = RateLimit(10, Unit.MINUTE)


def over(limit: RateLimit, is_over: bool = True) -> Outcome:
    return Outcome(over_limit=is_over, remaining=0, reset_s=30.0, used=limit.requests_per_unit)


def test_every_quota_descriptor_over_is_over() -> None:
    decided = answer([QUOTA, QUOTA], [over(QUOTA), over(QUOTA)])
    assert decided.over_limit
    assert [s.over_limit for s in decided.statuses] == [True, True]


def test_some_quota_descriptors_over_is_ok_with_their_codes_kept() -> None:
    decided = answer([QUOTA, QUOTA], [over(QUOTA), over(QUOTA, False)])
    assert not decided.over_limit and decided.body == b""
    assert [s.over_limit for s in decided.statuses] == [True, False]


def test_a_rate_limit_over_is_over_and_so_is_the_only_quota_over() -> None:
    assert answer([RATE, QUOTA], [over(RATE), over(QUOTA, False)]).over_limit
    # TestServicePerDescriptorQuotaMode: every quota-mode descriptor (the one) is over
    assert answer([RATE, QUOTA], [over(RATE, False), over(QUOTA)]).over_limit
    assert not answer(
        [RATE, QUOTA, QUOTA], [over(RATE, False), over(QUOTA), over(QUOTA, False)]
    ).over_limit


def test_the_services_quota_mode_puts_every_descriptor_in_it() -> None:
    assert answer([RATE, RATE], [over(RATE), over(RATE)], quota_mode=True).over_limit
    decided = answer([RATE, RATE], [over(RATE), over(RATE, False)], quota_mode=True)
    assert not decided.over_limit


def test_global_shadow_mode_overrides_quota_mode() -> None:
    decided = answer([QUOTA, QUOTA], [over(QUOTA), over(QUOTA)], shadow_mode=True)
    assert not decided.over_limit
    assert [s.over_limit for s in decided.statuses] == [True, True]


def test_passed_metadata_merges_the_limits_that_let_the_request_through() -> None:
    """upstream's ratelimitToMetadata: the configured metadata of each descriptor that passed,
    in order; a key already there keeps its value, two mappings under one key merge."""
    first = RateLimit(1, Unit.MINUTE, metadata='{"tier":{"name":"gold"},"team":"a"}')
    second = RateLimit(1, Unit.MINUTE, metadata='{"tier":{"name":"x","rank":2},"team":{"b":1}}')
    over = RateLimit(1, Unit.MINUTE, metadata='{"over":true}')
    free = RateLimit(0, Unit.SECOND, unlimited=True, metadata='{"free":true}')
    decided = answer(
        [first, None, second, over, free],
        [Outcome(False, 0, 1, 1), None, Outcome(False, 0, 1, 1), Outcome(True, 0, 1, 2), None],
    )
    assert passed_metadata(decided) == {"tier": {"name": "gold", "rank": 2}, "team": "a"}


def test_passed_metadata_counts_a_shadowed_limit_as_passed_but_not_the_services_shadow() -> None:
    shadowed = RateLimit(1, Unit.MINUTE, shadow_mode=True, metadata='{"s":1}')
    over = [Outcome(True, 0, 1, 2)]
    assert passed_metadata(answer([shadowed], over)) == {"s": 1}
    plain = RateLimit(1, Unit.MINUTE, metadata='{"p":1}')
    assert passed_metadata(answer([plain], over, shadow_mode=True)) == {}
