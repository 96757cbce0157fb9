"""An ArksModel: its source, where its files are, its PVC, and what engines mount. Pure.

- The source's identity (`source_id`): a short hash of what determines the files fetched, so a
  different source gets a different download Job and cache marker.
- Where the files are: the claim (`claim_name`, `model_sub_path`), and with `nodeCache.enabled`
  a node directory (`cache_host_path`) on the nodes the cache selects.
- The PVC named after the model (none for `source.pvc`: that claim is adopted as it is).
- `model_volume`: what an engine pod mounts for the model, the claim or the node-local copy.

The objects that fill these places are rendered next door, from what is defined here:
`model_download` (the Job that fetches into the claim) and `model_cache` (the DaemonSet that
copies to the nodes); `controller.render.render_model` lists every object of a model. A
directory counts as complete only once it holds `MARKER` with the source id. Owner references
are left to the reconciler.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from arks.wire import (
    ANNOTATION_MODEL,
    ANNOTATION_SOURCE_ID,
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    LABEL_NAME,
    MANAGED_BY,
    label_value,
)

MODEL_SUBDIR = "model"
"""Where a downloaded model lives inside its PVC; engines mount it with this subPath."""
MARKER = ".arks-complete"
"""Written last, holding the source id: a directory without it is never used."""
CLAIM_MOUNT = "/models"
"""Where the download Job and the cache copy mount the claim (and engines, by default)."""


_MAX_NAME = 63  # Job and DaemonSet names end up in label values (job-name, pod names)

DEFAULT_CACHE_ROOT = "/var/lib/arks/models"
"""The host directory node caches may use unless the operator allows others."""
DOWNLOADER_IMAGE = "ghcr.io/arks-ai/arks:0.1.0"
"""The Arks image (manifests/base/kustomization.yaml's tag), built with the `download` extra."""


@dataclass(frozen=True)
class ModelDefaults:
    """Images and limits a cluster operator may tune; one value per controller, passed in.

    Every image already holds the CLI its Job runs: nothing is installed at run time (many
    clusters reach no package index). The Arks image carries `hf` and `modelscope` (the
    `download` extra); the controller's `--*-image` flags point elsewhere (a mirror, a pinned
    tag).
    """

    huggingface_image: str = DOWNLOADER_IMAGE  # runs `hf download`
    huggingface_high_performance: bool = False  # HF_XET_HIGH_PERFORMANCE: all cores, more RAM
    modelscope_image: str = DOWNLOADER_IMAGE  # runs `modelscope download`
    s3_image: str = "amazon/aws-cli:2.22.0"
    url_image: str = "curlimages/curl:8.11.1"  # Alpine: busybox sh, tar and unzip
    # The node cache: the Arks image runs `python -m controller.cache_transfer` on both sides.
    cache_image: str = DOWNLOADER_IMAGE
    # Where the cache DaemonSets run: a namespace of their own that admits hostPath
    # (pod-security enforce: privileged), apart from the tenants' and the controller's.
    cache_namespace: str = "arks-cache"
    cache_reserve_bytes: int = 10 * 2**30  # a copy must leave this much of the node disk free
    # Host directories `nodeCache.path` may name (exactly, not one under them): the cache pods
    # run privileged enough to own and delete what is there, so a tenant must not pick /etc.
    cache_roots: tuple[str, ...] = (DEFAULT_CACHE_ROOT,)
    # A cleanup waits this long for every node (a node that is down never confirms), then the
    # model is let go with a Warning naming what may be left.
    cleanup_deadline_s: int = 600
    # Attempts after the first; Kubernetes backs off 10 s, 20 s, 40 s … (capped at 6 min).
    backoff_limit: int = 4
    active_deadline_s: int = 6 * 3600  # hundreds of GB over a slow link take hours
    curl_retries: int = 5
    run_as_user: int = 1000
    download_cpu: str = "1"
    download_memory: str = "2Gi"
    download_memory_limit: str = "8Gi"
    # ReadWriteMany: engine replicas on many nodes and the cache DaemonSet all mount the claim.
    # A cluster without RWX storage shows the PVC Pending (phase StorageCreating) and sets
    # `spec.storage.accessModes: [ReadWriteOnce]` instead.
    access_modes: tuple[str, ...] = ("ReadWriteMany",)


# --- identity and names -------------------------------------------------------------------------


def source_of(model: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """(kind, spec) of the one source that is set."""
    sources = model["spec"]["source"]
    kinds = [k for k in ("huggingface", "modelscope", "s3", "url", "pvc") if sources.get(k)]
    if len(kinds) != 1:
        raise ValueError(f"exactly one source must be set, found {kinds or 'none'}")
    return kinds[0], sources[kinds[0]]


def fetch_identity(model: Mapping[str, Any]) -> dict[str, Any]:
    """What determines the files fetched, with the CRD defaults applied (credentials excluded)."""
    kind, spec = source_of(model)
    if kind == "huggingface":
        return {kind: {"repo": spec["repo"], "revision": spec.get("revision") or "main"}}
    if kind == "modelscope":
        return {kind: {"repo": spec["repo"], "revision": spec.get("revision") or "master"}}
    if kind == "s3":
        return {
            kind: {
                "endpoint": spec.get("endpoint") or "",
                "bucket": spec["bucket"],
                "prefix": (spec.get("prefix") or "").strip("/"),
            }
        }
    if kind == "url":
        return {kind: {"url": spec["url"]}}
    return {kind: {"claimName": spec["claimName"], "subPath": spec.get("subPath") or ""}}


def source_id(model: Mapping[str, Any]) -> str:
    """A short hash of the source: a different source gives a different Job and cache marker."""
    canonical = json.dumps(fetch_identity(model), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def is_adopted(model: Mapping[str, Any]) -> bool:
    """True when the model is already on a claim (`source.pvc`): nothing is created for it."""
    return source_of(model)[0] == "pvc"


def claim_name(model: Mapping[str, Any]) -> str:
    """The PVC holding the model: the adopted claim, else one named after the model."""
    kind, spec = source_of(model)
    return str(spec["claimName"]) if kind == "pvc" else str(model["metadata"]["name"])


def model_sub_path(model: Mapping[str, Any]) -> str:
    """The directory of the model files inside its claim ("" for the claim's root)."""
    kind, spec = source_of(model)
    if kind == "pvc":
        return str(spec.get("subPath") or "").strip("/")
    return MODEL_SUBDIR


def child_name(model_name: str, suffix: str) -> str:
    """`<model>-<suffix>`, shortened with a hash when longer than a label value allows."""
    name = f"{model_name}-{suffix}"
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(model_name.encode()).hexdigest()[:8]
    head = model_name[: _MAX_NAME - len(suffix) - len(digest) - 2].rstrip("-.")
    return f"{head}-{digest}-{suffix}"


def model_labels(model: Mapping[str, Any], component: str) -> dict[str, str]:
    """The labels of an object made for the model, by `arks.ai/component`."""
    return {
        LABEL_NAME: f"arks-{component}",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_MODEL: label_value(str(model["metadata"]["name"])),
        LABEL_COMPONENT: component,
    }


def model_meta(model: Mapping[str, Any], name: str, component: str) -> dict[str, Any]:
    """The metadata of an object made for the model: labels, the model and its source id."""
    return {
        "name": name,
        "namespace": model["metadata"]["namespace"],
        "labels": model_labels(model, component),
        "annotations": {
            ANNOTATION_MODEL: str(model["metadata"]["name"]),
            ANNOTATION_SOURCE_ID: source_id(model),
        },
    }


def container_security(**extra: Any) -> dict[str, Any]:
    """A container's securityContext: no privilege escalation, no capabilities, plus `extra`."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, **extra}


# --- where the node-local copy is ---------------------------------------------------------------


def cache_enabled(model: Mapping[str, Any]) -> bool:
    return bool((model["spec"].get("nodeCache") or {}).get("enabled"))


def cache_root(model: Mapping[str, Any]) -> str:
    """The node directory of the namespace's cached models (the cache pods' hostPath)."""
    path = str((model["spec"].get("nodeCache") or {}).get("path") or DEFAULT_CACHE_ROOT)
    # Normalised: `/var/lib//arks/models/` is the same directory as `/var/lib/arks/models`, and
    # must not look like a move (a cleanup of the directory the new copy goes to).
    return f"{posixpath.normpath(path).rstrip('/')}/{model['metadata']['namespace']}"


def cache_path_problem(model: Mapping[str, Any], allowed: Sequence[str]) -> str | None:
    """Why `nodeCache.path` may not be used (None when it may): it must be one of the
    operator's `allowed` roots, absolute, with no `..` or `.` in it.

    Not a directory under one: the copy goes to `<path>/<namespace>/<model>`, so a tenant of
    namespace `a` naming `<root>/b` would get `<root>/b/a`, the directory of model `a` of
    namespace `b`, and its cache pods would write into (and its cleanup delete from) another
    tenant's model, which that tenant's engines then load."""
    path = str((model["spec"].get("nodeCache") or {}).get("path") or DEFAULT_CACHE_ROOT)
    parts = path.split("/")
    if not path.startswith("/") or ".." in parts or "." in parts:
        return f"nodeCache.path {path!r} must be an absolute path without '.' or '..'"
    normal = posixpath.normpath(path)
    if any(normal == posixpath.normpath(root) for root in allowed):
        return None
    return (
        f"nodeCache.path {path!r} is not a host directory the cluster allows for model caches "
        f"({', '.join(allowed) or 'none'}; the controller's --cache-root)"
    )


def nested_cache_roots(roots: Sequence[str]) -> tuple[str, str] | None:
    """(outer, inner) of two cache roots one inside the other, else None: copies go to
    `<root>/<namespace>/<model>`, so with `/r` and `/r/b` both allowed, namespace `a`'s copies
    (`/r/b/a/…`) would land in model `a` of namespace `b`."""
    normal = [posixpath.normpath(r) for r in roots]
    for i, outer in enumerate(normal):
        for j, inner in enumerate(normal):
            if i != j and inner.startswith(outer.rstrip("/") + "/"):
                return roots[i], roots[j]
    return None


def cache_host_path(model: Mapping[str, Any]) -> str:
    """The node directory holding the model's files once the cache is warm."""
    return f"{cache_root(model)}/{model['metadata']['name']}"


def cache_node_selector(model: Mapping[str, Any]) -> dict[str, str]:
    """The nodes the cache copies to (`nodeCache.nodeSelector`; empty selects every node)."""
    return {
        str(k): str(v)
        for k, v in ((model["spec"].get("nodeCache") or {}).get("nodeSelector") or {}).items()
    }


# --- PVC ----------------------------------------------------------------------------------------


def render_pvc(
    model: Mapping[str, Any], defaults: ModelDefaults | None = None
) -> dict[str, Any] | None:
    """The PVC to create, or None when `source.pvc` names an existing claim."""
    if is_adopted(model):
        return None
    d = defaults or ModelDefaults()
    storage = model["spec"]["storage"]
    spec: dict[str, Any] = {
        "accessModes": list(storage.get("accessModes") or d.access_modes),
        "volumeMode": "Filesystem",
        "resources": {"requests": {"storage": str(storage["size"])}},
    }
    if storage.get("storageClassName"):
        spec["storageClassName"] = storage["storageClassName"]
    meta = model_meta(model, claim_name(model), "model-storage")
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


# --- what engines mount -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelVolume:
    """How an engine pod reads a model: a volume, its mount's subPath, the pod's nodeSelector."""

    volume: dict[str, Any]
    sub_path: str
    node_selector: dict[str, str]
    """The pod's nodeSelector to use: its own, plus the cache's when `node_local`."""
    node_local: bool

    def mount(self, mount_path: str = CLAIM_MOUNT) -> dict[str, Any]:
        """The read-only volumeMount of `volume` at `mount_path`."""
        mount: dict[str, Any] = {
            "name": self.volume["name"],
            "mountPath": mount_path,
            "readOnly": True,
        }
        if self.sub_path:
            mount["subPath"] = self.sub_path
        return mount


def model_volume(
    model: Mapping[str, Any],
    pod_node_selector: Mapping[str, str] | None = None,
    *,
    volume_name: str = "model",
    allow_node_local: bool = True,
    cache_roots: Sequence[str] = (DEFAULT_CACHE_ROOT,),
) -> ModelVolume:
    """What an engine pod mounts for `model`, given the pod's own nodeSelector.

    Normally the claim, read-only, at the model's subPath. The node-local copy is used only when
    it is safe: the cache is enabled with a non-empty nodeSelector that does not contradict the
    pod's. Then the pod is pinned to the cache nodes (the two selectors merged), and the host
    directory is mounted with type `Directory`: it appears by an atomic rename only when the
    copy is complete, so until then the kubelet keeps retrying the mount and the engine never
    starts on a half-copied model. An empty cache nodeSelector cannot pin the pod to cache
    nodes, so the claim is used. Pods that should not be pinned to the cache nodes (routers,
    frontends) pass `allow_node_local=False` and always read the claim.
    """
    own = {str(k): str(v) for k, v in (pod_node_selector or {}).items()}
    usable = cache_enabled(model) and cache_path_problem(model, cache_roots) is None
    cache = cache_node_selector(model) if allow_node_local and usable else {}
    compatible = all(own.get(k, v) == v for k, v in cache.items())
    if cache and compatible:
        return ModelVolume(
            volume={
                "name": volume_name,
                "hostPath": {"path": cache_host_path(model), "type": "Directory"},
            },
            sub_path="",
            node_selector={**own, **cache},
            node_local=True,
        )
    return ModelVolume(
        volume={
            "name": volume_name,
            "persistentVolumeClaim": {"claimName": claim_name(model), "readOnly": True},
        },
        sub_path=model_sub_path(model),
        node_selector=own,
        node_local=False,
    )
