"""The Envoy stats inclusion list (arks/envoy_stats.py) on the real local Envoy: after traffic,
/stats/prometheus shows the families the dashboards and alerts read, and not the ones left out."""

from __future__ import annotations

import httpx

from tests.support.exposition import families
from tests.support.stack import Stack

INCLUDED = (
    "envoy_cluster_upstream_rq_xx",
    "envoy_cluster_upstream_rq_time",
    "envoy_cluster_upstream_rq_timeout",
    "envoy_cluster_upstream_rq_retry",
    "envoy_cluster_membership_healthy",
    "envoy_cluster_membership_total",
    "envoy_cluster_outlier_detection_ejections_active",
    "envoy_cluster_update_rejected",
    "envoy_http_downstream_rq_xx",
    "envoy_http_downstream_rq_time",
    "envoy_http_ext_proc_streams_started",
    "envoy_http_ext_proc_streams_failed",
    "envoy_http_ext_proc_message_timeouts",
    "envoy_http_rds_update_rejected",
    "envoy_access_logs_grpc_access_log_logs_written",
    "envoy_access_logs_grpc_access_log_logs_dropped",
    "envoy_cluster_manager_cds_update_rejected",
    "envoy_listener_manager_lds_update_rejected",
    "envoy_control_plane_connected_state",
    "envoy_server_live",
    "envoy_server_uptime",
)
EXCLUDED_PREFIXES = (
    "envoy_cluster_http2_",  # codec internals, per cluster
    "envoy_cluster_lb_",
    "envoy_cluster_upstream_cx_rx_bytes",
    "envoy_http_downstream_cx_length_ms",
    "envoy_http_tracing_",
    "envoy_filesystem_",
    "envoy_runtime_",
    "envoy_server_worker_",  # per worker thread
    "envoy_workers_",
    "envoy_thread_local_cluster_manager_",
)


def test_envoy_exports_what_dashboards_and_alerts_read_and_nothing_left_out(stack: Stack) -> None:
    answer = stack.client().chat.completions.create(
        model="model-a", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices
    stack.usage("alice", "model-a")  # the access log has been flushed
    text = httpx.get(f"{stack.local.admin_url}/stats/prometheus", timeout=5).text
    found = families(text)
    missing = [name for name in INCLUDED if name not in found]
    assert not missing
    left_out = [n for n in found if n.startswith(EXCLUDED_PREFIXES)]
    assert not left_out
    assert len(found) < 250  # without the inclusion list, Envoy 1.40 exports about 450 families
