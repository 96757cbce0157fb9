"""What every service exports about itself, on the registry its /metrics serves."""

from __future__ import annotations

import platform
from importlib.metadata import version

from prometheus_client import CollectorRegistry

from arks.lifecycle import export_process_metrics, package_version


def test_process_platform_and_build_info() -> None:
    registry = CollectorRegistry()
    export_process_metrics(registry, "ratelimit")
    assert package_version() == version("arks") != "unknown"
    build = {
        "service": "ratelimit",
        "version": package_version(),
        "python_version": platform.python_version(),
    }
    assert registry.get_sample_value("arks_build_info", build) == 1.0
    assert (registry.get_sample_value("process_start_time_seconds") or 0.0) > 0
    assert registry.get_sample_value("process_cpu_seconds_total") is not None
    info = {"implementation", "major", "minor", "patchlevel", "version"}
    (python,) = [s for m in registry.collect() for s in m.samples if s.name == "python_info"]
    assert set(python.labels) == info
