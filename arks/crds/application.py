"""ArksApplication and ArksDisaggregatedApplication: engine deployments of a model."""

from __future__ import annotations

from arks.crds.render import Column, Kind, Scale
from arks.crds.schema import (
    NAME_PATTERN,
    Schema,
    array,
    boolean,
    conditions,
    integer,
    map_of,
    obj,
    object_ref,
    observed_generation,
    passthrough,
    rule,
    string,
)

RUNTIMES = ("vllm", "sglang", "dynamo")
DISAGGREGATED_RUNTIMES = ("sglang", "dynamo")
PHASES = ("Pending", "Checking", "Loading", "Creating", "Running", "Failed")
METRICS = (
    "waitingRequests",
    "kvCacheUsage",
    "timeToFirstToken",
    "timePerOutputToken",
    "cpu",
)
AUTOSCALING_PROVIDERS = ("hpa", "keda")
# When autoscaling names no metrics: queue length, never the HPA's CPU fallback.
DEFAULT_AUTOSCALING_METRICS = ({"type": "waitingRequests", "target": 5},)
LATENCY_QUANTILES = (50, 90, 95, 99)  # arks.engine_series.ADAPTER_QUANTILES

# Every one of the `size` nodes of a replica runs an equal share of the engine's ranks.
RANKS_SPREAD_EVENLY = "(self.tensorParallelSize * self.pipelineParallelSize) % self.size == 0"
MIN_NOT_ABOVE_MAX = "self.minReplicas <= self.maxReplicas"


def instance_spec() -> Schema:
    """Pod template bits; Kubernetes types are passed through as given."""
    return obj(
        {
            "resources": passthrough(
                "Container resources (corev1.ResourceRequirements), e.g. nvidia.com/gpu limits."
            ),
            "nodeSelector": map_of(string(), "Node labels the engine pods must match."),
            "tolerations": array(
                passthrough("A corev1.Toleration."), "Tolerations of the engine pods."
            ),
            "affinity": passthrough("corev1.Affinity of the engine pods."),
            "env": array(
                obj(
                    {"name": string("Variable name.", min_length=1)},
                    "A corev1.EnvVar.",
                    required=["name"],
                    preserve_unknown=True,
                ),
                "Extra environment of the engine container.",
                map_keys=["name"],
            ),
            "annotations": map_of(string(), "Extra annotations of the engine pods."),
            "labels": map_of(string(), "Extra labels of the engine pods."),
            "serviceAccountName": string(
                "Service account of the engine pods.", pattern=NAME_PATTERN
            ),
            "volumes": array(passthrough("A corev1.Volume."), "Extra volumes of the engine pods."),
            "volumeMounts": array(
                passthrough("A corev1.VolumeMount."), "Extra mounts of the engine container."
            ),
            "securityContext": passthrough(
                "corev1.SecurityContext of the engine container, e.g. "
                "capabilities: {add: [IPC_LOCK]} for RDMA memory registration."
            ),
            "podSecurityContext": passthrough("corev1.PodSecurityContext of the engine pods."),
            "hostNetwork": boolean(
                "Run the engine pods in the node's network namespace (RDMA/RoCE without a "
                "secondary network); dnsPolicy becomes ClusterFirstWithHostNet."
            ),
            "hostIPC": boolean("Share the node's IPC namespace (some NCCL/RDMA setups)."),
            "runtimeClassName": string(
                "RuntimeClass of the engine pods (e.g. nvidia).", pattern=NAME_PATTERN
            ),
            "priorityClassName": string("PriorityClass of the engine pods.", pattern=NAME_PATTERN),
            "schedulerName": string("Scheduler of the engine pods (e.g. a gang scheduler)."),
            "imagePullSecrets": array(
                obj(
                    {"name": string("Secret name.", pattern=NAME_PATTERN)},
                    "A corev1.LocalObjectReference.",
                    required=["name"],
                ),
                "Secrets for pulling the engine image.",
                map_keys=["name"],
            ),
        },
        "Pod template bits of the engine pods.",
    )


def _model() -> Schema:
    return object_ref("The ArksModel to serve, in the same namespace.")


def _args(description: str) -> Schema:
    return array(string(), description)


def _parallelism(description: str) -> Schema:
    return integer(description, minimum=1, maximum=1024, default=1)


