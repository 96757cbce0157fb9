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
from arks.limits.window import uncharged
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
    # Requests whose every descriptor carries its limit (overrides) in one of our own domains (the
    # configuration plays no part), by identity: a caller that asks the same request object again
    # (the gateway's admission plans) gets it prepared once. The entry holds the request, so its
    # id is not reused while cached.
    _prepared: dict[int, Prepared] = field(default_factory=dict, repr=False)

    def prepare(self, request: LimitRequest) -> Prepared:
        """`request`'s limits, counters and stats series under the current configuration: what
        `decide` works out first, for a caller that asks the same request again to keep."""
        config = self.config()
        domain = request.domain
        overrides = (
            self.overrides_anywhere or domain in self.own_domains or domain in config.domains
        )
        limits = limits_for(request, config.lookup, overrides=overrides)
        hits = hits_for(request, limits)
        label = domain if domain in self.own_domains or domain in config.domains else UNKNOWN
        default_hits = max(1, request.hits_addend)
        stats = tuple(
            _Stat(
                i,
                (label, _stats_key(domain, limit, descriptor.entries)),
                default_hits if descriptor.hits is None else descriptor.hits,
            )
            for i, (descriptor, limit) in enumerate(zip(request.descriptors, limits, strict=True))
            if counted(limit)
        )
        config_free = domain in self.own_domains and all(
            d.override is not None for d in request.descriptors
        )
        return Prepared(
            request,
            None if config_free else config,
            limits,
            hits,
            [h for h in hits if h is not None],
            stats,
        )

    def _prepared_for(self, request: LimitRequest | Prepared) -> Prepared:
        if isinstance(request, Prepared):
            if request.config is None or request.config is self.config():
                return request
            return self.prepare(request.request)  # the configuration changed since
        found = self._prepared.get(id(request))
        if found is not None and found.request is request:
            return found
        prepared = self.prepare(request)
        if prepared.config is None:
            if len(self._prepared) >= MAX_PREPARED:
                self._prepared.clear()
            self._prepared[id(request)] = prepared
        return prepared

    async def decide(
        self, request: LimitRequest | Prepared, *, all_or_nothing: bool = False
    ) -> Answer:
        """The answer to `request` (or to a request `prepare`d before), its hits charged.
        envoyproxy/ratelimit charges over-limit hits too; with `all_or_nothing` (admission) a
        refused request is charged nothing, and its statuses within their limits say what is
        left."""
        prepared = self._prepared_for(request)
        limits, hits, charged = prepared.limits, prepared.hits, prepared.charged
        outcomes: list[Outcome | None]
        all_or_nothing = all_or_nothing or self.enforcement.all_or_nothing
        try:
            applied = (
                await self.backend.apply(charged, self.clock(), all_or_nothing=all_or_nothing)
                if charged
                else []
            )
            if all_or_nothing and any(o.over_limit for o in applied):
                # Refused, nothing charged: a hit within its limit says what is left, as
                # upstream's STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT (not what it would leave).
                applied = [
                    o if o.over_limit else uncharged(o, h)
                    for o, h in zip(applied, charged, strict=True)
                ]
            if len(applied) == len(hits):
                outcomes = list(applied)
            else:
                results = iter(applied)
                outcomes = [next(results) if h is not None else None for h in hits]
        except BackendUnavailable as err:
            return self._without_backend(prepared.request, limits, err)
        decided = answer(
            limits,
            outcomes,
            shadow_mode=self.enforcement.shadow_mode,
            quota_mode=self.enforcement.quota_mode,
            near_ratio=self.enforcement.near_ratio,
        )
        self._count(prepared, decided)
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

    def _count(self, prepared: Prepared, decided: Answer) -> None:
        if decided.shadowed:
            self.metrics.global_shadow_mode.inc()
        near_ratio = self.enforcement.near_ratio
        statuses = decided.statuses
        for position, series_key, hits in prepared.stats:
            series = self._cache.get(series_key) or self._series(*series_key)
            series.hits.inc(hits)
            over, near, within, shadow = hit_stats(statuses[position], hits, near_ratio)
            if over:
                series.over_limit.inc(over)
                if statuses[position].cached:
                    series.over_limit_with_local_cache.inc(over)
            if near:
                series.near_limit.inc(near)
            if within:
                series.within_limit.inc(within)
            if shadow:
                series.shadow_mode.inc(shadow)

    def _series(self, domain: str, key: str) -> _Series:
        """One key's counters, looked up once: labels() costs microseconds on every call."""
        found = self._cache.get((domain, key))
        if found is None:
            m = self.metrics
            found = self._cache[(domain, key)] = _Series(
                *(
                    c.labels(domain, key)
                    for c in (
                        m.hits,
                        m.over_limit,
                        m.near_limit,
                        m.within_limit,
                        m.shadow_mode,
                        m.over_limit_with_local_cache,
                    )
                )
            )
        return found


MAX_PREPARED = 100_000


def _stats_key(domain: str, limit: RateLimit | None, entries: Sequence[tuple[str, str]]) -> str:
    """The `key` label of a descriptor's stats: its limit's stats key ("override" for Envoy's
    unnamed one), or, for a `detailed_metric` limit, upstream's key of the request's values:
    `domain.key_value...`, an entry a share_threshold wildcard matched named by the wildcard."""
    assert limit is not None
    if not limit.detailed_metric:
        return limit.stats_key or "override"
    shared = limit.shared_values
    if not shared or all(value is None for value in shared):
        return ".".join([domain, *(f"{k}_{v}" for k, v in entries)])
    return ".".join(
        [
            domain,
            *(
                f"{k}_{shared[i]}" if shared[i] is not None else (f"{k}_{v}" if v else k)
                for i, (k, v) in enumerate(entries)
            ),
        ]
    )


class _Stat(NamedTuple):
    position: int  # the descriptor's, in the request
    series: tuple[str, str]  # (domain label, key label)
    hits: int


class Prepared(NamedTuple):
    """A request worked out against one configuration (`config`; None: the request carries all
    its limits in one of our own domains, so any configuration gives the same)."""

    request: LimitRequest
    config: RateLimitConfig | None
    limits: list[RateLimit | None]
    hits: list[Hit | None]
    charged: list[Hit]  # the hits not None, in order
    stats: tuple[_Stat, ...]  # the counted descriptors' stats


class _Series(NamedTuple):
    hits: Any
    over_limit: Any
    near_limit: Any
    within_limit: Any
    shadow_mode: Any
    over_limit_with_local_cache: Any
