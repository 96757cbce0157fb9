"""The limiter: configuration + counter store → an answer. Usable without gRPC (a library), so
whichever process is already on the request path can decide without another hop."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from arks.limits.backends import BackendUnavailable, CounterBackend
from arks.limits.config import RateLimitConfig
from arks.limits.decision import (
    Answer,
    LimitRequest,
    Status,
    answer,
    counted,
    hit_stats,
    hits_for,
    limits_for,
)
from arks.limits.metrics import RateLimitMetrics
from arks.limits.model import Hit, Outcome, RateLimit
from arks.metric_rules import UNKNOWN

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Enforcement:
    """How the limiter acts on its decisions and on a counter store it cannot reach."""

    fail_open: bool = True  # the counter store unreachable: let requests through (and count it)
    shadow_mode: bool = False  # report, never enforce
    quota_mode: bool = False  # every descriptor in quota mode (upstream's QUOTA_MODE)
    near_ratio: float = 0.8
    # A refused request charges nothing, every call (upstream's
    # STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT); else only where the caller asks (admission).
    all_or_nothing: bool = False


@dataclass
class Limiter:
    config: Callable[[], RateLimitConfig]
    backend: CounterBackend
    metrics: RateLimitMetrics
    clock: Callable[[], float]
    enforcement: Enforcement = Enforcement()
    # Domains named by the process itself (the gateway's own, whose limits all come as
    # overrides); with the configured ones, the domains shown as themselves in metrics.
    own_domains: frozenset[str] = frozenset()
    # Whether a descriptor's own limit (Envoy's override) counts in a domain neither configured
    # nor our own: envoyproxy/ratelimit finds no limit there (its service sets this False).
    overrides_anywhere: bool = True
    _cache: dict[tuple[str, str], _Series] = field(default_factory=dict, repr=False)
    # Requests whose every descriptor carries its limit (overrides: the configuration plays no
    # part), by identity: a caller that asks the same request object again (the gateway's
    # admission plans) gets its limits and counters worked out once. The entry holds the request,
    # so its id is not reused while cached.
    _prepared: dict[int, _Prepared] = field(default_factory=dict, repr=False)

    def _limits_and_hits(
        self, request: LimitRequest
    ) -> tuple[list[RateLimit | None], list[Hit | None]]:
        found = self._prepared.get(id(request))
        if found is not None and found.request is request:
            return found.limits, found.hits
        config = self.config()
        overrides = (
            self.overrides_anywhere
            or request.domain in self.own_domains
            or request.domain in config.domains
        )
        limits = limits_for(request, config.lookup, overrides=overrides)
        hits = hits_for(request, limits)
        if all(d.override is not None for d in request.descriptors):
            if len(self._prepared) >= MAX_PREPARED:
                self._prepared.clear()
            self._prepared[id(request)] = _Prepared(request, limits, hits)
        return limits, hits

    async def decide(self, request: LimitRequest, *, all_or_nothing: bool = False) -> Answer:
        """The answer to `request`, its hits charged. envoyproxy/ratelimit charges over-limit hits
        too; with `all_or_nothing` (admission) a refused request is charged nothing."""
        limits, hits = self._limits_and_hits(request)
        charged = [h for h in hits if h is not None]
        outcomes: list[Outcome | None]
        try:
            applied = (
                await self.backend.apply(
                    charged,
                    self.clock(),
                    all_or_nothing=all_or_nothing or self.enforcement.all_or_nothing,
                )
                if charged
                else []
            )
            results = iter(applied)
            outcomes = [next(results) if h is not None else None for h in hits]
        except BackendUnavailable as err:
            return self._without_backend(request, limits, err)
        decided = answer(
            limits,
            outcomes,
            shadow_mode=self.enforcement.shadow_mode,
            quota_mode=self.enforcement.quota_mode,
            near_ratio=self.enforcement.near_ratio,
        )
        self._count(request, decided)
        return decided

    def _without_backend(
        self, request: LimitRequest, limits: Sequence[RateLimit | None], err: Exception
    ) -> Answer:
        policy = "fail_open" if self.enforcement.fail_open else "fail_closed"
        self.metrics.backend_errors.labels(policy).inc()
        log.warning("counter store unavailable (%s): %s", policy, err)
        if self.enforcement.fail_open or not any(map(counted, limits)):
            return Answer(
                False,
                tuple(
                    Status(False, unlimited=True)
                    if limit is not None and limit.unlimited
                    else Status(False, limit)
                    for limit in limits
                ),
                without_store=True,
            )
        closed = tuple(
            Status(True, limit, 0, 1.0)
            if counted(limit)
            else Status(False, None, 0, 1.0, unlimited=limit is not None)
            for limit in limits
        )
        body = (
            b'{"error":{"message":"Rate limiting is unavailable and this gateway fails closed; try again shortly.",'
            b'"type":"rate_limit_error","code":"rate_limit_unavailable"}}'
        )
        return Answer(
            True,
            closed,
            (("retry-after", "1"), ("content-type", "application/json")),
            body,
            without_store=True,
        )

    def _count(self, request: LimitRequest, decided: Answer) -> None:
        domain = request.domain
        if domain not in self.own_domains and domain not in self.config().domains:
            domain = UNKNOWN  # a caller's string is no label value unless configured
        for descriptor, status in zip(request.descriptors, decided.statuses, strict=True):
            limit = status.limit
            if limit is None:
                continue
            key = limit.stats_key or "override"
            if limit.detailed_metric:  # a share_threshold wildcard's pattern for its values
                shared = limit.shared_values
                key = ".".join(
                    f"{k}_{shared[i] if shared and shared[i] is not None else v}"
                    for i, (k, v) in enumerate(descriptor.entries)
                )
            series = self._series(domain, key)
            hits = max(1, request.hits_addend) if descriptor.hits is None else descriptor.hits
            series.hits.inc(hits)
            over, near, within, shadow = hit_stats(status, hits, self.enforcement.near_ratio)
            for counter, n in (
                (series.over_limit, over),
                (series.near_limit, near),
                (series.within_limit, within),
                (series.shadow_mode, shadow),
            ):
                if n:
                    counter.inc(n)

    def _series(self, domain: str, key: str) -> _Series:
        """One key's counters, looked up once: labels() costs microseconds on every call."""
        found = self._cache.get((domain, key))
        if found is None:
            m = self.metrics
            found = self._cache[(domain, key)] = _Series(
                *(
                    c.labels(domain, key)
                    for c in (m.hits, m.over_limit, m.near_limit, m.within_limit, m.shadow_mode)
                )
            )
        return found


MAX_PREPARED = 100_000


class _Prepared(NamedTuple):
    request: LimitRequest
    limits: list[RateLimit | None]
    hits: list[Hit | None]


class _Series(NamedTuple):
    hits: Any
    over_limit: Any
    near_limit: Any
    within_limit: Any
    shadow_mode: Any
