"""The engine load the controller scraped, as Prometheus series, in both modes.

Kubernetes mode (`controller.load.cluster`) and standalone mode (`controller.standalone`) feed
one `EngineMetrics` with each scrape round, so the names and labels are identical:
`arks_engine_weight`, `arks_engine_waiting_requests`, `arks_engine_running_requests` and
`arks_engine_kv_cache_usage_ratio` {namespace, model, engine}, and
`arks_engine_scrape_errors_total` {namespace, model}. `engine` is the pod name in a cluster and
`address:port` locally.

Why a round replaces the whole set: engine pods churn (every rollout makes new names), and a
gauge series left behind by a deleted pod would keep its last value forever and grow the
registry without bound. An engine missing from a round has its series removed; a failed scrape
removes its load series (the load is unknown, not the last value seen) and counts an error, but
keeps its weight, which says whether it is drained.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from arks.engine_metrics import EngineLoad, Observation

EngineSeries = tuple[str, str, str]
"""(namespace, model, engine): one engine serving one model."""


@dataclass(frozen=True, slots=True)
class EngineReading:
    """One engine of one model after a round: what its scrape said and the weight it got."""

    observation: Observation
    weight: int | None = None  # None: no weight decided for it (yet)


def gone(before: Set[EngineSeries], after: Set[EngineSeries]) -> set[EngineSeries]:
    """The engines whose series must be removed: exported before, absent from this round."""
    return set(before - after)


def load_values(observation: Observation) -> tuple[float | None, float | None, float | None]:
    """(waiting, running, KV-cache use) to export; None where unknown (a failure: all None)."""
    if not isinstance(observation, EngineLoad):
        return (None, None, None)
    return (observation.waiting, observation.running, observation.kv_cache_usage)


class EngineMetrics:
    """The per-engine series of one controller process (see the module doc).

    `publish` is called from one thread at a time (the scrape loop of either mode)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["namespace", "model", "engine"]
        self.weight = Gauge(
            "arks_engine_weight",
            "Weight published for an engine, 0 (drained) to 100 (as free as the freest engine "
            "of its model).",
            labels,
            registry=registry,
        )
        self.waiting = Gauge(
            "arks_engine_waiting_requests",
            "Requests waiting in the engine's queue, as last scraped (absent while its scrape "
            "fails).",
            labels,
            registry=registry,
        )
        self.running = Gauge(
            "arks_engine_running_requests",
            "Requests the engine is running, as last scraped.",
            labels,
            registry=registry,
        )
        self.kv_cache_usage = Gauge(
            "arks_engine_kv_cache_usage_ratio",
            "Share of the engine's KV cache in use (0 to 1), as last scraped.",
            labels,
            registry=registry,
        )
        self.scrape_errors = Counter(
            "arks_engine_scrape_errors_total",
            "Scrapes of an engine's /metrics that failed (refused, timed out, not 200, "
            "unparsable).",
            ["namespace", "model"],
            registry=registry,
        )
        self._exported: set[EngineSeries] = set()

    def publish(self, readings: Mapping[EngineSeries, EngineReading]) -> None:
        """Export one round: every engine in `readings`, and nothing of the engines not in it."""
        for series in gone(self._exported, readings.keys()):
            for gauge in (self.weight, self.waiting, self.running, self.kv_cache_usage):
                gauge.remove(*series)
        for series, reading in readings.items():
            namespace, model, _ = series
            errors = self.scrape_errors.labels(namespace, model)  # exists at 0 once seen
            if not isinstance(reading.observation, EngineLoad):
                errors.inc()
            if reading.weight is None:
                self.weight.remove(*series)
            else:
                self.weight.labels(*series).set(reading.weight)
            gauges = (self.waiting, self.running, self.kv_cache_usage)
            for gauge, value in zip(gauges, load_values(reading.observation), strict=True):
                if value is None:
                    gauge.remove(*series)
                else:
                    gauge.labels(*series).set(value)
        self._exported = set(readings)

    def exported(self) -> set[EngineSeries]:
        """The engines with series now (for tests of the bound)."""
        return set(self._exported)
