"""Reading a service's /metrics text as Prometheus does: families with their types, samples."""

from __future__ import annotations

import platform

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from arks.lifecycle import package_version


def families(text: str) -> dict[str, Metric]:
    """The exposition's metric families by name (a counter's name without `_total`)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` with exactly `labels`, or None when it is not exposed."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def assert_process_metrics(text: str, service: str) -> None:
    """What every Arks service exports about itself: process_*, python_info, arks_build_info."""
    found = families(text)
    for name, kind in (
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_start_time_seconds", "gauge"),
        ("process_open_fds", "gauge"),
        ("python_info", "gauge"),
        ("arks_build_info", "gauge"),  # an Info is a gauge at 1 in the text format
    ):
        assert name in found, f"{service} does not export {name}"
        assert found[name].type == kind, (name, found[name].type)
    build = {
        "service": service,
        "version": package_version(),
        "python_version": platform.python_version(),
    }
    assert package_version() != "unknown"
    assert sample(text, "arks_build_info", **build) == 1.0
    assert (sample(text, "process_resident_memory_bytes") or 0.0) > 0
