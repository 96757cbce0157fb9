"""Render an ArksApplication into the objects that run it: pure, CR in, objects out.

size == 1 -> Deployment; size > 1 -> LeaderWorkerSet (one group of `size` pods per
replica). Plus a Service over the pods that serve HTTP, and an autoscaling/v2 HPA when
`spec.autoscaling` is set. Owner references are left to the reconciler.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller.engines import (
    MODEL_DIR,
    EngineSpec,
    Role,
    engine_command,
    engine_for,
    parallelism,
    served_model_name,
)

GPU_RESOURCE = "nvidia.com/gpu"
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_APPLICATION = "arks.ai/application"
LABEL_MODEL = "arks.ai/model"
LABEL_SERVED_NAME = "arks.ai/served-model-name"
LABEL_ROLE = "arks.ai/role"
ANNOTATION_SERVED_NAME = "arks.ai/served-model-name"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class RenderDefaults:
    """Settings a cluster operator may tune; one value per controller, passed in."""

    # Loading tens of GB of weights and compiling kernels can take many minutes.
    startup_budget_s: int = 1800
    startup_period_s: int = 10
    readiness_period_s: int = 5
    liveness_period_s: int = 15
    liveness_failures: int = 4
    probe_timeout_s: int = 5
    shm_size: str = "16Gi"  # NCCL and engine workers share tensors through /dev/shm


def label_value(value: str) -> str:
    """`value` if it is a valid label value, else a readable form with a hash suffix.

    Served names such as `meta-llama/Llama-3.1-8B` contain `/`; the exact name is kept in
    an annotation, the label only has to be stable and equal for equal names.
    """
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:52].strip("-_.")
    return f"{readable}-{digest}" if readable else digest


def _selector(name: str) -> dict[str, str]:
    return {LABEL_APPLICATION: name}


def _labels(app: Mapping[str, Any], engine: EngineSpec) -> dict[str, str]:
    spec = app["spec"]
    return {
        LABEL_NAME: engine.runtime,
        LABEL_MANAGED_BY: "arks",
        LABEL_APPLICATION: app["metadata"]["name"],
        LABEL_MODEL: label_value(spec["model"]["name"]),
        LABEL_SERVED_NAME: label_value(served_model_name(spec)),
    }


def _meta(app: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, Any]:
    return {
        "name": app["metadata"]["name"],
        "namespace": app["metadata"]["namespace"],
        "labels": dict(labels),
        "annotations": {ANNOTATION_SERVED_NAME: served_model_name(app["spec"])},
    }


def _resources(instance: Mapping[str, Any], gpus: int) -> dict[str, Any]:
    resources: dict[str, Any] = copy.deepcopy(dict(instance.get("resources") or {}))
    declared = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
    if GPU_RESOURCE not in declared:
        # Extended resources are requested through limits; requests default to them.
        resources.setdefault("limits", {})[GPU_RESOURCE] = str(gpus)
    return resources


def _probes(engine: EngineSpec, d: RenderDefaults) -> dict[str, Any]:
    get = {"path": engine.health_path, "port": "http"}
    return {
        "startupProbe": {
            "httpGet": get,
            "periodSeconds": d.startup_period_s,
            "timeoutSeconds": d.probe_timeout_s,
            "failureThreshold": -(-d.startup_budget_s // d.startup_period_s),
        },
        "readinessProbe": {
            "httpGet": dict(get),
            "periodSeconds": d.readiness_period_s,
            "timeoutSeconds": d.probe_timeout_s,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": dict(get),
            "periodSeconds": d.liveness_period_s,
            "timeoutSeconds": d.probe_timeout_s,
            "failureThreshold": d.liveness_failures,
        },
    }


def _pod_template(
    app: Mapping[str, Any],
    role: Role,
    model_claim: str,
    model_sub_path: str,
    defaults: RenderDefaults,
) -> dict[str, Any]:
    spec = app["spec"]
    engine = engine_for(spec)
    instance: Mapping[str, Any] = spec.get("instanceSpec") or {}
    serves_http = role != "worker"

    labels = {**(instance.get("labels") or {}), **_labels(app, engine)}
    if role != "single":
        labels[LABEL_ROLE] = role
    annotations = dict(instance.get("annotations") or {})

    mount: dict[str, Any] = {"name": "model", "mountPath": MODEL_DIR, "readOnly": True}
    if model_sub_path:
        mount["subPath"] = model_sub_path
    container: dict[str, Any] = {
        "name": "engine",
        "image": spec.get("image") or engine.default_image,
        "command": engine_command(app, role),
        "resources": _resources(instance, parallelism(spec).gpus_per_pod),
        "volumeMounts": [
            mount,
            {"name": "dshm", "mountPath": "/dev/shm"},
            *copy.deepcopy(instance.get("volumeMounts") or []),
        ],
    }
    if instance.get("env"):
        container["env"] = copy.deepcopy(instance["env"])
    if serves_http:
        container["ports"] = [
            {"name": "http", "containerPort": engine.default_port, "protocol": "TCP"}
        ]
        container.update(_probes(engine, defaults))

    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {
                "name": "model",
                "persistentVolumeClaim": {"claimName": model_claim, "readOnly": True},
            },
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": defaults.shm_size}},
            *copy.deepcopy(instance.get("volumes") or []),
        ],
    }
    for key in ("nodeSelector", "tolerations", "affinity", "serviceAccountName"):
        if instance.get(key):
            pod[key] = copy.deepcopy(instance[key])

    metadata: dict[str, Any] = {"labels": labels}
    if annotations:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": pod}


def _replicas(spec: Mapping[str, Any]) -> dict[str, int]:
    # With an HPA the HPA owns the replica count; applying ours too would fight it.
    return {} if spec.get("autoscaling") else {"replicas": int(spec.get("replicas", 1))}


def _workload(
    app: Mapping[str, Any], model_claim: str, model_sub_path: str, defaults: RenderDefaults
) -> dict[str, Any]:
    spec = app["spec"]
    labels = _labels(app, engine_for(spec))
    size = parallelism(spec).size
    if size == 1:
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(app, labels),
            "spec": {
                **_replicas(spec),
                "selector": {"matchLabels": _selector(app["metadata"]["name"])},
                "template": _pod_template(app, "single", model_claim, model_sub_path, defaults),
            },
        }
    return {
        "apiVersion": LWS_API_VERSION,
        "kind": "LeaderWorkerSet",
        "metadata": _meta(app, labels),
        "spec": {
            **_replicas(spec),
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": size,
                # A lost pod breaks the collective; restart the group together.
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": _pod_template(
                    app, "leader", model_claim, model_sub_path, defaults
                ),
                "workerTemplate": _pod_template(
                    app, "worker", model_claim, model_sub_path, defaults
                ),
            },
        },
    }


def _service(app: Mapping[str, Any]) -> dict[str, Any]:
    spec = app["spec"]
    engine = engine_for(spec)
    selector = _selector(app["metadata"]["name"])
    if parallelism(spec).size > 1:
        selector[LABEL_ROLE] = "leader"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(app, _labels(app, engine)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {
                    "name": "http",
                    "port": engine.default_port,
                    "targetPort": "http",
                    "protocol": "TCP",
                }
            ],
        },
    }


def _fraction(percent: int) -> str:
    """A percentage as a Kubernetes quantity of the 0..1 gauges engines export."""
    return f"{percent * 10}m"


def _hpa_metric(engine: EngineSpec, metric: Mapping[str, Any]) -> dict[str, Any]:
    kind, target = metric["type"], int(metric["target"])
    if kind == "cpu":
        return {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": target},
            },
        }
    if kind == "waitingRequests":
        name, value = engine.waiting_requests_metric, str(target)
    elif kind == "kvCacheUsage":
        name, value = engine.kv_cache_usage_metric, _fraction(target)
    else:
        raise ValueError(f"unknown autoscaling metric type {kind!r}")
    return {
        "type": "Pods",
        "pods": {
            "metric": {"name": name},
            "target": {"type": "AverageValue", "averageValue": value},
        },
    }


def _hpa(app: Mapping[str, Any], workload: Mapping[str, Any]) -> dict[str, Any]:
    spec = app["spec"]
    engine = engine_for(spec)
    scaling = spec["autoscaling"]
    hpa_spec: dict[str, Any] = {
        "scaleTargetRef": {
            "apiVersion": workload["apiVersion"],
            "kind": workload["kind"],
            "name": workload["metadata"]["name"],
        },
        "minReplicas": int(scaling.get("minReplicas", 1)),
        "maxReplicas": int(scaling["maxReplicas"]),
    }
    if scaling.get("metrics"):
        hpa_spec["metrics"] = [_hpa_metric(engine, m) for m in scaling["metrics"]]
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(app, _labels(app, engine)),
        "spec": hpa_spec,
    }


def render_application(
    app: Mapping[str, Any],
    model_claim: str,
    *,
    model_sub_path: str = "",
    defaults: RenderDefaults | None = None,
) -> list[dict[str, Any]]:
    """The desired objects for ArksApplication `app` whose model is on PVC `model_claim`."""
    d = defaults or RenderDefaults()
    workload = _workload(app, model_claim, model_sub_path, d)
    objects = [workload, _service(app)]
    if app["spec"].get("autoscaling"):
        objects.append(_hpa(app, workload))
    return objects
