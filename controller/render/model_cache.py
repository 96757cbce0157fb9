"""Render what keeps an ArksModel on its nodes, and read how far it got. Pure.

With `nodeCache.enabled` the model is copied to `<path>/<namespace>/<model>`
(`cache_host_path`) on the selected nodes. A hostPath volume needs a namespace whose Pod
Security admits it, so the copying runs apart from the tenant, in the cache namespace
(`ModelDefaults.cache_namespace`), which cannot mount the tenant's claim. Hence two halves:

- in the model's namespace, owned by the model: the cache source, a Deployment serving the
  claim read-only over HTTP (`controller.cache_transfer serve`), its Service, and a
  NetworkPolicy letting only the model's own cache pods (in the cache namespace) reach it;
- in the cache namespace, named after the model's namespace and name and labelled with them
  (an owner reference cannot cross namespaces): the cache DaemonSet. Its init containers make
  the host directory the copier's (root, CAP_CHOWN only), then copy as a non-root user
  (`cache_transfer fetch`: free disk checked first, marker written last, renamed into place);
  its pods are Ready only once the copy is complete, so the warm nodes are the nodes of its
  Ready pods (`warm_nodes`);
- when the cache is turned off, moved or the model deleted: a cleanup DaemonSet on the same
  nodes deletes the host copy (`cache_transfer remove`), each pod once the node's cache pods
  filling that directory have stopped (pod anti-affinity); it is done when all its pods are
  Ready (`cleanup_done`), then the reconciler deletes it and releases the model's finalizer.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from arks.wire import (
    ANNOTATION_CACHE_ROOT,
    ANNOTATION_MODEL,
    ANNOTATION_MODEL_NAMESPACE,
    ANNOTATION_SOURCE_ID,
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    LABEL_MODEL_NAMESPACE,
    LABEL_NAME,
    MANAGED_BY,
    label_value,
)
from controller.render.model import (
    CLAIM_MOUNT,
    MARKER,
    ModelDefaults,
    cache_enabled,
    cache_node_selector,
    cache_path_problem,
    cache_root,
    child_name,
    claim_name,
    container_security,
    is_adopted,
    model_labels,
    model_meta,
    model_sub_path,
    source_id,
)

COMPONENT_CACHE = "model-cache"
COMPONENT_CLEANUP = "model-cache-cleanup"
COMPONENT_SOURCE = "model-cache-source"
SOURCE_PORT = 8080
EXIT_NO_SPACE = 2  # controller.cache_transfer.EXIT_NO_SPACE

LABEL_CACHE_ROOT = "arks.ai/cache-root-digest"
_CACHE_MOUNT = "/cache"
_TRANSFER = ("python", "-m", "controller.cache_transfer")


# --- names and selectors ------------------------------------------------------------------------


def _ns_name(model: Mapping[str, Any]) -> tuple[str, str]:
    return str(model["metadata"]["namespace"]), str(model["metadata"]["name"])


def cache_object_name(model: Mapping[str, Any], suffix: str = "cache") -> str:
    """A name in the cache namespace, unique per model namespace and name (a hash tells
    `a-b/c` from `a/b-c`)."""
    namespace, name = _ns_name(model)
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:6]
    return child_name(f"{namespace}-{name}-{digest}", suffix)


def cache_daemonset_name(model: Mapping[str, Any]) -> str:
    return cache_object_name(model, "cache")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def cleanup_daemonset_name(model: Mapping[str, Any], root: str) -> str:
    """One per host directory being emptied (the cache may have moved more than once)."""
    return cache_object_name(model, f"clean-{_digest(root)}")


def source_name(model: Mapping[str, Any]) -> str:
    """The cache source's Deployment, Service and NetworkPolicy name. A Service name is a
    DNS-1035 label (a letter first, no dots), a model name a DNS subdomain (`qwen2.5-7b`): such
    a name is made a label, with a hash so `a.b` and `a-b` stay apart."""
    name = _ns_name(model)[1]
    label = re.sub(r"[^a-z0-9-]", "-", name)
    if not label[:1].isalpha():
        label = "m-" + label
    if label != name:
        label = f"{label}-{_digest(name)}"
    return child_name(label, "cache-source")


def cache_labels(model: Mapping[str, Any], component: str) -> dict[str, str]:
    """Labels of the model's objects in the cache namespace (they say whose they are)."""
    namespace, name = _ns_name(model)
    return {
        LABEL_NAME: f"arks-{component}",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_MODEL_NAMESPACE: label_value(namespace),
        LABEL_MODEL: label_value(name),
        LABEL_COMPONENT: component,
    }


