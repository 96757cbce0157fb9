"""The cardinality rules every service's metrics obey, checked in code (pure).

A Prometheus series costs memory in every Prometheus that scrapes it, for as long as it is
retained; a label whose values grow with traffic (users, client strings, token text) can take a
monitoring stack down. So, for every metric a service registers:

- its name starts with `arks_` (the `process_*` and `python_*` collectors of prometheus_client
  excepted), so dashboards and alerts can tell ours from anyone else's;
- no histogram (or summary) has a `user` label: a histogram multiplies each label value by its
  buckets, and users are the one label that grows with the customer base; per-user figures are
  counters and gauges;
- every label name is in `LABEL_VOCABULARY`: a new label is a decision, taken here, not a
  side effect of a new metric.

Label values are not checked here (they exist only once traffic made them); the rule for them is
that a client-supplied string never becomes a value unless it matched a configured object: an
unmatched model or rate-limit domain is the single value `UNKNOWN`.

Services call `enforce(registry)` at start-up and refuse to start on a violation; tests run
`violations` over every service's registry and over a scraped /metrics text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

# Buckets of a decision's latency (the gateway's phases, one rate-limit call): tens of
# microseconds when all is well, a Redis round trip, up to a store's timeout (0.5 s) and beyond.
DECISION_BUCKETS = (
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

UNKNOWN = "unknown"  # the one label value of a model or domain that matched no configured object

PREFIX = "arks_"
FOREIGN_PREFIXES = ("process_", "python_")  # prometheus_client's own collectors
PER_BUCKET_TYPES = ("histogram", "gaugehistogram", "summary")
PER_USER_LABEL = "user"

LABEL_VOCABULARY = frozenset(
    {
        # who and what
        "namespace",
        "user",
        "model",
        "engine",
        "quota",
        # why and how it ended
        "code",
        "status",
        "status_class",
        "reason",
        "result",
        "type",
        "stream",
        "phase",
        "period",
        "limit",
        "policy",
        # the rate-limit service (envoyproxy/ratelimit's stats keys)
        "domain",
        "key",
        # the controller
        "controller",
        # arks_build_info
        "service",
        "version",
        "python_version",
        # Prometheus's own
        "le",
        "quantile",
    }
)


@dataclass(frozen=True)
class Declared:
    """One metric family as a service declares it: its name, type and label names."""

    name: str
    type: str
    labels: frozenset[str]


def violations(declared: Iterable[Declared]) -> list[str]:
    """Every broken rule, one sentence each (empty: all kept)."""
    found: list[str] = []
    for metric in declared:
        if metric.name.startswith(FOREIGN_PREFIXES):
            continue
        if not metric.name.startswith(PREFIX):
            found.append(f"{metric.name}: the name does not start with {PREFIX!r}")
        if metric.type in PER_BUCKET_TYPES and PER_USER_LABEL in metric.labels:
            found.append(f"{metric.name}: a {metric.type} with a {PER_USER_LABEL!r} label")
        unknown = sorted(metric.labels - LABEL_VOCABULARY)
        if unknown:
            found.append(f"{metric.name}: labels outside the vocabulary: {', '.join(unknown)}")
    return found


class MetricRulesViolated(RuntimeError):
    """A service registered metrics that break the cardinality rules: it must not start."""


def enforce(registry: CollectorRegistry, service: str) -> None:
    """At start-up: raise if the service's registry breaks a rule (fail fast, never at 3 am)."""
    broken = violations(declared_in(registry))
    if broken:
        raise MetricRulesViolated(f"{service}: metric rules broken: " + "; ".join(broken))


def declared_in(registry: CollectorRegistry) -> list[Declared]:
    """The families a registry holds, with the label names each declares even before it has a
    series (a labelled counter with no child yet exposes no sample to read them from)."""
    out: list[Declared] = []
    for collector in _collectors(registry):
        declared_labels = frozenset(getattr(collector, "_labelnames", ()))
        for family in collector.collect():
            out.append(_declared(family, declared_labels))
    return out


def declared_in_families(families: Iterable[Metric]) -> list[Declared]:
    """The families of a scraped exposition (`prometheus_client.parser`), labels as sampled."""
    return [_declared(family, frozenset()) for family in families]


def _declared(family: Metric, extra: frozenset[str]) -> Declared:
    labels = set(extra) | set(getattr(family, "_labelnames", ()))
    for sample in family.samples:
        labels.update(sample.labels)
    return Declared(family.name, family.type, frozenset(labels))


def _collectors(registry: CollectorRegistry) -> list[Any]:
    # The registry keeps its collectors in a private map (prometheus_client 0.x); read under its
    # lock, as its own `collect` does.
    # A collector that says `foreign_names` serves another project's names by that project's
    # rules, as a view of ours when asked for (the rate-limit service's envoyproxy/ratelimit
    # series, named by statsd_exporter mappings an operator may supply): not ours to check.
    with registry._lock:
        return [c for c in registry._collector_to_names if not getattr(c, "foreign_names", False)]
