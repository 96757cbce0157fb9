"""Prometheus's configuration for Arks, generated: scrape jobs in, the `prometheus.yml` document
out (a dict to dump as YAML). Pure.

One definition serves `arks up --prometheus` (launcher/prometheus.py), the tests' real
Prometheus (tests/support/prometheus.py) and, through `operator_relabelings`, the Prometheus
Operator monitors of a cluster, so the labels a dashboard or a rule selects on are the same
wherever it runs.

Envoy names its clusters, and so the `envoy_cluster_name` label of its `envoy_cluster_*`
stats, `endpoint/<namespace>/<model>` locally (arks.envoy_config) and
`httproute/<namespace>/<route>/rule/<n>` under Envoy Gateway (an ArksEndpoint's HTTPRoute is
named after its model). `ENVOY_CLUSTER_RELABELINGS` turns both into the `namespace` and `model`
labels every other Arks series carries. Prometheus anchors relabel regexes at both ends and
leaves the target label alone when the regex does not match (relabel_config, action
`replace`), so other clusters (xDS, ext_proc) keep no such labels.

Our own services are scraped with `honor_labels: true`: their series carry a tenant
`namespace` label which a target label of the same name must not rename to
`exported_namespace` (the ServiceMonitors set `honorLabels: true` for the same reason).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Job names: under Prometheus Operator a ServiceMonitor's job is its Service's name, so the
# local jobs of our services carry those names and a query selecting on `job` works in both.
GATEWAY_JOB = "arks-extproc"
RATELIMIT_JOB = "arks-ratelimit"
CONTROLLER_JOB = "arks-controller"
ENVOY_JOB = "arks-envoy"
ENGINES_JOB = "arks-engines"

ENVOY_STATS_PATH = "/stats/prometheus"  # Envoy admin's Prometheus exposition


@dataclass(frozen=True, slots=True)
class Relabel:
    """One `replace` relabelling: `regex` over the joined `source_labels` sets `target_label`."""

    source_labels: tuple[str, ...]
    regex: str
    target_label: str
    replacement: str


ENVOY_CLUSTER_RELABELINGS: tuple[Relabel, ...] = (
    Relabel(("envoy_cluster_name",), "endpoint/([^/]+)/(.+)", "namespace", "$1"),
    Relabel(("envoy_cluster_name",), "endpoint/([^/]+)/(.+)", "model", "$2"),
    Relabel(("envoy_cluster_name",), "httproute/([^/]+)/([^/]+)/rule/[0-9]+", "namespace", "$1"),
    Relabel(("envoy_cluster_name",), "httproute/([^/]+)/([^/]+)/rule/[0-9]+", "model", "$2"),
)


def relabel_configs(relabels: Sequence[Relabel]) -> list[dict[str, Any]]:
    """`relabels` as Prometheus's `relabel_config` entries (its configuration file's keys)."""
    return [
        {
            "source_labels": list(r.source_labels),
            "regex": r.regex,
            "target_label": r.target_label,
            "replacement": r.replacement,
            "action": "replace",
        }
        for r in relabels
    ]


def operator_relabelings(relabels: Sequence[Relabel]) -> list[dict[str, Any]]:
    """`relabels` as Prometheus Operator's `RelabelConfig` (a monitor's `metricRelabelings`)."""
    return [
        {
            "sourceLabels": list(r.source_labels),
            "regex": r.regex,
            "targetLabel": r.target_label,
            "replacement": r.replacement,
            "action": "replace",
        }
        for r in relabels
    ]


@dataclass(frozen=True, slots=True)
class Target:
    address: str  # host:port
    labels: Mapping[str, str] = field(default_factory=dict)  # what discovery would attach


@dataclass(frozen=True, slots=True)
class Job:
    """One scrape job: where, which path, and what happens to the scraped series."""

    name: str
    targets: tuple[Target, ...]
    metrics_path: str = "/metrics"
    honor_labels: bool = False
    metric_relabels: tuple[Relabel, ...] = ()


def service_job(name: str, addresses: Sequence[str]) -> Job:
    """An Arks service (gateway, rate-limit service, controller): its labels are honoured."""
    return Job(name, tuple(Target(a) for a in addresses), honor_labels=True)


def envoy_job(admin_addresses: Sequence[str], name: str = ENVOY_JOB) -> Job:
    """Envoy's admin stats, with the cluster name relabelled into `namespace` and `model`."""
    return Job(
        name,
        tuple(Target(a) for a in admin_addresses),
        metrics_path=ENVOY_STATS_PATH,
        metric_relabels=ENVOY_CLUSTER_RELABELINGS,
    )


def engines_job(targets: Sequence[Target], name: str = ENGINES_JOB) -> Job:
    return Job(name, tuple(targets))


def local_jobs(
    *,
    gateway: str | Sequence[str],
    controller: str,
    envoy_admin: str,
    engines: Sequence[Target] = (),
    ratelimit: str | None = None,
) -> list[Job]:
    """The jobs of one local stack (`arks up`): every address is host:port. Each engine target
    carries the `namespace` of the endpoints it serves as a target label, as a PodMonitor's
    relabelling gives an engine pod's series in a cluster: the engine dashboard filters its
    `vllm:*` series by it. `gateway`: extproc's metrics, one address per worker."""
    jobs = [service_job(GATEWAY_JOB, [gateway] if isinstance(gateway, str) else list(gateway))]
    if ratelimit is not None:
        jobs.append(service_job(RATELIMIT_JOB, [ratelimit]))
    jobs += [service_job(CONTROLLER_JOB, [controller]), envoy_job([envoy_admin])]
    if engines:
        jobs.append(engines_job(engines))
    return jobs


def scrape_config(job: Job) -> dict[str, Any]:
    config: dict[str, Any] = {
        "job_name": job.name,
        "metrics_path": job.metrics_path,
        "honor_labels": job.honor_labels,
        "static_configs": [
            {"targets": [t.address], "labels": dict(t.labels)}
            if t.labels
            else {"targets": [t.address]}
            for t in job.targets
        ],
    }
    if job.metric_relabels:
        config["metric_relabel_configs"] = relabel_configs(job.metric_relabels)
    return config


def prometheus_config(
    jobs: Sequence[Job],
    rule_files: Sequence[str] = (),
    *,
    scrape_interval_s: float = 5.0,
    evaluation_interval_s: float | None = None,
) -> dict[str, Any]:
    """The whole `prometheus.yml`: the jobs, the rule files, one scrape and evaluation period."""
    evaluation = scrape_interval_s if evaluation_interval_s is None else evaluation_interval_s
    return {
        "global": {
            "scrape_interval": _duration(scrape_interval_s),
            "evaluation_interval": _duration(evaluation),
        },
        "rule_files": list(rule_files),
        "scrape_configs": [scrape_config(job) for job in jobs],
    }


def plain_rule_file(document: object) -> bool:
    """Whether a YAML document is a plain Prometheus rule file (`groups:` at the top), not a
    Kubernetes object such as a PrometheusRule, which Prometheus itself cannot load."""
    return isinstance(document, Mapping) and "groups" in document and "kind" not in document


def _duration(seconds: float) -> str:
    """Prometheus's duration syntax: whole milliseconds (it takes no fractions of a second)."""
    millis = round(seconds * 1000)
    if millis <= 0:
        raise ValueError(f"a period must be positive, not {seconds}")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"