def cache_pod_labels(model: Mapping[str, Any]) -> dict[str, str]:
    """The labels of the cache DaemonSet's pods (its selector is a subset of them), with the
    digest of the directory they fill (for the cleanup's anti-affinity; on the pods only, since
    a DaemonSet's selector is immutable and a moved cache keeps the DaemonSet's name)."""
    return {**cache_labels(model, COMPONENT_CACHE), LABEL_CACHE_ROOT: _digest(cache_root(model))}


def model_selector(model: Mapping[str, Any], component: str) -> str:
    """A label selector for the model's objects of `component` in the cache namespace."""
    labels = cache_labels(model, component)
    keys = (LABEL_MANAGED_BY, LABEL_MODEL_NAMESPACE, LABEL_MODEL, LABEL_COMPONENT)
    return ",".join(f"{k}={labels[k]}" for k in keys)


CACHE_PODS_SELECTOR = f"{LABEL_COMPONENT}={COMPONENT_CACHE}"
"""A label selector for the cache pods of every model (for a pod informer)."""
CACHE_OBJECTS_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_MODEL_NAMESPACE}"
"""The cache and cleanup DaemonSets of every model in the cache namespace (for an informer)."""


def owner_key(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(namespace, name) of the model an object of the cache namespace is for."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    namespace, name = annotations.get(ANNOTATION_MODEL_NAMESPACE), annotations.get(ANNOTATION_MODEL)
    return (str(namespace), str(name)) if namespace and name else None


def _cache_meta(
    model: Mapping[str, Any], name: str, component: str, namespace: str, root: str
) -> dict[str, Any]:
    model_ns, model_name = _ns_name(model)
    return {
        "name": name,
        "namespace": namespace,
        "labels": cache_labels(model, component),
        "annotations": {
            ANNOTATION_MODEL_NAMESPACE: model_ns,
            ANNOTATION_MODEL: model_name,
            ANNOTATION_SOURCE_ID: source_id(model),
            ANNOTATION_CACHE_ROOT: root,
        },
    }


def cache_usable(model: Mapping[str, Any], d: ModelDefaults) -> bool:
    return cache_enabled(model) and cache_path_problem(model, d.cache_roots) is None


# --- the source, in the model's namespace -------------------------------------------------------


def source_url(model: Mapping[str, Any]) -> str:
    return f"http://{source_name(model)}.{_ns_name(model)[0]}.svc:{SOURCE_PORT}"


def _restricted_pod(run_as: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": run_as,
        "runAsGroup": run_as,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _own_cache_pods(model: Mapping[str, Any]) -> dict[str, str]:
    """Labels every cache pod of `model` has and no other model's has."""
    labels = cache_labels(model, COMPONENT_CACHE)
    return {k: labels[k] for k in (LABEL_COMPONENT, LABEL_MODEL_NAMESPACE, LABEL_MODEL)}


def render_cache_source(
    model: Mapping[str, Any], defaults: ModelDefaults | None = None
) -> list[dict[str, Any]]:
    """The Deployment serving the claim to the cache pods, its Service and NetworkPolicy
    (nothing when the cache is off). Pod Security restricted: non-root, read-only."""
    d = defaults or ModelDefaults()
    if not cache_usable(model, d):
        return []
    name = source_name(model)
    labels = model_labels(model, COMPONENT_SOURCE)
    selector = {LABEL_COMPONENT: COMPONENT_SOURCE, LABEL_MODEL: labels[LABEL_MODEL]}
    claim_mount: dict[str, Any] = {"name": "model", "mountPath": CLAIM_MOUNT, "readOnly": True}
    if model_sub_path(model):
        claim_mount["subPath"] = model_sub_path(model)
    container = {
        "name": "serve",
        "image": d.cache_image,
        "command": [*_TRANSFER, "serve", "--root", CLAIM_MOUNT, "--port", str(SOURCE_PORT)],
        "ports": [{"name": "http", "containerPort": SOURCE_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": container_security(readOnlyRootFilesystem=True),
        "volumeMounts": [claim_mount],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": model_meta(model, name, COMPONENT_SOURCE),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "securityContext": _restricted_pod(d.run_as_user),
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "model",
                            "persistentVolumeClaim": {
                                "claimName": claim_name(model),
                                "readOnly": True,
                            },
                        }
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": model_meta(model, name, COMPONENT_SOURCE),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": "http", "port": SOURCE_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": model_meta(model, name, COMPONENT_SOURCE),
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress"],
            # The model's files go to this model's cache pods, nobody else: not to another
            # model's, which a tenant could send here by turning its own source Service into an
            # ExternalName for this one (the connection would come from the cache namespace).
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": d.cache_namespace}
                            },
                            "podSelector": {"matchLabels": _own_cache_pods(model)},
                        }
                    ],
                    "ports": [{"port": SOURCE_PORT, "protocol": "TCP"}],
                }
            ],
        },
    }
    return [deployment, service, policy]


