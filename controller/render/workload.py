"""The engine-workload building blocks both application kinds render with. Pure.

- `EngineGroup` -> `engine_workload`: identical engine instances as a Deployment (size 1) or a
  LeaderWorkerSet (size > 1, one group of `size` pods per replica: leader and workers), with
  the engine's command line, GPUs, probes, /dev/shm, the model mount (`model_volume`) and, for
  Dynamo, its discovery environment.
- `RouterGroup` -> `router_deployment`: the pods in front of engine groups (a Dynamo
  frontend, a PD router), no GPUs, the model's claim only when the router reads it.
- `service`, `object_meta`, `base_labels`, `selector_of`, `group_selector`: the metadata and
  selectors that tie them together.

`instanceSpec` passes corev1 fields through to every engine pod (leader and worker templates
alike): scheduling, image pull secrets, RuntimeClass, PriorityClass, scheduler, host network/IPC
(RDMA) and the pod and container securityContext. `RenderDefaults` holds what a cluster operator
may tune. ArksApplication
(`controller.render.application`) and ArksDisaggregatedApplication
(`controller.render.disaggregated`) compose these blocks; owner references are left to the
reconciler.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from arks.wire import (
    ANNOTATION_SERVED_NAME,
    LABEL_APPLICATION,
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    LABEL_NAME,
    LABEL_ROLE,
    LABEL_SERVED_NAME,
    MANAGED_BY,
    label_value,
)
from controller.render.engines import (
    MODEL_DIR,
    DisaggregationMode,
    EngineSpec,
    Role,
    RouterSpec,
    UnsupportedApplication,
    engine_command,
    engine_for,
    parallelism,
    served_model_name,
)
from controller.render.model import DEFAULT_CACHE_ROOT, ModelVolume, model_volume

GPU_RESOURCE = "nvidia.com/gpu"
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"


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
    # Dynamo's discovery (etcd) and event plane (NATS): the controller's
    # --dynamo-etcd-endpoints / --dynamo-nats-server (e.g. the dynamo-platform Helm chart's
    # Services). Without etcd (here or ETCD_ENDPOINTS in the pod's env) a Dynamo application
    # is refused; an empty NATS address leaves NATS_SERVER unset (recent releases need NATS
    # only for KV-aware routing events).
    dynamo_etcd_endpoints: str = ""
    dynamo_nats_server: str = ""
    # ModelDefaults.cache_roots: engines read a node-local copy only where one may be.
    cache_roots: tuple[str, ...] = (DEFAULT_CACHE_ROOT,)
    # Where KEDA's Prometheus triggers query (`autoscaling.provider: keda`): the Service the
    # Prometheus Operator creates for a Prometheus in namespace `monitoring`.
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"


@dataclass(frozen=True)
class EngineGroup:
    """Identical engine instances, rendered as one workload (a LeaderWorkerSet when size > 1)."""

    name: str  # of the workload
    namespace: str
    owner: str  # name of the Arks object: the arks.ai/application label, the Dynamo namespace
    # ArksApplication-shaped: runtime, image, model, servedModelName, replicas, size,
    # tensorParallelSize, pipelineParallelSize, runtimeCommonArgs, instanceSpec, autoscaling.
    spec: Mapping[str, Any]
    # arks.ai/component label; "" keeps the selector plain vLLM/SGLang applications always had
    # (Deployment selectors cannot change).
    component: str = ""
    disaggregation: DisaggregationMode | None = None
    # The pair's shared disaggregation defaults (`engines.shared_pd_flags`); None: the engine's.
    pd_flags: tuple[tuple[str, str], ...] | None = None


def selector_of(owner: str, component: str = "") -> dict[str, str]:
    selector = {LABEL_APPLICATION: owner}
    if component:
        selector[LABEL_COMPONENT] = component
    return selector


def base_labels(owner: str, spec: Mapping[str, Any], component: str = "") -> dict[str, str]:
    labels = {
        LABEL_NAME: str(spec.get("runtime") or "vllm"),
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_APPLICATION: owner,
        LABEL_MODEL: label_value(spec["model"]["name"]),
        LABEL_SERVED_NAME: label_value(served_model_name(spec)),
    }
    if component:
        labels[LABEL_COMPONENT] = component
    return labels


def object_meta(
    name: str, namespace: str, labels: Mapping[str, str], spec: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": dict(labels),
        "annotations": {ANNOTATION_SERVED_NAME: served_model_name(spec)},
    }


def dynamo_namespace(namespace: str, owner: str) -> str:
    """The Dynamo namespace of one Arks object: its frontend sees only its own workers."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{namespace}-{owner}")


