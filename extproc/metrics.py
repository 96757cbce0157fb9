"""The gateway's Prometheus metrics. Labels name tenants and models, never token text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from arks.metric_rules import DECISION_BUCKETS
from extproc.decision import Deny, Identity
from extproc.usage import Finished, Usage

_IDENTITY = ("namespace", "user", "model")
# Latency series: the matched policy's namespace and model, never the user (histograms multiply
# a label's values by their buckets).
_LATENCY = ("namespace", "model", "stream", "status_class")
# LLM answers: a cached short answer in milliseconds, a long generation in minutes.
REQUEST_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
# arks_gateway_decision_seconds{phase}: the headers (or body) message up to extproc's answer;
# admission (rate limits, quotas, concurrency) within it; one access-log entry's settlement.
PHASES = ("headers", "admission", "settlement")


def status_class(status: int) -> str:
    """`2xx`…`5xx`; `none` when no answer was sent (Envoy logs 0)."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


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
    in_flight: Gauge
    picks: Counter
    pick_seconds: Histogram
    request_seconds: Histogram
    upstream_seconds: Histogram
    first_token_seconds: Histogram
    output_token_seconds: Histogram
    retries: Counter
    cost: Counter
    decision_seconds: Histogram
    _cache: dict[tuple[str, str, str, int], tuple[Any, Any, Any]] = field(default_factory=dict)
    _latency_cache: dict[tuple[str, str, bool, int], tuple[Any, Any, Any, Any, Any]] = field(
        default_factory=dict
    )
    _in_flight_cache: dict[tuple[str, str], Any] = field(default_factory=dict)
    _cost_cache: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    # The decision histogram's three series, looked up once (created at start: at 0 from then).
    _phases: dict[str, Any] = field(default_factory=dict)

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
                "Requests the gateway answered itself with an error, by status and code (the "
                "check that refused it), reason (the limit: rpm, rpd, tpm, tpd, concurrency, quota; "
                "else the code) and who was refused: namespace and user (the ArksToken) "
                "once the token matched, model once routed (empty before).",
                ("status", "code", "reason", *_IDENTITY),
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
            in_flight=Gauge(
                "arks_in_flight_requests",
                "Admitted requests whose access-log entry has not arrived yet, by namespace and model.",
                ("namespace", "model"),
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
            request_seconds=Histogram(
                "arks_request_duration_seconds",
                "Admitted requests' time in the gateway, from the request's first byte to the "
                "answer's last byte sent to the client (Envoy's access-log duration).",
                _LATENCY,
                buckets=REQUEST_BUCKETS,
                registry=registry,
            ),
            upstream_seconds=Histogram(
                "arks_upstream_duration_seconds",
                "Admitted requests' time at the engine, from the request's first byte sent to it "
                "to the answer's last byte received from it.",
                _LATENCY,
                buckets=REQUEST_BUCKETS,
                registry=registry,
            ),
            first_token_seconds=Histogram(
                "arks_time_to_first_token_seconds",
                "Successful streamed requests' time from the request's first byte to the "
                "answer's first byte sent to the client.",
                ("namespace", "model"),
                buckets=REQUEST_BUCKETS,
                registry=registry,
            ),
            output_token_seconds=Histogram(
                "arks_time_per_output_token_seconds",
                "Successful streamed requests' (duration - time to first token) / (completion "
                "tokens - 1), with the completion tokens the engine reported (at least 2) for "
                "one answer (not n > 1, nor a list of prompts).",
                ("namespace", "model"),
                buckets=TOKEN_BUCKETS,
                registry=registry,
            ),
            retries=Counter(
                "arks_upstream_retries",
                "Admitted requests' retries to engines (Envoy's attempts beyond the first).",
                ("namespace", "model"),
                registry=registry,
            ),
            cost=Counter(
                "arks_usage_cost",
                "What settled requests cost, in the currency of the price table of the quota "
                "their token's grant names (ArksQuota prices, per million tokens); only requests "
                "a price applied to.",
                _IDENTITY,
                registry=registry,
            ),
            decision_seconds=Histogram(
                "arks_gateway_decision_seconds",
                "The gateway's own work per request, by phase: headers (a request's headers or "
                "body message up to extproc's answer, admission included), admission (rate "
                "limits, quotas, concurrency) and settlement (one access-log entry, with its "
                "share of its batch's budget settlement).",
                ("phase",),
                buckets=DECISION_BUCKETS,
                registry=registry,
            ),
        )

    def __post_init__(self) -> None:
        for phase in PHASES:
            self._phases[phase] = self.decision_seconds.labels(phase)

    def decided(self, phase: str, seconds: float) -> None:
        """One phase of the gateway's own work took `seconds`."""
        self._phases[phase].observe(seconds)

    def charge_cost(self, who: Identity, amount: float) -> None:
        """A settled request cost `amount` in the price table's currency."""
        key = (who.namespace, who.user, who.model)
        counter = self._cost_cache.get(key)
        if counter is None:
            counter = self._cost_cache[key] = self.cost.labels(*key)
        counter.inc(amount)

    def latency(self, done: Finished) -> None:
        """Observe a finished request's timings (and retries) from its access-log entry."""
        key = (done.namespace, done.model, done.stream, done.status)
        series = self._latency_cache.get(key)
        if series is None:
            labels = (done.namespace, done.model, "true" if done.stream else "false")
            series = self._latency_cache[key] = (
                self.request_seconds.labels(*labels, status_class(done.status)),
                self.upstream_seconds.labels(*labels, status_class(done.status)),
                self.first_token_seconds.labels(done.namespace, done.model),
                self.output_token_seconds.labels(done.namespace, done.model),
                self.retries.labels(done.namespace, done.model),
            )
        request, upstream, first_token, output_token, retries = series
        if done.attempts > 1:
            retries.inc(done.attempts - 1)
        duration = done.duration_s
        if duration is not None:
            request.observe(duration)
        if done.upstream_s is not None:
            upstream.observe(done.upstream_s)
        first = done.first_byte_s
        if not done.stream or first is None or not 200 <= done.status <= 299:
            return
        first_token.observe(first)
        tokens = done.completion_tokens
        if (
            duration is not None
            and tokens is not None
            and tokens >= 2
            and done.choices == 1  # n > 1: the tokens of answers written side by side
            and not done.interrupted
        ):
            output_token.observe(max(0.0, duration - first) / (tokens - 1))

    def in_flight_changed(self, who: Identity, delta: int) -> None:
        """One request more (+1) or fewer (-1) in flight for `who`'s namespace and model."""
        key = (who.namespace, who.model)
        gauge = self._in_flight_cache.get(key)
        if gauge is None:
            gauge = self._in_flight_cache[key] = self.in_flight.labels(*key)
        gauge.inc(delta)

    def deny(self, refusal: Deny, who: Identity) -> None:
        self.denials.labels(
            str(refusal.status),
            refusal.code,
            refusal.reason or refusal.code,
            who.namespace,
            who.user,
            who.model,
        ).inc()

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