# --- the DaemonSets, in the cache namespace -----------------------------------------------------


def _host_volume(root: str) -> dict[str, Any]:
    return {"name": "cache", "hostPath": {"path": root, "type": "DirectoryOrCreate"}}


CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"


def _scheduling(node_selector: Mapping[str, str]) -> dict[str, Any]:
    # On explicitly selected nodes the pods tolerate every taint, like node agents: an engine
    # pod sent there by `model_volume` must find the cache. Never on the control plane, though:
    # the tenant picks the selector, and a model copied there (tolerating its NoSchedule taint)
    # would fill the disk etcd and the API server live on.
    if not node_selector:
        return {}
    away = {"key": CONTROL_PLANE_LABEL, "operator": "DoesNotExist"}
    return {
        "nodeSelector": dict(node_selector),
        "tolerations": [{"operator": "Exists"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [away]}]
                }
            }
        },
    }


def _hold(readiness: list[str] | None) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "hold",
        "image": "",  # filled by the caller
        "command": ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done"],
        "resources": {"requests": {"cpu": "1m", "memory": "8Mi"}, "limits": {"memory": "16Mi"}},
        "securityContext": container_security(
            readOnlyRootFilesystem=True, runAsUser=65534, runAsNonRoot=True
        ),
        "volumeMounts": [{"name": "cache", "mountPath": _CACHE_MOUNT, "readOnly": True}],
    }
    if readiness:
        container["readinessProbe"] = {"exec": {"command": readiness}, "periodSeconds": 10}
    return container


def _daemonset(
    meta: dict[str, Any], node_selector: Mapping[str, str], pod: dict[str, Any]
) -> dict[str, Any]:
    labels = meta["labels"]
    scheduling = _scheduling(node_selector)
    affinity = {**(pod.get("affinity") or {}), **scheduling.pop("affinity", {})}
    if affinity:
        pod = {**pod, "affinity": affinity}
    keys = [
        k
        for k in (LABEL_MODEL_NAMESPACE, LABEL_MODEL, LABEL_COMPONENT, LABEL_CACHE_ROOT)
        if k in labels
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": {k: labels[k] for k in keys}},
            "template": {
                "metadata": {"labels": dict(labels), "annotations": dict(meta["annotations"])},
                "spec": {
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    **pod,
                    **scheduling,
                },
            },
        },
    }


