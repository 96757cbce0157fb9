"""The limiter as a library: configuration + counter store + clock → an answer and its metrics.

The counter store is the memory backend; an unreachable store is a Redis backend pointed at a
port nothing listens on (refused at once).
"""

from __future__ import annotations

import logging
import socket

import orjson
import pytest

from arks.adapters.redis.backend import RedisBackend
from arks.limits.backends import CounterBackend, MemoryBackend
from arks.limits.config import parse_config
from arks.limits.decision import DescriptorRequest, LimitRequest
from arks.limits.limiter import Enforcement, Limiter
from arks.limits.metrics import RateLimitMetrics
from arks.limits.model import BackendUnavailable, RateLimit, Unit

NOW = 1_700_000_010.0  # 10 s into a minute

FAIL_OPEN = Enforcement()
CONFIG = parse_config(
    [
        (
            "inline",
            {
                "domain": "d",
                "descriptors": [
                    {"key": "user", "rate_limit": {"unit": "minute", "requests_per_unit": 2}},
                    {
                        "key": "model",
                        "detailed_metric": True,
                        "rate_limit": {"unit": "minute", "requests_per_unit": 5},
                    },
                    {
                        "key": "trial",
                        "shadow_mode": True,
                        "rate_limit": {"unit": "minute", "requests_per_unit": 1},
                    },
                    {"key": "open", "rate_limit": {"unlimited": True}},
                    {
                        "key": "team",
                        "descriptors": [
                            {
                                "key": "model",
                                "detailed_metric": True,
                                "rate_limit": {"unit": "minute", "requests_per_unit": 5},
                            }
                        ],
                    },
                ],
            },
        )
    ]
)


def limiter(
    enforcement: Enforcement = FAIL_OPEN, backend: CounterBackend | None = None
) -> tuple[Limiter, RateLimitMetrics]:
    metrics = RateLimitMetrics.create()
    store = MemoryBackend() if backend is None else backend
    return Limiter(lambda: CONFIG, store, metrics, lambda: NOW, enforcement), metrics


def descriptor(*entries: tuple[str, str], hits: int | None = None) -> DescriptorRequest:
    return DescriptorRequest(entries, hits=hits)


def sample(metrics: RateLimitMetrics, name: str, key: str, domain: str = "d") -> float:
    value = metrics.registry.get_sample_value(
        f"arks_ratelimit_{name}_total", {"domain": domain, "key": key}
    )
    return value or 0.0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_hits_are_counted_per_stats_key_until_over_the_limit() -> None:
    limit, metrics = limiter()
    request = LimitRequest("d", (descriptor(("user", "a")),))
    answers = [await limit.decide(request) for _ in range(3)]
    assert [a.over_limit for a in answers] == [False, False, True]
    assert (
        sample(metrics, "hits", "d.user"),
        sample(metrics, "within_limit", "d.user"),
        sample(metrics, "near_limit", "d.user"),
        sample(metrics, "over_limit", "d.user"),
    ) == (3, 2, 1, 1)  # the second of 2 reaches the 0.8 ratio


async def test_descriptor_hits_and_the_request_hits_addend_are_what_the_metrics_count() -> None:
    limit, metrics = limiter()
    await limit.decide(LimitRequest("d", (descriptor(("model", "m"), hits=4),), hits_addend=9))
    await limit.decide(LimitRequest("d", (descriptor(("user", "a")),), hits_addend=0))
    await limit.decide(LimitRequest("d", (descriptor(("user", "b")),), hits_addend=2))
    await limit.decide(LimitRequest("d", (descriptor(("team", "t"), ("model", "m")),)))
    # detailed_metric: the key is the domain and the descriptor's own entries (upstream's)
    assert sample(metrics, "hits", "d.model_m") == 4
    assert sample(metrics, "hits", "d.team_t.model_m") == 1
    assert sample(metrics, "hits", "d.user") == 1 + 2


async def test_descriptors_after_an_unlimited_or_unmatched_one_are_still_charged_and_counted() -> (
    None
):
    limit, metrics = limiter()
    request = LimitRequest(
        "d", (descriptor(("open", "x")), descriptor(("nowhere", "x")), descriptor(("user", "a")))
    )
    for _ in range(2):
        await limit.decide(request)
    third = await limit.decide(request)
    assert third.over_limit
    assert [s.limit is not None for s in third.statuses] == [False, False, True]
    assert sample(metrics, "hits", "d.user") == 3


async def test_shadow_mode_counts_apart_and_an_override_is_keyed_override() -> None:
    limit, metrics = limiter()
    limit.overrides_anywhere = False  # as the rate-limit service, as upstream
    shadowed = LimitRequest("d", (descriptor(("trial", "t")),))
    await limit.decide(shadowed)
    second = await limit.decide(shadowed)
    assert not second.over_limit and second.statuses[0].shadowed
    assert sample(metrics, "shadow_mode", "d.trial") == 1
    assert sample(metrics, "over_limit", "d.trial") == 1  # both, as upstream counts them

    override = DescriptorRequest((("user", "o"),), RateLimit(1, Unit.SECOND))
    await limit.decide(LimitRequest("d", (override,)))
    assert sample(metrics, "hits", "override") == 1
    # A domain the configuration does not have: no limit, override or not (as upstream's
    # TestConfigLimitOverride), and nothing counted under a caller's string.
    for domain in ("e", "f"):
        answer = await limit.decide(LimitRequest(domain, (override,)))
        assert not answer.over_limit and answer.statuses[0].limit is None
    assert sample(metrics, "hits", "override", domain="unknown") == 0
    limit.overrides_anywhere = True  # a library user's own domains: the override counts
    assert (await limit.decide(LimitRequest("e", (override,)))).statuses[0].limit is not None
    assert (
        metrics.registry.get_sample_value(
            "arks_ratelimit_hits_total", {"domain": "e", "key": "override"}
        )
        is None
    )
    assert sample(metrics, "hits", "override") == 1