# arks_ledger_write_seconds: one batch's transaction, from a local SQLite file's milliseconds to a
# remote PostgreSQL's timeout.
LEDGER_WRITE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
LEDGER_RESULTS = ("written", "duplicate", "spilled", "dropped")
LEDGER_ERRORS = ("unavailable", "refused", "spill")


@dataclass(frozen=True)
class LedgerMetrics:
    """The usage ledger writer's metrics (`extproc.ledger`): what became of each record."""

    records: Counter
    queue_depth: Gauge
    write_seconds: Histogram
    errors: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> LedgerMetrics:
        created = cls(
            records=Counter(
                "arks_ledger_records",
                "Usage records by what became of them: written (new in the store), duplicate "
                "(its request id was stored already), spilled (the queue was full: appended to "
                "the spill file, counted again when replayed), dropped (not kept).",
                ("result",),
                registry=registry,
            ),
            queue_depth=Gauge(
                "arks_ledger_queue_depth",
                "Usage records in memory waiting for the store (the queue and the batch being "
                "written).",
                registry=registry,
            ),
            write_seconds=Histogram(
                "arks_ledger_write_seconds",
                "One batch of usage records written to the store (successful writes).",
                buckets=LEDGER_WRITE_BUCKETS,
                registry=registry,
            ),
            errors=Counter(
                "arks_ledger_errors",
                "Ledger writer errors by type: unavailable (the database could not be reached; "
                "retried), refused (a batch the store rejected; dropped), spill (the spill file "
                "could not be written or synced).",
                ("type",),
                registry=registry,
            ),
        )
        for result in LEDGER_RESULTS:  # at 0 from the start: rate() and alerts see them
            created.records.labels(result)
        for kind in LEDGER_ERRORS:
            created.errors.labels(kind)
        return created
