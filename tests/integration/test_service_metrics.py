"""What the local stack's services export about themselves, read from their /metrics as
Prometheus reads it: process and build info, counts typed as counters, known series at zero."""

from __future__ import annotations

import httpx

from tests.support.exposition import assert_process_metrics, families, sample
from tests.support.stack import Stack
from tests.support.waiting import wait_for


def test_gateway_exports_process_build_and_zeroed_counters(stack: Stack) -> None:
    text = httpx.get(stack.local.metrics_url, timeout=5).text
    assert_process_metrics(text, "extproc")
    found = families(text)
    assert found["arks_policy_reloads"].type == "counter"  # a count, not a gauge
    for policy in ("fail_open", "fail_closed", "settlement_dropped"):  # at 0 before any error
        assert sample(text, "arks_ratelimit_backend_errors_total", policy=policy) == 0.0


def test_gateway_policy_reloads_count_up(stack: Stack) -> None:
    def reloads() -> float:
        text = httpx.get(stack.local.metrics_url, timeout=5).text
        return sample(text, "arks_policy_reloads_total") or 0.0

    before = reloads()
    stack.write_policy([*stack.documents])  # the same objects, a new file: reloaded
    wait_for(reloads, lambda n: n > before, timeout=10)


def test_controller_exports_process_build_and_zeroed_counters(stack: Stack) -> None:
    text = httpx.get(f"{stack.local.controller_url}/metrics", timeout=5).text
    assert_process_metrics(text, "controller")
    found = families(text)
    assert found["arks_xds_snapshots"].type == "counter"
    assert (sample(text, "arks_xds_snapshots_total") or 0.0) >= 1
    for kind in ("lds", "rds", "cds", "eds"):  # a NACK-rate alert needs the series before one
        assert sample(text, "arks_xds_nacks_total", type=kind) is not None
        assert sample(text, "arks_xds_pushes_total", type=kind) is not None