def _scaling_rules(description: str) -> Schema:
    """autoscaling/v2 HPAScalingRules."""
    return obj(
        {
            "stabilizationWindowSeconds": integer(
                "Seconds of past recommendations considered; the most cautious one wins.",
                minimum=0,
                maximum=3600,
            ),
            "selectPolicy": string(
                "Which policy applies when several do; Disabled forbids changes this way.",
                enum=["Max", "Min", "Disabled"],
            ),
            "policies": array(
                obj(
                    {
                        "type": string("Pods or Percent.", enum=["Pods", "Percent"]),
                        "value": integer("Pods, or percent of the current replicas.", minimum=1),
                        "periodSeconds": integer(
                            "Window the change is limited over.", minimum=1, maximum=1800
                        ),
                    },
                    "At most `value` pods (or percent) per `periodSeconds`.",
                    required=["type", "value", "periodSeconds"],
                ),
                "Limits on the rate of change.",
                max_items=10,
            ),
        },
        description,
    )


autoscaling = obj(
    {
        "provider": string(
            "What scales the replicas: an HPA on prometheus-adapter's custom metrics (hpa) or a "
            "KEDA ScaledObject with Prometheus queries (keda).",
            enum=AUTOSCALING_PROVIDERS,
            default="hpa",
        ),
        "minReplicas": integer(
            "Fewest replicas. Not 0: the engines' own metrics cannot wake a scaled-to-zero "
            "application.",
            minimum=1,
            default=1,
        ),
        "maxReplicas": integer("Most replicas.", minimum=1),
        "engineVersion": string(
            "The engine's release (e.g. 0.8.5; for dynamo the vLLM it runs) when the image tag "
            "does not say it; it picks the metric names (vLLM renamed some in 0.11).",
            pattern=r"^v?[0-9]+\.[0-9]+(\.[0-9]+)*([-+.][0-9A-Za-z.+-]*)?$",
            max_length=64,
        ),
        "metrics": array(
            obj(
                {
                    "type": string("What to scale on.", enum=METRICS),
                    "target": integer(
                        "Target per replica: waiting requests; a percentage for kvCacheUsage "
                        "and cpu; milliseconds for timeToFirstToken and timePerOutputToken.",
                        minimum=1,
                    ),
                    "quantile": integer(
                        "Latency types only: the percentile held to the target (default 90).",
                        enum=LATENCY_QUANTILES,
                    ),
                },
                "One scaling metric.",
                required=["type", "target"],
                rules=[
                    rule(
                        "!(self.type in ['kvCacheUsage', 'cpu']) || self.target <= 100",
                        "kvCacheUsage and cpu targets are percentages (1-100)",
                    ),
                    rule(
                        "!has(self.quantile) || self.type in "
                        "['timeToFirstToken', 'timePerOutputToken']",
                        "quantile applies to timeToFirstToken and timePerOutputToken only",
                    ),
                ],
            ),
            "Metrics the replica count follows; the largest proposal wins. Default: waiting "
            "requests, 5 per replica.",
            map_keys=["type"],
            min_items=1,
            max_items=len(METRICS),
            default=[dict(m) for m in DEFAULT_AUTOSCALING_METRICS],
        ),
        "behavior": obj(
            {
                "scaleUp": _scaling_rules("How fast replicas are added (HPA defaults)."),
                "scaleDown": _scaling_rules(
                    "How fast replicas are removed (default: 10 minutes' stabilisation, one "
                    "pod per 2 minutes)."
                ),
            },
            "Scaling behaviour (autoscaling/v2 HPA behavior), for both providers.",
        ),
    },
    "Horizontal autoscaling of the replicas.",
    required=["maxReplicas"],
    rules=[rule(MIN_NOT_ABOVE_MAX, "minReplicas must not exceed maxReplicas")],
)

_replica_status = {
    "replicas": integer("Replicas that exist.", minimum=0),
    "readyReplicas": integer("Replicas that serve.", minimum=0),
}