DYNAMO_PLATFORM_MISSING = (
    "runtime dynamo needs the Dynamo platform (etcd for discovery, NATS for KV events): start "
    "the controller with --dynamo-etcd-endpoints (and --dynamo-nats-server)"
)


def _dynamo_env(namespace: str, owner: str, d: RenderDefaults) -> list[dict[str, Any]]:
    if not d.dynamo_etcd_endpoints:  # the workers and the frontend would never find each other
        raise UnsupportedApplication(DYNAMO_PLATFORM_MISSING)
    env = [
        {"name": "DYN_NAMESPACE", "value": dynamo_namespace(namespace, owner)},
        {"name": "ETCD_ENDPOINTS", "value": d.dynamo_etcd_endpoints},
    ]
    if d.dynamo_nats_server:
        env.append({"name": "NATS_SERVER", "value": d.dynamo_nats_server})
    return env


def _merge_env(ours: list[dict[str, Any]], instance: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Our variables, then the user's; a user variable of the same name replaces ours (the
    list is keyed by name for server-side apply, so duplicates would be rejected)."""
    user = copy.deepcopy(list(instance.get("env") or []))
    names = {e["name"] for e in user}
    return [e for e in ours if e["name"] not in names] + user


def _resources(instance: Mapping[str, Any], gpus: int) -> dict[str, Any]:
    resources: dict[str, Any] = copy.deepcopy(dict(instance.get("resources") or {}))
    declared = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
    if gpus and GPU_RESOURCE not in declared:
        # Extended resources are requested through limits; requests default to them.
        resources.setdefault("limits", {})[GPU_RESOURCE] = str(gpus)
    return resources


def _probes(
    port: str, ready_path: str, live_path: str, d: RenderDefaults, *, startup: bool = True
) -> dict[str, Any]:
    probes: dict[str, Any] = {}
    if startup:
        probes["startupProbe"] = {
            "httpGet": {"path": ready_path, "port": port},
            "periodSeconds": d.startup_period_s,
            "timeoutSeconds": d.probe_timeout_s,
            "failureThreshold": -(-d.startup_budget_s // d.startup_period_s),
        }
    probes["readinessProbe"] = {
        "httpGet": {"path": ready_path, "port": port},
        "periodSeconds": d.readiness_period_s,
        "timeoutSeconds": d.probe_timeout_s,
        "failureThreshold": 3,
    }
    probes["livenessProbe"] = {
        "httpGet": {"path": live_path, "port": port},
        "periodSeconds": d.liveness_period_s,
        "timeoutSeconds": d.probe_timeout_s,
        "failureThreshold": d.liveness_failures,
    }
    return probes


# instanceSpec fields copied to the pod spec as they are (corev1 types, passed through).
_POD_FIELDS = (
    "nodeSelector",
    "tolerations",
    "affinity",
    "serviceAccountName",
    "runtimeClassName",
    "priorityClassName",
    "schedulerName",
    "imagePullSecrets",
    "hostNetwork",
    "hostIPC",
)


def _pod_fields(instance: Mapping[str, Any], volume: ModelVolume | None = None) -> dict[str, Any]:
    """The pod-level fields of `instance` (scheduling, identity, namespaces, security); a
    node-local model volume adds the cache's nodeSelector."""
    out = {key: copy.deepcopy(instance[key]) for key in _POD_FIELDS if instance.get(key)}
    if instance.get("podSecurityContext"):
        out["securityContext"] = copy.deepcopy(instance["podSecurityContext"])
    if instance.get("hostNetwork"):
        # Without it a host-network pod resolves with the node's DNS: no cluster Services.
        out["dnsPolicy"] = "ClusterFirstWithHostNet"
    if volume is not None and volume.node_selector:
        out["nodeSelector"] = dict(volume.node_selector)
    return out