async def test_the_processs_own_domain_is_shown_as_itself() -> None:
    store = MemoryBackend()
    metrics = RateLimitMetrics.create()
    own = Limiter(lambda: CONFIG, store, metrics, lambda: NOW, own_domains=frozenset({"arks"}))
    override = DescriptorRequest((("user", "o"),), RateLimit(5, Unit.MINUTE, name="override"))
    await own.decide(LimitRequest("arks", (override,)))
    assert sample(metrics, "hits", "override", domain="arks") == 1


async def test_all_or_nothing_charges_nothing_when_refused() -> None:
    limit, _ = limiter()
    both = LimitRequest("d", (descriptor(("user", "a")), descriptor(("model", "m"), hits=5)))
    assert not (await limit.decide(both, all_or_nothing=True)).over_limit
    refused = await limit.decide(both, all_or_nothing=True)
    assert refused.over_limit
    # the refusal took nothing: one more on the user alone still fits (2 per minute)
    alone = await limit.decide(LimitRequest("d", (descriptor(("user", "a")),)))
    assert not alone.over_limit and alone.statuses[0].remaining == 0


async def test_a_request_no_limit_applies_to_asks_no_store_and_passes_even_failing_closed() -> None:
    unreachable = RedisBackend(f"redis://127.0.0.1:{closed_port()}", timeout_s=0.5)
    try:
        limit, metrics = limiter(Enforcement(fail_open=False), unreachable)
        request = LimitRequest("d", (descriptor(("nowhere", "x")), descriptor(("open", "y"))))
        decided = await limit.decide(request)
    finally:
        await unreachable.close()
    assert not decided.over_limit and decided.statuses[0].limit is None
    errors = metrics.registry.get_sample_value(
        "arks_ratelimit_backend_errors_total", {"policy": "fail_closed"}
    )
    assert errors == 0  # exported at 0 from the start, never counted here


@pytest.mark.parametrize("fail_open", [True, False])
async def test_an_unreachable_store_fails_open_or_closed_as_configured(
    fail_open: bool, caplog: pytest.LogCaptureFixture
) -> None:
    unreachable = RedisBackend(f"redis://127.0.0.1:{closed_port()}", timeout_s=0.5)
    try:
        limit, metrics = limiter(Enforcement(fail_open=fail_open), unreachable)
        request = LimitRequest("d", (descriptor(("nowhere", "x")), descriptor(("user", "a"))))
        with caplog.at_level(logging.WARNING, logger="arks.limits.limiter"):
            decided = await limit.decide(request)
    finally:
        await unreachable.close()
    policy = "fail_open" if fail_open else "fail_closed"
    assert (
        metrics.registry.get_sample_value("arks_ratelimit_backend_errors_total", {"policy": policy})
        == 1
    )
    (record,) = [r for r in caplog.records if r.name == "arks.limits.limiter"]
    assert isinstance(record.args, tuple) and isinstance(record.args[1], BackendUnavailable)
    assert record.getMessage().startswith(f"counter store unavailable ({policy}): ")
    assert len(record.getMessage()) > len(f"counter store unavailable ({policy}): ")
    user_limit = CONFIG.lookup("d", [("user", "a")])
    assert user_limit is not None
    if fail_open:
        assert decided.over_limit is False
        assert [(s.over_limit, s.limit) for s in decided.statuses] == [
            (False, None),
            (False, user_limit),
        ]
        assert (decided.headers, decided.body) == ((), b"")
        return
    assert decided.over_limit is True
    assert [(s.over_limit, s.limit, s.remaining, s.reset_s) for s in decided.statuses] == [
        (False, None, 0, 1.0),
        (True, user_limit, 0, 1.0),
    ]
    assert decided.headers == (("retry-after", "1"), ("content-type", "application/json"))
    assert orjson.loads(decided.body) == {
        "error": {
            "message": "Rate limiting is unavailable and this gateway fails closed; "
            "try again shortly.",
            "type": "rate_limit_error",
            "code": "rate_limit_unavailable",
        }
    }
    # nothing was decided by the store, so no hit is counted
    assert sample(metrics, "hits", "d.user") == 0


async def test_the_enforcement_settings_reach_the_decision() -> None:
    shadow, metrics = limiter(Enforcement(shadow_mode=True))
    request = LimitRequest("d", (descriptor(("user", "s")),))
    answers = [await shadow.decide(request) for _ in range(3)]
    assert not any(a.over_limit for a in answers) and answers[-1].statuses[0].shadowed
    # The service's shadow mode changes answers, not stats (upstream's): counted over the limit.
    assert sample(metrics, "shadow_mode", "d.user") == 0
    assert sample(metrics, "over_limit", "d.user") == 1

    early, metrics = limiter(Enforcement(near_ratio=0.5))
    first, second = [await early.decide(request) for _ in range(2)]
    assert not first.statuses[0].near_limit  # 1 of 2 is not above floor(2 * 0.5)
    assert second.statuses[0].near_limit
    assert sample(metrics, "near_limit", "d.user") == 1


async def test_by_default_every_matched_counter_is_charged_even_when_another_is_over() -> None:
    limit, _ = limiter()
    both = LimitRequest("d", (descriptor(("user", "a")), descriptor(("model", "m"))))
    answers = [await limit.decide(both) for _ in range(3)]
    assert [a.over_limit for a in answers] == [False, False, True]
    # the refused third still used the model's counter (envoyproxy/ratelimit's rule): 4 of 5
    alone = await limit.decide(LimitRequest("d", (descriptor(("model", "m")),)))
    assert alone.statuses[0].remaining == 1
