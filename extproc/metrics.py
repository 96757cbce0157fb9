"""The gateway's Prometheus metrics. Labels name tenants and models, never token text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from extproc.usage import Usage

_IDENTITY = ("namespace", "user", "model")


@dataclass(frozen=True)
class GatewayMetrics:
    registry: CollectorRegistry
    requests: Counter
    tokens: Counter
    estimated: Counter
    denials: Counter
    access_log_entries: Counter
    unreported: Counter
    reported_elsewhere: Counter
    policy_reloads: Counter
    pending: Gauge
    picks: Counter
    pick_seconds: Histogram
    _cache: dict[tuple[str, str, str, int], tuple[Any, Any, Any]] = field(default_factory=dict)

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> GatewayMetrics:
        registry = registry or CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter(
                "arks_requests",
                "Admitted requests that finished, by answer status.",
                (*_IDENTITY, "code"),
                registry=registry,
            ),
            tokens=Counter(
                "arks_usage_tokens",
                "Tokens charged, by type (prompt, completion).",
                (*_IDENTITY, "type"),
                registry=registry,
            ),
            estimated=Counter(
                "arks_usage_estimated_requests",
                "Requests charged with an estimate because no usage was reported, by reason.",
                (*_IDENTITY, "reason"),
                registry=registry,
            ),
            denials=Counter(
                "arks_gateway_denials",
                "Requests the gateway answered itself with an error.",
                ("status", "code"),
                registry=registry,
            ),
            access_log_entries=Counter(
                "arks_access_log_entries",
                "Access-log entries received from Envoy.",
                registry=registry,
            ),
            unreported=Counter(
                "arks_usage_unreported_requests",
                "Admitted requests whose access-log entry never arrived; charged with the prompt estimate.",
                _IDENTITY,
                registry=registry,
            ),
            reported_elsewhere=Counter(
                "arks_usage_reported_elsewhere_requests",
                "Requests admitted here whose access-log entry went to another gateway replica.",
                registry=registry,
            ),
            policy_reloads=Counter(
                "arks_policy_reloads", "Successful policy reloads since start.", registry=registry
            ),
            pending=Gauge(
                "arks_usage_pending_requests",
                "Admitted requests whose usage has not arrived yet (in flight, or the access log is behind).",
                registry=registry,
            ),
            picks=Counter(
                "arks_picks",
                "Engine picks for least-load and prefix-cache endpoints, by reason (least_load, prefix_hit, "
                "prefix_miss; fallback: no engine pickable, Envoy balanced; refused: the same, answered 503; "
                "unmanaged: no engine known to the gateway, Envoy balanced).",
                ("namespace", "model", "reason"),
                registry=registry,
            ),
            pick_seconds=Histogram(
                "arks_pick_seconds",
                "Time extproc spent picking an engine.",
                buckets=(5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3),
                registry=registry,
            ),
        )

    def charge(self, usage: Usage, status: int) -> None:
        identity = (usage.namespace, usage.user, usage.model)
        requests, prompt, completion = self._series(identity, status)
        requests.inc()
        prompt.inc(usage.prompt_tokens)
        completion.inc(usage.completion_tokens)
        if usage.estimated is not None:
            self.estimated.labels(*identity, usage.estimated).inc()

    def _series(self, identity: tuple[str, str, str], status: int) -> tuple[Any, Any, Any]:
        """The per-request series of one tenant, looked up once (labels() costs µs per call)."""
        key = (*identity, status)
        series = self._cache.get(key)
        if series is None:
            series = self._cache[key] = (
                self.requests.labels(*identity, str(status)),
                self.tokens.labels(*identity, "prompt"),
                self.tokens.labels(*identity, "completion"),
            )
        return series