def render_cache_daemonset(
    model: Mapping[str, Any], defaults: ModelDefaults | None = None
) -> dict[str, Any] | None:
    """The DaemonSet copying the model to the cache nodes, or None when the cache is off (or
    its path is not one the cluster allows)."""
    d = defaults or ModelDefaults()
    if not cache_usable(model, d):
        return None
    name = str(model["metadata"]["name"])
    root = cache_root(model)
    meta = _cache_meta(model, cache_daemonset_name(model), COMPONENT_CACHE, d.cache_namespace, root)
    uid = str(d.run_as_user)
    fetch = [*_TRANSFER, "fetch", "--source", source_url(model), "--root", _CACHE_MOUNT]
    fetch += [
        "--name",
        name,
        "--id",
        source_id(model),
        "--reserve-bytes",
        str(d.cache_reserve_bytes),
    ]
    if not is_adopted(model):  # a downloaded model is complete only with its marker
        fetch.append("--require-marker")
    mount = [{"name": "cache", "mountPath": _CACHE_MOUNT}]
    hold = _hold(["test", "-f", f"{_CACHE_MOUNT}/{name}/{MARKER}"])
    hold["image"] = d.cache_image
    pod = {
        "initContainers": [
            {
                # kubelet creates the host directory owned by root: hand it to the copier, with
                # the one capability that takes.
                "name": "own",
                "image": d.cache_image,
                "command": ["chown", f"{uid}:{uid}", _CACHE_MOUNT],
                "resources": {
                    "requests": {"cpu": "10m", "memory": "16Mi"},
                    "limits": {"memory": "32Mi"},
                },
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
                    "readOnlyRootFilesystem": True,
                    "runAsUser": 0,
                    "runAsNonRoot": False,
                },
                "volumeMounts": mount,
            },
            {
                "name": "copy",
                "image": d.cache_image,
                "command": fetch,
                "resources": {
                    "requests": {"cpu": "100m", "memory": "128Mi"},
                    "limits": {"memory": "512Mi"},
                },
                "securityContext": container_security(
                    readOnlyRootFilesystem=True,
                    runAsUser=d.run_as_user,
                    runAsGroup=d.run_as_user,
                    runAsNonRoot=True,
                ),
                # The reconciler reads why a copy failed (no disk) from the pod status.
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": mount,
            },
        ],
        "containers": [hold],
        "volumes": [_host_volume(root)],
    }
    daemonset = _daemonset(meta, cache_node_selector(model), pod)
    daemonset["spec"]["template"]["metadata"]["labels"] = cache_pod_labels(model)
    return daemonset


def _after_the_copiers(model: Mapping[str, Any], root: str) -> dict[str, Any]:
    """An affinity keeping a cleanup pod off a node while a cache pod filling `root` is still
    there: the DaemonSet's pods are deleted by the garbage collector after it, and a copier
    still running would rename its copy into place after the cleanup deleted it. The scheduler
    counts terminating pods for anti-affinity, so the cleanup runs once they have stopped."""
    selector = {k: v for k, v in cache_labels(model, COMPONENT_CACHE).items() if k != LABEL_NAME}
    selector[LABEL_CACHE_ROOT] = _digest(root)
    term = {"labelSelector": {"matchLabels": selector}, "topologyKey": "kubernetes.io/hostname"}
    return {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}


