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


def test_standalone_controller_exports_engine_load_like_in_a_cluster(stack: Stack) -> None:
    """The same series as in Kubernetes mode, `engine` = the address: the engines' load and
    weight, errors of the engine nothing listens on (refused), the leader gauge at 1; an
    endpoint removed from the policy takes its engine's series with it."""
    url = f"{stack.local.controller_url}/metrics"
    a = {"namespace": "default", "model": "model-a", "engine": f"127.0.0.1:{stack.sim_ports['a']}"}
    down = {"namespace": "default", "model": "model-down"}
    down_engine = {**down, "engine": f"127.0.0.1:{stack.sim_ports['down']}"}

    def errors(text: str) -> float:
        return sample(text, "arks_engine_scrape_errors_total", **down) or 0.0

    text = wait_for(
        lambda: httpx.get(url, timeout=5).text,
        lambda t: sample(t, "arks_engine_waiting_requests", **a) is not None and errors(t) > 0,
        timeout=10,
    )
    assert sample(text, "arks_engine_running_requests", **a) is not None
    assert sample(text, "arks_engine_kv_cache_usage_ratio", **a) is not None
    assert (sample(text, "arks_engine_weight", **a) or 0) > 0
    assert sample(text, "arks_engine_waiting_requests", **down_engine) is None  # unknown
    assert sample(text, "arks_engine_weight", **down_engine) is not None  # drained or about to
    assert sample(text, "arks_controller_leader") == 1.0
    assert families(text)["arks_controller_queue_wait_seconds"].type == "histogram"
    before = errors(text)
    wait_for(lambda: errors(httpx.get(url, timeout=5).text), lambda n: n > before, timeout=10)

    documents = stack.documents
    without_down = [d for d in documents if d["metadata"]["name"] not in ("model-down", "sim-down")]
    stack.write_policy(without_down)
    try:
        wait_for(
            lambda: httpx.get(url, timeout=5).text,
            lambda t: sample(t, "arks_engine_weight", **down_engine) is None,
            timeout=10,
        )
    finally:
        stack.write_policy(documents)
