"""Engines and traffic: the engines' load as they report it and as the controller weighs it,
how the gateway and Envoy spread requests over them, and their autoscaling.

Engine series (`vllm:*`) carry the served model as `model_name` and the engine pod's namespace
(PodMonitor target label, or the local scrape config's) as `namespace`.
"""

from __future__ import annotations

from grafana_foundation_sdk.models.dashboard import Dashboard

from arks.dashboards.panels import (
    MODEL,
    NAMESPACE,
    Board,
    by,
    graph,
    or_zero,
    quantile,
    rate,
    single,
    target,
)

UID = "arks-engines"


def dashboard() -> Dashboard:
    b = Board(
        uid=UID,
        title="Arks / Engines and traffic",
        description="Engine load, weights, picks, retries, health and autoscaling per model.",
        variables=(NAMESPACE, MODEL),
        source="arks_engine_weight",
    )
    ns_model = (NAMESPACE, MODEL)
    weight = b.where("arks_engine_weight", *ns_model)

    def engine(metric: str) -> str:
        """An engine's own series, `model_name` filtered by the model variable."""
        return f'{metric}{{namespace=~"$namespace", model_name=~"$model"}}'

    b.row("Weights")
    b.add(
        graph(
            "Engine weights",
            "The weight the controller publishes per engine, from its load (0: drained).",
            [target(by(["model", "engine"], weight, op="max"), "{{model}} {{engine}}")],
            span=18,
        ),
        single(
            "Drained engines",
            "Engines at weight 0 (no traffic while another is pickable).",
            [target(or_zero(f"count({weight} == 0)"))],
            steps=((None, "green"), (1, "orange")),
        ),
    )

    b.row("Load")
    b.add(
        graph(
            "Waiting requests per engine",
            "Queued for a batch slot: as the controller scraped it (`arks_engine_*`) and as the "
            "engine exports it (`vllm:num_requests_waiting`).",
            [
                target(
                    by(["model", "engine"], b.where("arks_engine_waiting_requests", *ns_model)),
                    "controller {{model}} {{engine}}",
                ),
                target(
                    by(["model_name", "instance"], engine("vllm:num_requests_waiting")),
                    "engine {{model_name}} {{instance}}",
                ),
            ],
            span=8,
        ),
        graph(
            "Running requests per engine",
            "Being generated.",
            [
                target(
                    by(["model", "engine"], b.where("arks_engine_running_requests", *ns_model)),
                    "controller {{model}} {{engine}}",
                ),
                target(
                    by(["model_name", "instance"], engine("vllm:num_requests_running")),
                    "engine {{model_name}} {{instance}}",
                ),
            ],
            span=8,
        ),
        graph(
            "KV cache use per engine",
            "0..1. vLLM >= 0.11 exports `vllm:kv_cache_usage_perc`, older releases "
            "`vllm:gpu_cache_usage_perc`.",
            [
                target(
                    by(
                        ["model", "engine"],
                        b.where("arks_engine_kv_cache_usage_ratio", *ns_model),
                        op="max",
                    ),
                    "controller {{model}} {{engine}}",
                ),
                target(
                    by(
                        ["model_name", "instance"],
                        f"{engine('vllm:kv_cache_usage_perc')} or "
                        f"{engine('vllm:gpu_cache_usage_perc')}",
                        op="max",
                    ),
                    "engine {{model_name}} {{instance}}",
                ),
            ],
            unit="percentunit",
            span=8,
        ),
    )

    b.row("Latency")
    b.add(
        graph(
            "Time to first token p95: engine vs gateway",
            "The engine's own TTFT against the gateway's (which adds queueing in Envoy, the "
            "gateway's decision and the network).",
            [
                target(
                    quantile(
                        0.95, engine("vllm:time_to_first_token_seconds_bucket"), ["model_name"]
                    ),
                    "engine {{model_name}}",
                ),
                target(
                    quantile(
                        0.95,
                        b.where("arks_time_to_first_token_seconds_bucket", *ns_model),
                        ["model"],
                    ),
                    "gateway {{model}}",
                ),
            ],
            unit="s",
        ),
        graph(
            "Request latency p95: engine vs gateway",
            "The engine's end-to-end latency against the time the gateway saw at the engine.",
            [
                target(
                    quantile(
                        0.95, engine("vllm:e2e_request_latency_seconds_bucket"), ["model_name"]
                    ),
                    "engine {{model_name}}",
                ),
                target(
                    quantile(
                        0.95, b.where("arks_upstream_duration_seconds_bucket", *ns_model), ["model"]
                    ),
                    "gateway {{model}}",
                ),
            ],
            unit="s",
        ),
    )

    def per_model(metric: str) -> str:
        return by(["model"], rate(b.where(metric, *ns_model)))

    b.row("Traffic")
    b.add(
        graph(
            "Picks by reason",
            "Engine picks of least-load and prefix-cache endpoints: least_load, prefix_hit, "
            "prefix_miss; fallback (Envoy balanced), refused (503), unmanaged.",
            [
                target(
                    by(["model", "reason"], rate(b.where("arks_picks_total", *ns_model))),
                    "{{model}} {{reason}}",
                )
            ],
            unit="ops",
            span=8,
        ),
        graph(
            "Retries, timeouts and ejections",
            "Retries the gateway saw in the access log, and Envoy's per-cluster timeouts, "
            "retries and outlier-detection ejections.",
            [
                target(per_model("arks_upstream_retries_total"), "{{model}} retries (gateway)"),
                target(per_model("envoy_cluster_upstream_rq_retry"), "{{model}} retries (Envoy)"),
                target(per_model("envoy_cluster_upstream_rq_timeout"), "{{model}} timeouts"),
                target(
                    per_model("envoy_cluster_outlier_detection_ejections_enforced_total"),
                    "{{model}} ejections",
                ),
            ],
            unit="ops",
            span=8,
        ),
        graph(
            "Healthy engines per model",
            "Envoy's healthy hosts of each model's cluster, of all its hosts.",
            [
                target(
                    by(["model"], b.where("envoy_cluster_membership_healthy", *ns_model)),
                    "{{model}} healthy",
                ),
                target(
                    by(["model"], b.where("envoy_cluster_membership_total", *ns_model)),
                    "{{model}} total",
                ),
            ],
            span=8,
        ),
    )

    def hpa(metric: str) -> str:
        return by(["horizontalpodautoscaler"], f'{metric}{{namespace=~"$namespace"}}', op="max")

    b.row("Autoscaling")
    b.add(
        graph(
            "Replicas: current vs desired",
            "Each application's HorizontalPodAutoscaler (kube-state-metrics), and its maximum.",
            [
                target(
                    hpa("kube_horizontalpodautoscaler_status_current_replicas"),
                    "{{horizontalpodautoscaler}} current",
                ),
                target(
                    hpa("kube_horizontalpodautoscaler_status_desired_replicas"),
                    "{{horizontalpodautoscaler}} desired",
                ),
                target(
                    hpa("kube_horizontalpodautoscaler_spec_max_replicas"),
                    "{{horizontalpodautoscaler}} max",
                ),
            ],
            span=24,
        ),
    )
    return b.build()
