"""Arks' Prometheus recording rules and alerts, as data: one source for the plain rule file and
the PrometheusRule (`python -m arks.monitoring` renders both).

Each alert carries a `severity` label (critical: users are failing now or usage is being lost;
warning: degraded, act within hours; info: a tenant's own doing, tell them) and `summary`,
`description` and `runbook` annotations; the runbook is the README's section for the alert
(`RUNBOOK` + `#` + the alert's name in lower case). Thresholds are the named constants below,
so the README's alert table and these rules cannot disagree silently.

Scrape jobs: Prometheus Operator names a ServiceMonitor's job after the Service (`arks-extproc`)
and a PodMonitor's `<namespace>/<name>` (`arks-system/arks-envoy`); the local Prometheus uses the
bare names. Selectors therefore accept an optional `<namespace>/` before the job name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from arks.prometheus_config import (
    CONTROLLER_JOB,
    ENGINES_JOB,
    ENVOY_JOB,
    GATEWAY_JOB,
    RATELIMIT_JOB,
)

Severity = Literal["critical", "warning", "info"]

RUNBOOK = "https://github.com/arks-ai/arks/blob/main/README.md"

# Scrape job names: arks/prometheus_config.py's, which the local Prometheus and the monitors use.
JOB_EXTPROC = GATEWAY_JOB
JOB_RATELIMIT = RATELIMIT_JOB
JOB_CONTROLLER = CONTROLLER_JOB
JOB_ENVOY = ENVOY_JOB
JOB_ENGINES = ENGINES_JOB

# Availability objective at the edge (Envoy's downstream answers): 99.9 % non-5xx.
SLO_TARGET = 0.999
ERROR_BUDGET = round(1 - SLO_TARGET, 6)
# Multi-window, multi-burn-rate alerts (Google SRE workbook, ch. 5): 2 % of a 30-day budget in
# 1 h (14.4x), or 5 % in 6 h (6x); the short window makes the alert stop soon after recovery.
FAST_BURN = 14.4
SLOW_BURN = 6.0
SLO_WINDOWS = ("5m", "30m", "1h", "6h")

TTFT_P95_TARGET_SECONDS = 2.0  # interactive chat: a first token within 2 s for 95 % of requests
ENGINE_ERROR_RATIO = 0.05  # 5xx answers from a model's engines
EXTPROC_FAILURE_RATIO = 0.01  # ext_proc streams failed or timed out
ESTIMATED_USAGE_RATIO = 0.5  # requests charged with an estimate instead of engine usage
PICKER_FALLBACK_RATIO = 0.1  # picks that fell back to Envoy's own balancing
QUOTA_USED_RATIO = 0.9
RECONCILE_BACKLOG = 100  # objects waiting in a controller's queue
RESTARTS_PER_HOUR = 2

# Envoy's edge: its downstream answers, without the admin and Envoy Gateway's stats listeners.
_EDGE = 'envoy_http_conn_manager_prefix!~"admin|eg-stats-http"'


def _envoy_rejections() -> str:
    """Rejected updates summed per Envoy over its CDS, LDS, RDS and EDS stats. Every Envoy has
    the CDS and LDS counters; the RDS and per-cluster ones exist only with routes and EDS
    clusters, so each of those counts as 0 where absent (a `+` with a missing side is empty)."""
    always = [
        "envoy_cluster_manager_cds_update_rejected",
        "envoy_listener_manager_lds_update_rejected",
    ]
    optional = ["envoy_http_rds_update_rejected", "envoy_cluster_update_rejected"]
    terms = [f"sum by (job, instance) (increase({name}[10m]))" for name in always]
    zero = f"0 * {terms[0]}"
    terms += [f"(sum by (job, instance) (increase({name}[10m])) or {zero})" for name in optional]
    return " + ".join(terms) + " > 0"


def _no_healthy_engine() -> str:
    """A model none of whose engines can answer, as Envoy sees it (no healthy endpoint) or as
    the controller does (every engine drained: weight 0 after failed scrapes). Envoy alone
    keeps a dead engine healthy when it is its model's only one: outlier detection ejects at
    most `max_ejection_percent` (50 %) of a cluster, and the controller, having drained every
    engine of a model, fails open and leaves them routable (arks/envoy_config.py
    `load_assignment`). Seen on the local stack: tests/integration/test_dashboards_on_prometheus.py."""
    envoy = 'sum by (namespace, model) (envoy_cluster_membership_healthy{model!=""}) == 0'
    controller = "max by (namespace, model) (arks_engine_weight) == 0"
    return f"({envoy}) or ({controller})"


def _job(*names: str) -> str:
    return f'job=~"(.+/)?({"|".join(names)})"'


@dataclass(frozen=True)
class Record:
    record: str
    expr: str


@dataclass(frozen=True)
class Alert:
    alert: str
    expr: str
    for_: str
    severity: Severity
    summary: str
    description: str


@dataclass(frozen=True)
class Group:
    name: str
    rules: tuple[Record | Alert, ...]


def _edge_records() -> tuple[Record, ...]:
    out: list[Record] = []
    for window in SLO_WINDOWS:
        total = f"sum(rate(envoy_http_downstream_rq_xx{{{_EDGE}}}[{window}]))"
        errors = (
            f'sum(rate(envoy_http_downstream_rq_xx{{{_EDGE},envoy_response_code_class="5"}}'
            f"[{window}]))"
        )
        out.append(Record(f"arks:edge_error_ratio:rate{window}", f"{errors} / {total}"))
    return tuple(out)


RECORDING = Group(
    "arks-recording",
    (
        *_edge_records(),
        Record(
            "arks:request_error_ratio:rate5m",
            'sum by (namespace, model) (rate(arks_requests_total{code=~"5.."}[5m]))'
            " / sum by (namespace, model) (rate(arks_requests_total[5m]))",
        ),
        Record(
            "arks:engine_error_ratio:rate5m",
            "sum by (namespace, model) "
            '(rate(envoy_cluster_upstream_rq_xx{model!="",envoy_response_code_class="5"}[5m]))'
            ' / sum by (namespace, model) (rate(envoy_cluster_upstream_rq_xx{model!=""}[5m]))',
        ),
        Record(
            "arks:time_to_first_token_seconds:p95_5m",
            "histogram_quantile(0.95, sum by (namespace, model, le) "
            "(rate(arks_time_to_first_token_seconds_bucket[5m])))",
        ),
    ),
)

_WHO_MODEL = "{{ $labels.namespace }}/{{ $labels.model }}"
_VALUE = "{{ $value | humanizePercentage }}"

AVAILABILITY = Group(
    "arks-availability",
    (
        Alert(
            "ArksGatewayDown",
            f"up{{{_job(JOB_EXTPROC, JOB_ENVOY)}}} == 0",
            "2m",
            "critical",
            "Gateway target {{ $labels.job }} {{ $labels.instance }} is down",
            "Prometheus cannot scrape {{ $labels.instance }} of {{ $labels.job }}: requests "
            "through it fail or bypass the gateway's checks.",
        ),
        Alert(
            "ArksServiceDown",
            f"up{{{_job(JOB_RATELIMIT, JOB_CONTROLLER)}}} == 0",
            "5m",
            "warning",
            "Arks target {{ $labels.job }} {{ $labels.instance }} is down",
            "Prometheus cannot scrape {{ $labels.instance }} of {{ $labels.job }}.",
        ),
        Alert(
            "ArksErrorBudgetBurnFast",
            f"arks:edge_error_ratio:rate1h > {round(FAST_BURN * ERROR_BUDGET, 6)}"
            f" and arks:edge_error_ratio:rate5m > {round(FAST_BURN * ERROR_BUDGET, 6)}",
            "2m",
            "critical",
            "The gateway burns its error budget fast",
            f"{_VALUE} of answers at the edge were 5xx over the last 5 minutes and hour: "
            f"more than {FAST_BURN}x the {SLO_TARGET:.1%} objective's budget.",
        ),
        Alert(
            "ArksErrorBudgetBurnSlow",
            f"arks:edge_error_ratio:rate6h > {round(SLOW_BURN * ERROR_BUDGET, 6)}"
            f" and arks:edge_error_ratio:rate30m > {round(SLOW_BURN * ERROR_BUDGET, 6)}",
            "15m",
            "warning",
            "The gateway burns its error budget",
            f"{_VALUE} of answers at the edge were 5xx over the last 30 minutes and 6 hours: "
            f"more than {SLOW_BURN:g}x the {SLO_TARGET:.1%} objective's budget.",
        ),
        Alert(
            "ArksModelNoHealthyEngine",
            _no_healthy_engine(),
            "2m",
            "critical",
            f"Model {_WHO_MODEL} has no healthy engine",
            f"Envoy sees no healthy endpoint for {_WHO_MODEL}, or the controller reaches none of "
            "its engines: its requests fail with 503.",
        ),
        Alert(
            "ArksEngineErrorRatioHigh",
            f"arks:engine_error_ratio:rate5m > {ENGINE_ERROR_RATIO}",
            "10m",
            "warning",
            f"Engines of {_WHO_MODEL} answer 5xx",
            f"{_VALUE} of upstream requests to {_WHO_MODEL} got a 5xx answer over 5 minutes.",
        ),
        Alert(
            "ArksTimeToFirstTokenHigh",
            f"arks:time_to_first_token_seconds:p95_5m > {TTFT_P95_TARGET_SECONDS:g}",
            "15m",
            "warning",
            f"Time to first token of {_WHO_MODEL} is high",
            "The 95th percentile time to first token of "
            + _WHO_MODEL
            + " is {{ $value | humanizeDuration }}"
            + f" (target {TTFT_P95_TARGET_SECONDS:g}s).",
        ),
        Alert(
            "ArksProcessRestarts",
            "changes(process_start_time_seconds"
            f"{{{_job(JOB_EXTPROC, JOB_RATELIMIT, JOB_CONTROLLER)}}}[1h])"
            f" > {RESTARTS_PER_HOUR}",
            "0m",
            "warning",
            "{{ $labels.job }} {{ $labels.instance }} restarts repeatedly",
            "{{ $labels.job }} {{ $labels.instance }} started {{ $value }} times in the last hour.",
        ),
    ),
)

GATEWAY = Group(
    "arks-gateway",
    (
        Alert(
            "ArksExtprocFailing",
            "sum by (job, instance) (rate(envoy_http_ext_proc_streams_failed[5m])"
            " + rate(envoy_http_ext_proc_message_timeouts[5m]))"
            " / sum by (job, instance) (rate(envoy_http_ext_proc_streams_started[5m]))"
            f" > {EXTPROC_FAILURE_RATIO}",
            "5m",
            "critical",
            "Envoy {{ $labels.instance }} cannot reach the gateway's ext_proc",
            f"{_VALUE} of ext_proc streams of Envoy "
            "{{ $labels.instance }} failed or timed out: those requests are refused.",
        ),
        Alert(
            "ArksAccessLogDropped",
            "sum by (job, instance) "
            "(increase(envoy_access_logs_grpc_access_log_logs_dropped[10m])"
            " + increase(envoy_access_logs_grpc_access_log_grpc_entries_flush_failed[10m]))"
            " > 0",
            "0m",
            "critical",
            "Envoy {{ $labels.instance }} drops usage access-log entries",
            "Envoy {{ $labels.instance }} dropped {{ $value }} access-log entries in 10 "
            "minutes: their usage is charged from estimates or not at all.",
        ),
        Alert(
            "ArksUsageMostlyEstimated",
            "sum by (namespace, model) (rate(arks_usage_estimated_requests_total[15m]))"
            " / sum by (namespace, model) (rate(arks_requests_total[15m]))"
            f" > {ESTIMATED_USAGE_RATIO}",
            "15m",
            "warning",
            f"Usage of {_WHO_MODEL} is mostly estimated",
            f"{_VALUE} of requests to {_WHO_MODEL} were charged with an estimate: the "
            "engine does not report usage.",
        ),
        Alert(
            "ArksUsageUnreported",
            "sum by (namespace, model) (increase(arks_usage_unreported_requests_total[15m])) > 0",
            "5m",
            "warning",
            f"Requests to {_WHO_MODEL} finish without an access-log entry",
            "{{ $value }} admitted requests to "
            + _WHO_MODEL
            + " got no access-log entry in 15 minutes; they were charged the prompt estimate.",
        ),
        Alert(
            "ArksCounterStoreFailingOpen",
            "sum by (job, instance) "
            '(increase(arks_ratelimit_backend_errors_total{policy="fail_open"}[5m])) > 0',
            "5m",
            "critical",
            "Rate limits are not enforced: the counter store fails ({{ $labels.instance }})",
            "{{ $labels.job }} {{ $labels.instance }} decided {{ $value }} requests without "
            "its counter store in 5 minutes and let them through (fail open).",
        ),
        Alert(
            "ArksPickerFallingBack",
            'sum by (namespace, model) (rate(arks_picks_total{reason="fallback"}[10m]))'
            " / sum by (namespace, model) (rate(arks_picks_total[10m]))"
            f" > {PICKER_FALLBACK_RATIO}",
            "15m",
            "warning",
            f"Engine picking for {_WHO_MODEL} falls back",
            f"{_VALUE} of picks for {_WHO_MODEL} fell back to Envoy's balancing: the picker "
            "has no fresh engine load.",
        ),
        Alert(
            "ArksQuotaNearlyUsed",
            "max by (namespace, quota, type, period) (arks_quota_used)"
            " / max by (namespace, quota, type, period) (arks_quota_limit)"
            f" > {QUOTA_USED_RATIO}",
            "5m",
            "warning",
            "Quota {{ $labels.namespace }}/{{ $labels.quota }} is nearly used",
            "{{ $labels.namespace }}/{{ $labels.quota }} ({{ $labels.type }}, per "
            "{{ $labels.period }}) is at " + _VALUE + " of its limit.",
        ),
        Alert(
            "ArksTenantThrottled",
            "sum by (namespace, user, model, reason) "
            '(rate(arks_gateway_denials_total{reason=~"rpm|rpd|tpm|tpd|concurrency|quota"}[5m]))'
            " > 0",
            "15m",
            "info",
            "{{ $labels.namespace }}/{{ $labels.user }} is throttled ({{ $labels.reason }})",
            "Requests of {{ $labels.namespace }}/{{ $labels.user }} to {{ $labels.model }} "
            "have been refused by its {{ $labels.reason }} limit for 15 minutes.",
        ),
    ),
)

CONTROL_PLANE = Group(
    "arks-control-plane",
    (
        Alert(
            "ArksLeaderCount",
            "sum(arks_controller_leader) != 1",
            "5m",
            "critical",
            "{{ $value }} controllers lead",
            "Exactly one controller replica should hold the lease; {{ $value }} do.",
        ),
        Alert(
            "ArksRateLimitConfigRejected",
            "sum by (job, instance) (increase(arks_ratelimit_config_errors_total[10m])) > 0",
            "0m",
            "warning",
            "{{ $labels.job }} {{ $labels.instance }} rejected its configuration",
            "A rate-limit configuration change was rejected; the last good one stays.",
        ),
        Alert(
            "ArksXdsNack",
            "sum by (job, instance, type) (increase(arks_xds_nacks_total[10m])) > 0",
            "0m",
            "warning",
            "Envoy rejected {{ $labels.type }} from {{ $labels.instance }}",
            "Envoy NACKed {{ $value }} {{ $labels.type }} updates in 10 minutes; it keeps "
            "running its last accepted configuration.",
        ),
        Alert(
            "ArksEnvoyUpdateRejected",
            _envoy_rejections(),
            "0m",
            "warning",
            "Envoy {{ $labels.instance }} rejected a configuration update",
            "Envoy {{ $labels.instance }} rejected {{ $value }} xDS updates in 10 minutes.",
        ),
        Alert(
            "ArksXdsDisconnected",
            "arks_xds_connected_streams == 0 or envoy_control_plane_connected_state == 0",
            "5m",
            "warning",
            "Envoy and its control plane are disconnected ({{ $labels.instance }})",
            "{{ $labels.job }} {{ $labels.instance }} has no xDS stream: Envoy serves its "
            "last configuration and no change reaches it.",
        ),
        Alert(
            "ArksReconcileErrors",
            "sum by (controller) "
            '(rate(arks_controller_reconcile_total{result=~"error|permanent_error"}[10m])) > 0',
            "15m",
            "warning",
            "The {{ $labels.controller }} controller fails to reconcile",
            "Reconciles of {{ $labels.controller }} have been failing for 15 minutes "
            "(see the objects' conditions and events).",
        ),
        Alert(
            "ArksReconcileBacklog",
            f"max by (controller) (arks_controller_queue_depth) > {RECONCILE_BACKLOG}",
            "15m",
            "warning",
            "The {{ $labels.controller }} controller falls behind",
            "{{ $value }} objects wait in the {{ $labels.controller }} queue.",
        ),
        Alert(
            "ArksEngineDrained",
            "max by (namespace, model, engine) (arks_engine_weight) == 0",
            "10m",
            "info",
            "Engine {{ $labels.engine }} of {{ $labels.namespace }}/{{ $labels.model }} is drained",
            "The controller gives {{ $labels.engine }} weight 0: it gets no new requests.",
        ),
    ),
)

GROUPS: tuple[Group, ...] = (RECORDING, AVAILABILITY, GATEWAY, CONTROL_PLANE)


def runbook(alert: str) -> str:
    return f"{RUNBOOK}#{alert.lower()}"


def _rule(rule: Record | Alert) -> dict[str, Any]:
    if isinstance(rule, Record):
        return {"record": rule.record, "expr": rule.expr}
    out: dict[str, Any] = {"alert": rule.alert, "expr": rule.expr}
    if rule.for_ != "0m":
        out["for"] = rule.for_
    out["labels"] = {"severity": rule.severity}
    out["annotations"] = {
        "summary": rule.summary,
        "description": rule.description,
        "runbook": runbook(rule.alert),
    }
    return out


def rule_groups(groups: tuple[Group, ...] = GROUPS) -> list[dict[str, Any]]:
    """The `groups:` of a Prometheus rule file (also a PrometheusRule's `spec.groups`)."""
    return [{"name": g.name, "rules": [_rule(r) for r in g.rules]} for g in groups]


def alerts(groups: tuple[Group, ...] = GROUPS) -> list[Alert]:
    return [r for g in groups for r in g.rules if isinstance(r, Alert)]
