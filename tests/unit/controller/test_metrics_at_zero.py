"""The controller's counters whose label values are known exist at 0 from start-up, so rate(),
increase() and alerts see the first event."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from controller.metrics import RESULTS, ControllerMetrics
from controller.xds.server import XdsMetrics


def test_counters_with_known_labels_exist_at_zero() -> None:
    registry = CollectorRegistry()
    XdsMetrics(registry)
    for kind in ("lds", "rds", "cds", "eds"):
        for name in ("arks_xds_nacks_total", "arks_xds_pushes_total"):
            assert registry.get_sample_value(name, {"type": kind}) == 0.0
    controller = ControllerMetrics(CollectorRegistry())
    controller.known("arksendpoint")
    for result in RESULTS:
        labels = {"controller": "arksendpoint", "result": result}
        assert controller.registry.get_sample_value("arks_controller_reconcile_total", labels) == 0
