"""The rate-limit service's per-call metrics (the limiter's own are in `arks.limits.metrics`).

envoyproxy/ratelimit times each gRPC method (`ratelimit_server.ShouldRateLimit.response_time`)
and counts the calls that failed by type (`ratelimit.service.call.should_rate_limit.redis_error`
and `.service_error`); these are the same, under our names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from arks.metric_rules import DECISION_BUCKETS, UNKNOWN

# redis_error: decided without the counter store (fail open or closed, as configured);
# service_error: the call failed (Envoy applies its own failure_mode_deny).
CALL_ERROR_TYPES = ("redis_error", "service_error")


@dataclass(frozen=True)
class CallMetrics:
    seconds: Histogram
    errors: Counter
    _by_domain: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, registry: CollectorRegistry) -> CallMetrics:
        created = cls(
            seconds=Histogram(
                "arks_ratelimit_call_seconds",
                "Time the rate-limit service took to answer one ShouldRateLimit call, by domain "
                '(a domain the configuration does not have is "unknown").',
                ("domain",),
                buckets=DECISION_BUCKETS,
                registry=registry,
            ),
            errors=Counter(
                "arks_ratelimit_call_errors",
                "ShouldRateLimit calls that went wrong, by type: redis_error (decided without the "
                "counter store), service_error (the call failed).",
                ("type",),
                registry=registry,
            ),
        )
        for kind in CALL_ERROR_TYPES:  # at 0 from the start, so rate() and alerts see them
            created.errors.labels(kind)
        return created

    def called(self, domain: str, seconds: float) -> None:
        """One call to `domain` (a configured one, else UNKNOWN) took `seconds`."""
        series = self._by_domain.get(domain)
        if series is None:
            series = self._by_domain[domain] = self.seconds.labels(domain)
        series.observe(seconds)


def domain_label(domain: str, configured: Any) -> str:
    """The domain as a label value: itself when configured, else the one value "unknown"."""
    return domain if domain in configured else UNKNOWN