def render_cleanup_daemonset(
    model: Mapping[str, Any],
    root: str,
    node_selector: Mapping[str, str],
    defaults: ModelDefaults | None = None,
) -> dict[str, Any]:
    """A DaemonSet deleting the model's copy under host directory `root` on the nodes
    `node_selector` picks (those the cache DaemonSet being retired ran on)."""
    d = defaults or ModelDefaults()
    name = str(model["metadata"]["name"])
    meta = _cache_meta(
        model, cleanup_daemonset_name(model, root), COMPONENT_CLEANUP, d.cache_namespace, root
    )
    # Two cleanups of one model (the cache moved twice) must not select each other's pods.
    meta["labels"][LABEL_CACHE_ROOT] = _digest(root)
    hold = _hold(None)
    hold["image"] = d.cache_image
    pod = {
        "initContainers": [
            {
                "name": "remove",
                "image": d.cache_image,
                "command": [*_TRANSFER, "remove", "--root", _CACHE_MOUNT, "--name", name],
                "resources": {
                    "requests": {"cpu": "10m", "memory": "32Mi"},
                    "limits": {"memory": "128Mi"},
                },
                # The copier's user owns the copy.
                "securityContext": container_security(
                    readOnlyRootFilesystem=True,
                    runAsUser=d.run_as_user,
                    runAsGroup=d.run_as_user,
                    runAsNonRoot=True,
                ),
                "volumeMounts": [{"name": "cache", "mountPath": _CACHE_MOUNT}],
            }
        ],
        "containers": [hold],
        "volumes": [_host_volume(root)],
        "affinity": _after_the_copiers(model, root),
    }
    return _daemonset(meta, node_selector, pod)


# --- reading what happened ----------------------------------------------------------------------


def _ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def warm_nodes(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """Sorted names of the nodes whose cache pod is Ready (and not being deleted)."""
    nodes = set()
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        node = (pod.get("spec") or {}).get("nodeName")
        if node and _ready(pod):
            nodes.add(str(node))
    return sorted(nodes)


def copy_failures(pods: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(node, reason, message) of cache pods whose copy failed last time: "NoDiskSpace" when
    the node lacks room (the copier's exit code 2), else "CopyFailed"."""
    failures = []
    for pod in pods:
        node = str((pod.get("spec") or {}).get("nodeName") or "?")
        for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if status.get("name") != "copy":
                continue
            state = status.get("state") or {}
            last = state.get("terminated") or (status.get("lastState") or {}).get("terminated")
            if not last or int(last.get("exitCode") or 0) == 0:
                continue
            reason = "NoDiskSpace" if int(last["exitCode"]) == EXIT_NO_SPACE else "CopyFailed"
            message = str(last.get("message") or last.get("reason") or "the copy failed").strip()
            failures.append((node, reason, message))
    return sorted(failures)


def cleanup_done(daemonset: Mapping[str, Any]) -> bool:
    """True once every pod of cleanup DaemonSet `daemonset` has removed the copy (is Ready)."""
    status = daemonset.get("status") or {}
    generation = (daemonset.get("metadata") or {}).get("generation")
    if status.get("desiredNumberScheduled") is None:
        return False
    if generation is not None and int(status.get("observedGeneration") or 0) < int(generation):
        return False
    return int(status.get("numberReady") or 0) >= int(status["desiredNumberScheduled"])


def cleanup_expired(daemonset: Mapping[str, Any], now: datetime.datetime, deadline_s: int) -> bool:
    """True when cleanup DaemonSet `daemonset` was created more than `deadline_s` ago."""
    created = (daemonset.get("metadata") or {}).get("creationTimestamp")
    if not created:
        return False
    born = datetime.datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    return (now - born).total_seconds() > deadline_s


def retired_root(daemonset: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """(host directory, nodeSelector) of a live cache DaemonSet, to clean up after it."""
    annotations = (daemonset.get("metadata") or {}).get("annotations") or {}
    template = ((daemonset.get("spec") or {}).get("template") or {}).get("spec") or {}
    return str(annotations.get(ANNOTATION_CACHE_ROOT) or ""), dict(
        template.get("nodeSelector") or {}
    )
