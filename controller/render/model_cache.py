"""Render the DaemonSet that keeps an ArksModel on its nodes, and read which nodes are warm.

With `nodeCache.enabled`, a DaemonSet copies the model from its claim to
`<path>/<namespace>/<model>` (`cache_host_path`) on the selected nodes, with the download's
marker discipline: it copies into a hidden directory, writes `.arks-complete` (holding the
source id) last and renames the directory into place. Its pods are Ready only once the copy is
complete, so the warm nodes are the nodes of its Ready pods (`warm_nodes`). Where the copy lives
and when engines use it are the model's facts (`controller.render.model`). Pure.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from arks.wire import ANNOTATION_MODEL, LABEL_COMPONENT, LABEL_MODEL, label_value
from controller.render.model import (
    CLAIM_MOUNT,
    MARKER,
    ModelDefaults,
    cache_enabled,
    cache_node_selector,
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

_CACHE_MOUNT = "/cache"


def cache_daemonset_name(model: Mapping[str, Any]) -> str:
    return child_name(str(model["metadata"]["name"]), "cache")


def cache_pod_labels(model: Mapping[str, Any]) -> dict[str, str]:
    """The labels of the cache DaemonSet's pods (its selector is a subset of them)."""
    return model_labels(model, COMPONENT_CACHE)


def cache_pod_selector(model: Mapping[str, Any]) -> str:
    """A label selector for the cache pods of this model (to list warm nodes)."""
    return f"{LABEL_COMPONENT}={COMPONENT_CACHE},{LABEL_MODEL}={label_value(str(model['metadata']['name']))}"


CACHE_PODS_SELECTOR = f"{LABEL_COMPONENT}={COMPONENT_CACHE}"
"""A label selector for the cache pods of every model (for a pod informer)."""


def _copy_script(model: Mapping[str, Any]) -> str:
    q = shlex.quote
    name = str(model["metadata"]["name"])
    lines = [
        "set -eu",
        f"id={q(source_id(model))}",
        f"target={q(_CACHE_MOUNT + '/' + name)}",
        f"partial={q(_CACHE_MOUNT + '/.' + name + '.partial')}",
        f'if [ -f "$target/{MARKER}" ] && [ "$(cat "$target/{MARKER}")" = "$id" ]; then',
        '  echo "arks: $target already holds source $id"; exit 0',
        "fi",
    ]
    if not is_adopted(model):  # a downloaded model is complete only with its marker
        lines.append(
            f'[ -f {CLAIM_MOUNT}/{MARKER} ] || {{ echo "arks: the claim has no complete model"; exit 1; }}'
        )
    lines += [
        'rm -rf "$partial"',
        'mkdir -p "$partial"',
        f'cp -R {CLAIM_MOUNT}/. "$partial/"',
        f'printf \'%s\\n\' "$id" > "$partial/{MARKER}"',
        'rm -rf "$target"',
        'mv "$partial" "$target"',
        'echo "arks: source $id is cached in $target"',
    ]
    return "\n".join(lines) + "\n"


def render_cache_daemonset(
    model: Mapping[str, Any], defaults: ModelDefaults | None = None
) -> dict[str, Any] | None:
    """The DaemonSet preloading the model on the cache nodes, or None when the cache is off.

    The init container copies from the claim (read-only) to the host directory; the main
    container only idles, Ready when the marker is there. On explicitly selected nodes the pods
    tolerate every taint, like node agents: an engine pod sent there by `model_volume` must find
    the cache. Files stay on the nodes after the model is deleted (remove them by hand).
    """
    if not cache_enabled(model):
        return None
    d = defaults or ModelDefaults()
    name = str(model["metadata"]["name"])
    meta = model_meta(model, cache_daemonset_name(model), COMPONENT_CACHE)
    labels = cache_pod_labels(model)
    selector = {LABEL_COMPONENT: labels[LABEL_COMPONENT], LABEL_MODEL: labels[LABEL_MODEL]}
    claim_mount: dict[str, Any] = {"name": "model", "mountPath": CLAIM_MOUNT, "readOnly": True}
    if model_sub_path(model):
        claim_mount["subPath"] = model_sub_path(model)
    pod: dict[str, Any] = {
        # Root in the copy only: kubelet creates the host directory owned by root.
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [
            {
                "name": "copy",
                "image": d.cache_image,
                "command": ["sh", "-c", _copy_script(model)],
                "resources": {
                    "requests": {"cpu": "100m", "memory": "64Mi"},
                    "limits": {"memory": "256Mi"},
                },
                "securityContext": container_security(
                    readOnlyRootFilesystem=True, runAsUser=0, runAsNonRoot=False
                ),
                "volumeMounts": [claim_mount, {"name": "cache", "mountPath": _CACHE_MOUNT}],
            }
        ],
        "containers": [
            {
                "name": "hold",
                "image": d.cache_image,
                "command": [
                    "sh",
                    "-c",
                    "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done",
                ],
                "readinessProbe": {
                    "exec": {"command": ["test", "-f", f"{_CACHE_MOUNT}/{name}/{MARKER}"]},
                    "periodSeconds": 10,
                },
                "resources": {
                    "requests": {"cpu": "1m", "memory": "8Mi"},
                    "limits": {"memory": "16Mi"},
                },
                "securityContext": container_security(
                    readOnlyRootFilesystem=True, runAsUser=65534, runAsNonRoot=True
                ),
                "volumeMounts": [{"name": "cache", "mountPath": _CACHE_MOUNT, "readOnly": True}],
            }
        ],
        "volumes": [
            {
                "name": "model",
                "persistentVolumeClaim": {"claimName": claim_name(model), "readOnly": True},
            },
            {
                "name": "cache",
                "hostPath": {"path": cache_root(model), "type": "DirectoryOrCreate"},
            },
        ],
    }
    node_selector = cache_node_selector(model)
    if node_selector:
        pod["nodeSelector"] = node_selector
        pod["tolerations"] = [{"operator": "Exists"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels, "annotations": {ANNOTATION_MODEL: name}},
                "spec": pod,
            },
        },
    }


def warm_nodes(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """Sorted names of the nodes whose cache pod is Ready (and not being deleted)."""
    nodes = set()
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        node = (pod.get("spec") or {}).get("nodeName")
        conditions = (pod.get("status") or {}).get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        if node and ready:
            nodes.add(str(node))
    return sorted(nodes)
