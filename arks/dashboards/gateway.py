"""Gateway overview: what the edge answers, how fast, and whether usage is being counted."""

from __future__ import annotations

from grafana_foundation_sdk.models.dashboard import Dashboard

from arks.dashboards.panels import (
    MODEL,
    NAMESPACE,
    Board,
    Target,
    by,
    graph,
    instant,
    or_zero,
    quantile,
    rate,
    single,
    target,
)

UID = "arks-gateway"
QUANTILES = (0.5, 0.95, 0.99)


def dashboard() -> Dashboard:
    b = Board(
        uid=UID,
        title="Arks / Gateway overview",
        description="Requests, denials, tokens and latency at the Arks gateway (Envoy + extproc).",
        variables=(NAMESPACE, MODEL),
        source="arks_requests_total",
    )
    ns_model = (NAMESPACE, MODEL)
    requests = b.where("arks_requests_total", *ns_model)
    failed = b.where("arks_requests_total", *ns_model, extra='code=~"5.."')
    denials = b.where("arks_gateway_denials_total", *ns_model)
    denied_5xx = b.where("arks_gateway_denials_total", *ns_model, extra='status=~"5.."')

    def availability(window: str) -> str:
        bad = (
            f"{or_zero(by((), rate(failed, window)))} + {or_zero(by((), rate(denied_5xx, window)))}"
        )
        answered = (
            f"{or_zero(by((), rate(requests, window)))} + {or_zero(by((), rate(denials, window)))}"
        )
        return f"1 - ({bad}) / ({answered})"

    b.row("Traffic")
    b.add(
        graph(
            "Requests per second by status",
            "Finished admitted requests by the status the client got (`arks_requests_total`), "
            "and the requests the gateway refused itself by status (`arks_gateway_denials_total`).",
            [
                target(by(["code"], rate(requests)), "{{code}}"),
                target(by(["status"], rate(denials)), "denied {{status}}"),
            ],
            unit="reqps",
            stacked=True,
        ),
        graph(
            "Availability",
            "Share of answers that were not a 5xx, over admitted requests and the gateway's own "
            "refusals (a 4xx refusal is the client's error, not the edge's).",
            [target(availability("$__rate_interval"), "availability")],
            unit="percentunit",
            span=6,
        ),
        single(
            "Availability over the range",
            "The same ratio over the whole time range.",
            [instant(availability("$__range"))],
            unit="percentunit",
            steps=((None, "red"), (0.99, "orange"), (0.999, "green")),
        ),
        graph(
            "Denials by reason",
            "Refusals by the check that refused: rpm, rpd, tpm, tpd, concurrency, quota, or the "
            "error code (auth, unknown model...).",
            [target(by(["reason"], rate(denials)), "{{reason}}")],
            unit="reqps",
            stacked=True,
        ),
        graph(
            "Requests in flight",
            "Admitted requests whose access-log entry has not arrived yet.",
            [target(by(["model"], b.where("arks_in_flight_requests", *ns_model)), "{{model}}")],
        ),
    )

    tokens = b.where("arks_usage_tokens_total", *ns_model)
    b.row("Tokens")
    b.add(
        graph(
            "Tokens per second by model and type",
            "Tokens charged (prompt, completion): engine-reported, or estimated.",
            [target(by(["model", "type"], rate(tokens)), "{{model}} {{type}}")],
            span=24,
            stacked=True,
        ),
    )

    def percentiles(metric: str) -> list[Target]:
        selector = b.where(metric, *ns_model)
        return [target(quantile(q, selector), f"p{round(q * 100)}") for q in QUANTILES]

    b.row("Latency")
    b.add(
        graph(
            "Request duration",
            "From the request's first byte to the answer's last byte sent (Envoy's access log).",
            percentiles("arks_request_duration_seconds_bucket"),
            unit="s",
            span=6,
        ),
        graph(
            "Time to first token",
            "Streamed successful requests: first request byte to first content byte sent.",
            percentiles("arks_time_to_first_token_seconds_bucket"),
            unit="s",
            span=6,
        ),
        graph(
            "Time per output token",
            "Streamed successful requests: (duration - TTFT) / (completion tokens - 1).",
            percentiles("arks_time_per_output_token_seconds_bucket"),
            unit="s",
            span=6,
        ),
        graph(
            "Engine time p95 by model",
            "Time at the engine: the request's first byte sent to it to the answer's last byte.",
            [
                target(
                    quantile(
                        0.95, b.where("arks_upstream_duration_seconds_bucket", *ns_model), ["model"]
                    ),
                    "{{model}}",
                )
            ],
            unit="s",
            span=6,
        ),
    )

    rq_xx = b.where("envoy_cluster_upstream_rq_xx", *ns_model)
    b.row("Envoy upstream")
    b.add(
        graph(
            "Upstream latency p95 per model (Envoy)",
            "Envoy's `upstream_rq_time` per engine cluster, relabelled into namespace and model.",
            [
                target(
                    quantile(
                        0.95, b.where("envoy_cluster_upstream_rq_time_bucket", *ns_model), ["model"]
                    ),
                    "{{model}}",
                )
            ],
            unit="ms",
            span=8,
        ),
        graph(
            "Upstream responses by class per model (Envoy)",
            "Engine answers by status class (2, 4, 5) as Envoy saw them.",
            [
                target(
                    by(["model", "envoy_response_code_class"], rate(rq_xx)),
                    "{{model}} {{envoy_response_code_class}}xx",
                )
            ],
            unit="reqps",
            span=8,
        ),
        graph(
            "Upstream errors per model (Envoy)",
            "Engine 5xx answers, request timeouts and resets received from engines.",
            [
                target(
                    by(
                        ["model"],
                        rate(
                            b.where(
                                "envoy_cluster_upstream_rq_xx",
                                *ns_model,
                                extra='envoy_response_code_class="5"',
                            )
                        ),
                    ),
                    "{{model}} 5xx",
                ),
                target(
                    by(["model"], rate(b.where("envoy_cluster_upstream_rq_timeout", *ns_model))),
                    "{{model}} timeouts",
                ),
                target(
                    by(["model"], rate(b.where("envoy_cluster_upstream_rq_rx_reset", *ns_model))),
                    "{{model}} resets",
                ),
            ],
            unit="reqps",
            span=8,
        ),
    )

    b.row("ext_proc")
    b.add(
        graph(
            "ext_proc streams (Envoy)",
            "Envoy's ext_proc filter: streams started and failed, messages timed out, and "
            "requests let through without the gateway (failure_mode_allow: fail-open).",
            [
                target(by((), rate("envoy_http_ext_proc_streams_started")), "started"),
                target(by((), rate("envoy_http_ext_proc_streams_failed")), "failed"),
                target(by((), rate("envoy_http_ext_proc_message_timeouts")), "timeouts"),
                target(by((), rate("envoy_http_ext_proc_failure_mode_allowed")), "fail-open"),
            ],
            unit="ops",
            span=12,
        ),
        graph(
            "Decision latency p99",
            "The gateway's own work per phase (headers decision, admission, settlement), its "
            "engine pick, and the rate-limit service's answer per domain.",
            [
                target(
                    quantile(0.99, "arks_gateway_decision_seconds_bucket", ["phase"]), "{{phase}}"
                ),
                target(quantile(0.99, "arks_pick_seconds_bucket"), "pick"),
                target(
                    quantile(0.99, "arks_ratelimit_call_seconds_bucket", ["domain"]),
                    "rate-limit {{domain}}",
                ),
            ],
            unit="s",
            span=12,
        ),
    )

    estimated = b.where("arks_usage_estimated_requests_total", *ns_model)
    b.row("Usage pipeline")
    b.add(
        graph(
            "Access-log entries",
            "Usage reaches the gateway as Envoy's gRPC access-log entries: written and dropped "
            "by Envoy, received by the gateway. Dropped entries are usage charged by estimate.",
            [
                target(by((), rate("envoy_access_logs_grpc_access_log_logs_written")), "written"),
                target(by((), rate("envoy_access_logs_grpc_access_log_logs_dropped")), "dropped"),
                target(by((), rate("arks_access_log_entries_total")), "received"),
                target(
                    by((), rate("arks_usage_reported_elsewhere_requests_total")),
                    "received by another replica",
                ),
            ],
            unit="ops",
            span=6,
        ),
        graph(
            "Pending usage",
            "Admitted requests whose usage has not arrived yet (in flight, or the access log "
            "is behind).",
            [target(by((), "arks_usage_pending_requests"), "pending")],
            span=6,
        ),
        graph(
            "Unreported requests",
            "Admitted requests whose access-log entry never came: charged with the prompt "
            "estimate.",
            [
                target(
                    by(["model"], rate(b.where("arks_usage_unreported_requests_total", *ns_model))),
                    "{{model}}",
                )
            ],
            unit="reqps",
            span=6,
        ),
        graph(
            "Estimated share of usage",
            "Share of finished requests charged with an estimate, by reason (the engine "
            "reported no usage).",
            [
                target(
                    f"{by(['reason'], rate(estimated))} / ignoring (reason) group_left "
                    f"{by((), rate(requests))}",
                    "{{reason}}",
                )
            ],
            unit="percentunit",
            span=6,
        ),
    )

    service = "on (job, instance) group_left (service) arks_build_info"
    b.row("Processes")
    b.add(
        graph(
            "CPU per service",
            "CPU seconds per second of each Arks process (`process_cpu_seconds_total`), named "
            "by its `arks_build_info`.",
            [
                target(
                    by(["service", "instance"], f"{rate('process_cpu_seconds_total')} * {service}"),
                    "{{service}} {{instance}}",
                )
            ],
            unit="percentunit",
        ),
        graph(
            "Resident memory per service",
            "RSS of each Arks process.",
            [
                target(
                    by(["service", "instance"], f"process_resident_memory_bytes * {service}"),
                    "{{service}} {{instance}}",
                )
            ],
            unit="bytes",
        ),
    )
    return b.build()