application_spec = obj(
    {
        "runtime": string("Inference engine.", enum=RUNTIMES, default="vllm"),
        "image": string("Engine image; empty uses the runtime's default image."),
        "model": _model(),
        "servedModelName": string("Model name the engine answers to; defaults to the model name."),
        "replicas": integer("Number of engine instances.", minimum=0, default=1),
        "size": integer(
            "Nodes per instance; more than 1 deploys a LeaderWorkerSet.", minimum=1, default=1
        ),
        "tensorParallelSize": _parallelism("Tensor parallel degree of one instance."),
        "pipelineParallelSize": _parallelism("Pipeline parallel degree of one instance."),
        "runtimeCommonArgs": _args("Extra engine command-line arguments."),
        "instanceSpec": instance_spec(),
        "autoscaling": autoscaling,
    },
    "An engine deployment.",
    required=["model"],
    rules=[
        rule(
            RANKS_SPREAD_EVENLY,
            "tensorParallelSize * pipelineParallelSize must be a multiple of size",
        )
    ],
)

application_status = obj(
    {
        "phase": string("Where the application is in its life cycle.", enum=PHASES),
        "observedGeneration": observed_generation(),
        **_replica_status,
        "updatedReplicas": integer("Replicas running the current spec.", minimum=0),
        "selector": string("Label selector of the engine pods, for the scale subresource."),
        "conditions": conditions(),
    },
    "Observed state, written by the controller.",
)

APPLICATION = Kind(
    kind="ArksApplication",
    plural="arksapplications",
    short_names=("arkapp",),
    description="ArksApplication deploys an inference engine (vLLM, SGLang, Dynamo) serving an ArksModel.",
    spec=application_spec,
    status=application_status,
    columns=(
        Column("Model", ".spec.model.name"),
        Column("Runtime", ".spec.runtime"),
        Column("Phase", ".status.phase"),
        Column("Replicas", ".status.replicas", "integer"),
        Column("Ready", ".status.readyReplicas", "integer"),
    ),
    scale=Scale(),
)


def _group(role: str) -> Schema:
    return obj(
        {
            "replicas": integer(f"Number of {role} instances.", minimum=0, default=1),
            "size": integer("Nodes per instance.", minimum=1, default=1),
            "tensorParallelSize": _parallelism("Tensor parallel degree of one instance."),
            "pipelineParallelSize": _parallelism("Pipeline parallel degree of one instance."),
            "instanceSpec": instance_spec(),
            "runtimeCommonArgs": _args(f"Extra {role} engine arguments."),
        },
        f"The {role} instances.",
        rules=[
            rule(
                RANKS_SPREAD_EVENLY,
                "tensorParallelSize * pipelineParallelSize must be a multiple of size",
            )
        ],
    )


def _group_status(role: str) -> Schema:
    return obj(_replica_status, f"Replicas of the {role} group.")


disaggregated_spec = obj(
    {
        "runtime": string("Inference engine.", enum=DISAGGREGATED_RUNTIMES, default="sglang"),
        "image": string("Engine image; empty uses the runtime's default image."),
        "model": _model(),
        "servedModelName": string("Model name the router answers to; defaults to the model name."),
        "router": obj(
            {
                "replicas": integer("Number of routers.", minimum=0, default=1),
                "image": string("Router image; empty uses the runtime's default router."),
                "args": _args("Extra router arguments."),
                "instanceSpec": instance_spec(),
            },
            "The router that pairs prefill and decode instances.",
        ),
        "prefill": _group("prefill"),
        "decode": _group("decode"),
    },
    "A prefill/decode split deployment behind a router.",
    required=["model", "prefill", "decode"],
)

disaggregated_status = obj(
    {
        "phase": string("Where the application is in its life cycle.", enum=PHASES),
        "observedGeneration": observed_generation(),
        "router": _group_status("router"),
        "prefill": _group_status("prefill"),
        "decode": _group_status("decode"),
        "conditions": conditions(),
    },
    "Observed state, written by the controller.",
)

DISAGGREGATED_APPLICATION = Kind(
    kind="ArksDisaggregatedApplication",
    plural="arksdisaggregatedapplications",
    short_names=("arkdapp",),
    description="ArksDisaggregatedApplication deploys prefill and decode engines of one model behind a router.",
    spec=disaggregated_spec,
    status=disaggregated_status,
    columns=(
        Column("Model", ".spec.model.name"),
        Column("Runtime", ".spec.runtime"),
        Column("Phase", ".status.phase"),
        Column("Prefill", ".status.prefill.readyReplicas", "integer"),
        Column("Decode", ".status.decode.readyReplicas", "integer"),
    ),
)