def _container_security(instance: Mapping[str, Any]) -> dict[str, Any]:
    security = instance.get("securityContext")
    return {"securityContext": copy.deepcopy(security)} if security else {}


def _template_meta(labels: Mapping[str, str], annotations: Mapping[str, str]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": dict(labels)}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return metadata


def _engine_env(g: EngineGroup, engine: EngineSpec, d: RenderDefaults) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in engine.env]
    if engine.discovery == "dynamo":
        env += _dynamo_env(g.namespace, g.owner, d)
    if g.disaggregation is not None and engine.disaggregation is not None:
        env += [
            {"name": name, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
            for name in engine.disaggregation.pod_ip_env
        ]
    return env


def _pod_template(
    g: EngineGroup,
    role: Role,
    model: Mapping[str, Any],
    defaults: RenderDefaults,
) -> dict[str, Any]:
    spec = g.spec
    engine = engine_for(spec)
    instance: Mapping[str, Any] = spec.get("instanceSpec") or {}
    volume = model_volume(model, instance.get("nodeSelector"), cache_roots=defaults.cache_roots)
    serves_http = role != "worker"
    prefill = engine.disaggregation if g.disaggregation == "prefill" else None
    bootstrap_port = prefill.bootstrap_port if prefill is not None and serves_http else 0

    labels = {**(instance.get("labels") or {}), **group_labels(g)}
    if role != "single":
        labels[LABEL_ROLE] = role
    annotations = dict(instance.get("annotations") or {})
    if prefill is not None and bootstrap_port:
        # The router reads the bootstrap port of each prefill pod it discovers from here.
        annotations[prefill.bootstrap_port_annotation] = str(bootstrap_port)

    container: dict[str, Any] = {
        "name": "engine",
        "image": spec.get("image") or engine.default_image,
        "command": engine_command(
            {"spec": spec}, role, disaggregation=g.disaggregation, pd_flags=g.pd_flags
        ),
        "resources": _resources(instance, parallelism(spec).gpus_per_pod),
        "volumeMounts": [
            volume.mount(MODEL_DIR),
            {"name": "dshm", "mountPath": "/dev/shm"},
            *copy.deepcopy(instance.get("volumeMounts") or []),
        ],
        **_container_security(instance),
    }
    env = _merge_env(_engine_env(g, engine, defaults), instance)
    if env:
        container["env"] = env
    if serves_http:
        ports = [
            {"name": engine.port_name, "containerPort": engine.default_port, "protocol": "TCP"}
        ]
        if bootstrap_port:
            ports.append({"name": "bootstrap", "containerPort": bootstrap_port, "protocol": "TCP"})
        container["ports"] = ports
        live = engine.liveness_path or engine.health_path
        container.update(_probes(engine.port_name, engine.health_path, live, defaults))

    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            volume.volume,
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": defaults.shm_size}},
            *copy.deepcopy(instance.get("volumes") or []),
        ],
        **_pod_fields(instance, volume),
    }
    return {"metadata": _template_meta(labels, annotations), "spec": pod}


def group_labels(g: EngineGroup) -> dict[str, str]:
    return base_labels(g.owner, g.spec, g.component)


def group_selector(g: EngineGroup) -> dict[str, str]:
    """The labels that select the group's pods that serve (its leaders when size > 1)."""
    selector = selector_of(g.owner, g.component)
    if parallelism(g.spec).size > 1:
        selector[LABEL_ROLE] = "leader"
    return selector


def _replicas(spec: Mapping[str, Any]) -> dict[str, int]:
    # With an autoscaler (an HPA, KEDA's too) it owns the replica count; ours would fight it.
    return {} if spec.get("autoscaling") else {"replicas": int(spec.get("replicas", 1))}


