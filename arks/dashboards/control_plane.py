"""Control plane: the controller's reconciles and leadership, the xDS server and what Envoy made
of its updates, and the configuration reloads of the gateway and the rate-limit service."""

from __future__ import annotations

from grafana_foundation_sdk.models.dashboard import Dashboard

from arks.dashboards.panels import (
    MODEL,
    NAMESPACE,
    Board,
    by,
    graph,
    instant,
    listing,
    quantile,
    rate,
    single,
    target,
)

UID = "arks-control-plane"


def dashboard() -> Dashboard:
    b = Board(
        uid=UID,
        title="Arks / Control plane",
        description="Controller reconciles, leader election, xDS, and configuration reloads.",
        variables=(NAMESPACE, MODEL),
        source="arks_engine_weight",
    )

    def increase(selector: str) -> str:
        return f"increase({selector}[$__rate_interval])"

    b.row("Controller")
    b.add(
        single(
            "Leaders",
            "Controller replicas holding the leader Lease: exactly 1 is healthy.",
            [target(by((), "arks_controller_leader"))],
            steps=((None, "red"), (1, "green"), (2, "red")),
        ),
        listing(
            "Running versions",
            "Processes per service and version (`arks_build_info`).",
            [instant(by(["service", "version"], "arks_build_info", op="count"))],
            span=18,
        ),
        graph(
            "Reconciles by controller and result",
            "success, retry (a temporary error: requeued), permanent_error, error.",
            [
                target(
                    by(["controller", "result"], rate("arks_controller_reconcile_total")),
                    "{{controller}} {{result}}",
                )
            ],
            unit="ops",
        ),
        graph(
            "Reconcile latency p99",
            "Time one reconcile took, per controller.",
            [
                target(
                    quantile(
                        0.99, "arks_controller_reconcile_duration_seconds_bucket", ["controller"]
                    ),
                    "{{controller}}",
                )
            ],
            unit="s",
        ),
        graph(
            "Queue depth",
            "Keys waiting in each controller's work queue.",
            [target(by(["controller"], "arks_controller_queue_depth", op="max"), "{{controller}}")],
        ),
        graph(
            "Queue wait p99",
            "Time a key waited in the queue before a worker took it.",
            [
                target(
                    quantile(0.99, "arks_controller_queue_wait_seconds_bucket", ["controller"]),
                    "{{controller}}",
                )
            ],
            unit="s",
        ),
        graph(
            "Engine scrape errors",
            "Failed scrapes of engines' /metrics by the controller, per model: their weights "
            "are not updated while failing.",
            [
                target(
                    by(
                        ["namespace", "model"],
                        rate(b.where("arks_engine_scrape_errors_total", NAMESPACE, MODEL)),
                    ),
                    "{{namespace}}/{{model}}",
                )
            ],
            unit="ops",
            span=24,
        ),
    )

    b.row("xDS")
    b.add(
        single(
            "Connected Envoys",
            "Open ADS streams to the controller's xDS server.",
            [target(by((), "arks_xds_connected_streams"))],
            steps=((None, "red"), (1, "green")),
        ),
        graph(
            "Pushes and snapshots",
            "xDS responses sent by type, and snapshots handed to the server.",
            [
                target(by(["type"], rate("arks_xds_pushes_total")), "{{type}}"),
                target(by((), rate("arks_xds_snapshots_total")), "snapshots"),
            ],
            unit="ops",
            span=9,
        ),
        graph(
            "NACKs by type",
            "xDS responses Envoy rejected: it keeps running its last good configuration.",
            [target(by(["type"], increase("arks_xds_nacks_total")), "{{type}}")],
            span=9,
        ),
        graph(
            "xDS answer time p99",
            "From sending a response to Envoy's ACK or NACK of it, by type.",
            [target(quantile(0.99, "arks_xds_answer_seconds_bucket", ["type"]), "{{type}}")],
            unit="s",
        ),
        graph(
            "Resources sent by type",
            "All of a type per state-of-the-world response, only the changed ones per delta one.",
            [target(by(["type"], rate("arks_xds_resources_sent_total")), "{{type}}")],
            unit="ops",
        ),
    )

    b.row("Envoy configuration")
    b.add(
        graph(
            "Rejected updates (Envoy)",
            "Configuration updates Envoy refused, as Envoy counts them: listeners, clusters, "
            "routes, and endpoints per cluster.",
            [
                target(by((), increase("envoy_listener_manager_lds_update_rejected")), "lds"),
                target(by((), increase("envoy_cluster_manager_cds_update_rejected")), "cds"),
                target(by((), increase("envoy_http_rds_update_rejected")), "rds"),
                target(
                    by(
                        ["model"],
                        increase(b.where("envoy_cluster_update_rejected", NAMESPACE, MODEL)),
                    ),
                    "eds {{model}}",
                ),
            ],
        ),
        graph(
            "Envoys connected to their control plane",
            "Envoy's own view of its xDS connection (1: connected).",
            [target(by((), "envoy_control_plane_connected_state"), "connected")],
        ),
    )

    b.row("Policy and limits")
    b.add(
        graph(
            "Configuration reloads and errors",
            "Gateway policy reloads; rate-limit configuration reloads and rejected changes "
            "(the last good one stays).",
            [
                target(by((), increase("arks_policy_reloads_total")), "policy reloads"),
                target(
                    by((), increase("arks_ratelimit_config_reloads_total")), "rate-limit reloads"
                ),
                target(by((), increase("arks_ratelimit_config_errors_total")), "rate-limit errors"),
            ],
        ),
        graph(
            "Counter-store errors",
            "Decisions made without the counter store, by the policy applied (fail_open: "
            "limits not enforced; fail_closed: refused), and settlements dropped.",
            [target(by(["policy"], rate("arks_ratelimit_backend_errors_total")), "{{policy}}")],
            unit="ops",
        ),
    )
    return b.build()
