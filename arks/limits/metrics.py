"""The rate-limit service's Prometheus metrics, keyed like envoyproxy/ratelimit's stats."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

# The `policy` of arks_ratelimit_backend_errors: a decision made without the store (fail_open,
# fail_closed), or the gateway's settlement dropped because too many waited for the store.
STORE_ERROR_POLICIES = ("fail_open", "fail_closed", "settlement_dropped")


@dataclass(frozen=True)
class RateLimitMetrics:
    registry: CollectorRegistry
    hits: Counter
    over_limit: Counter
    near_limit: Counter
    within_limit: Counter
    shadow_mode: Counter
    over_limit_with_local_cache: Counter
    backend_errors: Counter
    global_shadow_mode: Counter
    config_reloads: Counter
    config_errors: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> RateLimitMetrics:
        registry = registry or CollectorRegistry()

        def per_key(name: str, doc: str) -> Counter:
            return Counter(name, doc, ("domain", "key"), registry=registry)

        metrics = cls(
            registry=registry,
            hits=per_key("arks_ratelimit_hits", "Hits charged to a limit."),
            # Counted in hits, split as envoyproxy/ratelimit splits them (decision.hit_stats).
            over_limit=per_key(
                "arks_ratelimit_over_limit", "Hits over the limit (a limit in shadow mode too)."
            ),
            near_limit=per_key(
                "arks_ratelimit_near_limit",
                "Hits within the limit but above the near-limit ratio (and those of a request "
                "that crossed the limit, up to it).",
            ),
            within_limit=per_key(
                "arks_ratelimit_within_limit", "Hits of requests within the limit."
            ),
            shadow_mode=per_key(
                "arks_ratelimit_shadow_mode",
                "Hits over a limit in shadow mode, let through.",
            ),
            over_limit_with_local_cache=per_key(
                "arks_ratelimit_over_limit_with_local_cache",
                "Hits over the limit answered by the local over-limit cache, without the counter "
                "store (counted in over_limit too).",
            ),
            backend_errors=Counter(
                "arks_ratelimit_backend_errors",
                "Decisions made without the counter store, by the policy applied (fail_open, fail_closed).",
                ("policy",),
                registry=registry,
            ),
            global_shadow_mode=Counter(
                "arks_ratelimit_global_shadow_mode",
                "Requests over a limit answered OK by the service's shadow mode (--shadow-mode).",
                registry=registry,
            ),
            config_reloads=Counter(
                "arks_ratelimit_config_reloads", "Configuration reloads.", registry=registry
            ),
            config_errors=Counter(
                "arks_ratelimit_config_errors",
                "Rejected configuration changes (the last good one stays).",
                registry=registry,
            ),
        )
        for policy in STORE_ERROR_POLICIES:  # at 0 from the start, so rate() and alerts see them
            metrics.backend_errors.labels(policy)
        return metrics