def engine_workload(
    g: EngineGroup, model: Mapping[str, Any], defaults: RenderDefaults
) -> dict[str, Any]:
    """The Deployment (size 1) or LeaderWorkerSet (size > 1) running group `g`."""
    spec = g.spec
    meta = object_meta(g.name, g.namespace, group_labels(g), spec)
    size = parallelism(spec).size
    if size == 1:
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                **_replicas(spec),
                "selector": {"matchLabels": selector_of(g.owner, g.component)},
                "template": _pod_template(g, "single", model, defaults),
            },
        }
    return {
        "apiVersion": LWS_API_VERSION,
        "kind": "LeaderWorkerSet",
        "metadata": meta,
        "spec": {
            **_replicas(spec),
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": size,
                # A lost pod breaks the collective; restart the group together.
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": _pod_template(g, "leader", model, defaults),
                "workerTemplate": _pod_template(g, "worker", model, defaults),
            },
        },
    }


@dataclass(frozen=True)
class RouterGroup:
    """The pods that serve the public API in front of engine groups (a Deployment)."""

    name: str
    namespace: str
    owner: str
    spec: Mapping[str, Any]  # the Arks object's spec: runtime, image, model, servedModelName
    router: RouterSpec
    command: list[str]
    replicas: int = 1
    image: str = ""  # "" : the spec's image, else the engine's default image
    instance: Mapping[str, Any] | None = None  # instanceSpec of the router pods
    component: str = "router"
    service_account: str = ""


def router_deployment(
    r: RouterGroup, model: Mapping[str, Any], defaults: RenderDefaults
) -> dict[str, Any]:
    """A Deployment of router `r`: no GPUs, probes on its own health endpoints."""
    engine = engine_for(r.spec)
    instance: Mapping[str, Any] = r.instance or {}
    labels = base_labels(r.owner, r.spec, r.component)
    pod_labels = {**(instance.get("labels") or {}), **labels}
    env: list[dict[str, Any]] = []
    if engine.discovery == "dynamo":
        env = _dynamo_env(r.namespace, r.owner, defaults)
    container: dict[str, Any] = {
        "name": "router",
        "image": r.image or r.spec.get("image") or engine.default_image,
        "command": list(r.command),
        **_container_security(instance),
    }
    if instance.get("resources"):
        container["resources"] = copy.deepcopy(instance["resources"])
    # Routers read the claim: pinning them to the GPU nodes of the node-local cache would
    # take scheduling room the engines need.
    volume = model_volume(model, allow_node_local=False)
    if r.router.needs_model:
        container["volumeMounts"] = [volume.mount(MODEL_DIR)]
    env = _merge_env(env, instance)
    if env:
        container["env"] = env
    container["ports"] = [
        {"name": "http", "containerPort": r.router.default_port, "protocol": "TCP"}
    ]
    container.update(
        _probes("http", r.router.readiness_path, r.router.liveness_path, defaults, startup=False)
    )
    pod: dict[str, Any] = {"containers": [container], **_pod_fields(instance)}
    if r.router.needs_model:
        pod["volumes"] = [volume.volume]
    if r.service_account:
        pod["serviceAccountName"] = r.service_account
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(r.name, r.namespace, labels, r.spec),
        "spec": {
            "replicas": r.replicas,
            "selector": {"matchLabels": selector_of(r.owner, r.component)},
            "template": {
                "metadata": _template_meta(pod_labels, instance.get("annotations") or {}),
                "spec": pod,
            },
        },
    }


_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def check_service_name(kind: str, name: str) -> None:
    """Raise UnsupportedApplication unless `name`, which names the object's Service and is its
    pods' `arks.ai/application` label, is a DNS-1035 label: the API server refuses a Service
    named `qwen2.5-7b` (a dot) or longer than 63 characters, and such a label value, so the
    object could never serve; say so in its status instead of failing every apply."""
    if not _DNS_1035_LABEL.match(name):
        raise UnsupportedApplication(
            f"{kind} name {name!r} also names its Service, which must be a DNS-1035 label: at "
            "most 63 lowercase letters, digits and '-', starting with a letter and ending with "
            "a letter or digit (no '.'); recreate it under such a name"
        )


def service(
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    selector: Mapping[str, str],
    port: int,
    spec: Mapping[str, Any],
) -> dict[str, Any]:
    """A ClusterIP Service named `name` over the pods `selector` picks, port `http`."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(name, namespace, labels, spec),
        "spec": {
            "type": "ClusterIP",
            "selector": dict(selector),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
