"""Render an ArksModel into the objects that fetch and keep it: pure, CR in, objects out.

- A PVC named after the model (none for `source.pvc`: that claim is adopted as it is).
- A download Job per source (Hugging Face, ModelScope, S3, HTTP(S) URL). It writes into
  `<claim>/.arks-partial-<id>` and, once the fetch succeeded, writes the marker `.arks-complete`
  (holding the source id) and renames the directory to `<claim>/model` in one step, so a
  half-finished download is never taken for a model; a re-run finds the marker and exits.
  The Job name carries the source id, so a different source gets a different Job.
- With `nodeCache.enabled`, a DaemonSet that copies the model to `<path>/<namespace>/<model>`
  on the selected nodes with the same marker discipline; its pods are Ready only once the
  copy is complete, so the warm nodes are the nodes of its Ready pods.
- `model_volume`: what an engine pod mounts for the model.

Owner references are left to the reconciler. Fetch commands are argv lists (data), quoted into
a fixed shell wrapper, so no spec value is ever interpreted by a shell.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from controller.render.labels import (
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    LABEL_NAME,
    label_value,
)

MODEL_SUBDIR = "model"
"""Where a downloaded model lives inside its PVC; engines mount it with this subPath."""
MARKER = ".arks-complete"
"""Written last, holding the source id: a directory without it is never used."""

ANNOTATION_MODEL = "arks.ai/model"
ANNOTATION_SOURCE_ID = "arks.ai/source-id"
COMPONENT_DOWNLOAD = "model-download"
COMPONENT_CACHE = "model-cache"

_CLAIM_MOUNT = "/models"
_CACHE_MOUNT = "/cache"
_MAX_NAME = 63  # Job and DaemonSet names end up in label values (job-name, pod names)


@dataclass(frozen=True)
class ModelDefaults:
    """Images and limits a cluster operator may tune; one value per controller, passed in.

    The Python images install the CLI at start (`pip install --user`) only when it is not
    already on PATH: clusters without PyPI access set an image that ships it.
    """

    huggingface_image: str = "python:3.12-slim"
    huggingface_pip: str = "huggingface_hub>=0.34"  # the `hf` CLI arrived in 0.34
    huggingface_high_performance: bool = False  # HF_XET_HIGH_PERFORMANCE: all cores, more RAM
    modelscope_image: str = "python:3.12-slim"
    modelscope_pip: str = "modelscope"
    s3_image: str = "amazon/aws-cli:2.22.0"
    url_image: str = "curlimages/curl:8.11.1"  # Alpine: busybox sh, tar and unzip
    cache_image: str = "busybox:1.37"
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


def _source(model: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """(kind, spec) of the one source that is set."""
    sources = model["spec"]["source"]
    kinds = [k for k in ("huggingface", "modelscope", "s3", "url", "pvc") if sources.get(k)]
    if len(kinds) != 1:
        raise ValueError(f"exactly one source must be set, found {kinds or 'none'}")
    return kinds[0], sources[kinds[0]]


def _fetch_identity(model: Mapping[str, Any]) -> dict[str, Any]:
    """What determines the files fetched, with the CRD defaults applied (credentials excluded)."""
    kind, spec = _source(model)
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
    canonical = json.dumps(_fetch_identity(model), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def is_adopted(model: Mapping[str, Any]) -> bool:
    """True when the model is already on a claim (`source.pvc`): nothing is created for it."""
    return _source(model)[0] == "pvc"


def claim_name(model: Mapping[str, Any]) -> str:
    """The PVC holding the model: the adopted claim, else one named after the model."""
    kind, spec = _source(model)
    return str(spec["claimName"]) if kind == "pvc" else str(model["metadata"]["name"])


def model_sub_path(model: Mapping[str, Any]) -> str:
    """The directory of the model files inside its claim ("" for the claim's root)."""
    kind, spec = _source(model)
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


def download_job_name(model: Mapping[str, Any]) -> str:
    return child_name(str(model["metadata"]["name"]), f"download-{source_id(model)}")


def cache_daemonset_name(model: Mapping[str, Any]) -> str:
    return child_name(str(model["metadata"]["name"]), "cache")


def _labels(model: Mapping[str, Any], component: str) -> dict[str, str]:
    return {
        LABEL_NAME: f"arks-{component}",
        LABEL_MANAGED_BY: "arks",
        LABEL_MODEL: label_value(str(model["metadata"]["name"])),
        LABEL_COMPONENT: component,
    }


def cache_pod_labels(model: Mapping[str, Any]) -> dict[str, str]:
    """The labels of the cache DaemonSet's pods (its selector is a subset of them)."""
    return _labels(model, COMPONENT_CACHE)


def cache_pod_selector(model: Mapping[str, Any]) -> str:
    """A label selector for the cache pods of this model (to list warm nodes)."""
    return f"{LABEL_COMPONENT}={COMPONENT_CACHE},{LABEL_MODEL}={label_value(str(model['metadata']['name']))}"


CACHE_PODS_SELECTOR = f"{LABEL_COMPONENT}={COMPONENT_CACHE}"
"""A label selector for the cache pods of every model (for a pod informer)."""


def _meta(model: Mapping[str, Any], name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": model["metadata"]["namespace"],
        "labels": _labels(model, component),
        "annotations": {
            ANNOTATION_MODEL: str(model["metadata"]["name"]),
            ANNOTATION_SOURCE_ID: source_id(model),
        },
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
    meta = _meta(model, claim_name(model), "model-storage")
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


# --- download Job -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fetch:
    """How one source is fetched: image, commands (argv lists), environment."""

    image: str
    steps: list[list[str]]
    env: list[dict[str, Any]] = field(default_factory=list)
    env_from: list[dict[str, Any]] = field(default_factory=list)
    pip: str = ""  # installed first unless `cli` is already on PATH
    cli: str = ""
    flatten: bool = False  # an archive with one top-level directory becomes that directory
    fresh: bool = False  # start from an empty directory (the fetch cannot resume)


# (suffix, argv before the archive path, argv after it); the target directory comes last.
_UNPACK: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    (".tar.gz", ("tar", "-xzf"), ("-C",)),
    (".tgz", ("tar", "-xzf"), ("-C",)),
    (".tar.xz", ("tar", "-xJf"), ("-C",)),
    (".txz", ("tar", "-xJf"), ("-C",)),
    (".tar.bz2", ("tar", "-xjf"), ("-C",)),
    (".tbz2", ("tar", "-xjf"), ("-C",)),
    (".tar", ("tar", "-xf"), ("-C",)),
    (".zip", ("unzip", "-q", "-o"), ("-d",)),
)


def _file_name(url: str) -> str:
    """The last path segment of `url`, safe as a file name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", posixpath.basename(urlparse(url).path)).strip(".-")
    return name or "download"


def partial_dir(model: Mapping[str, Any]) -> str:
    """Where the download Job writes before the atomic rename (kept across retries to resume)."""
    return f"{_CLAIM_MOUNT}/.arks-partial-{source_id(model)}"


def _fetch(model: Mapping[str, Any], d: ModelDefaults) -> _Fetch:
    kind, spec = _source(model)
    identity = _fetch_identity(model)[kind]
    out = partial_dir(model)
    if kind == "huggingface":
        argv = ["hf", "download", spec["repo"], "--revision", identity["revision"]]
        env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": "/tmp/hf"}]
        token = spec.get("tokenSecretRef")
        if token:
            ref = {"name": token["name"], "key": token.get("key") or "token"}
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
        if d.huggingface_high_performance:
            env.append({"name": "HF_XET_HIGH_PERFORMANCE", "value": "1"})
        return _Fetch(
            d.huggingface_image,
            [[*argv, "--local-dir", out]],
            env=env,
            pip=d.huggingface_pip,
            cli="hf",
        )
    if kind == "modelscope":
        argv = ["modelscope", "download", "--model", spec["repo"]]
        return _Fetch(
            d.modelscope_image,
            [[*argv, "--revision", identity["revision"], "--local_dir", out]],
            env=[{"name": "MODELSCOPE_CACHE", "value": "/tmp/modelscope"}],
            pip=d.modelscope_pip,
            cli="modelscope",
        )
    if kind == "s3":
        prefix = identity["prefix"]
        uri = f"s3://{identity['bucket']}/{prefix + '/' if prefix else ''}"
        argv = ["aws", "s3", "sync", uri, out, "--only-show-errors"]
        if identity["endpoint"]:
            argv += ["--endpoint-url", identity["endpoint"]]
        secret = spec.get("credentialsSecretRef")
        if not secret:
            argv.append("--no-sign-request")  # a public bucket
        env_from = [{"secretRef": {"name": secret["name"]}}] if secret else []
        return _Fetch(d.s3_image, [argv], env_from=env_from)
    if kind == "url":
        url = identity["url"]
        name = _file_name(url)
        curl = ["curl", "--fail", "--location", "--silent", "--show-error"]
        curl += ["--retry", str(d.curl_retries), "--retry-all-errors"]
        unpack = next((u for u in _UNPACK if name.lower().endswith(u[0])), None)
        if unpack is None:  # a single file, e.g. a .gguf: it is the model
            return _Fetch(d.url_image, [[*curl, "--output", f"{out}/{name}", url]])
        archive = f"{out}.download/{name}"
        _, before, after = unpack
        return _Fetch(
            d.url_image,
            [
                ["mkdir", "-p", f"{out}.download"],
                [*curl, "--output", archive, url],
                [*before, archive, *after, out],
                ["rm", "-rf", f"{out}.download"],
            ],
            flatten=True,
            fresh=True,
        )
    raise ValueError(f"source {kind} is not downloaded")


def download_steps(
    model: Mapping[str, Any], defaults: ModelDefaults | None = None
) -> list[list[str]]:
    """The fetch commands of the download Job, in order (argv lists)."""
    return _fetch(model, defaults or ModelDefaults()).steps


_FLATTEN = """\
entries=$(ls -A "$partial")
if [ -n "$entries" ] && [ "$(printf '%s\\n' "$entries" | wc -l)" -eq 1 ] && [ -d "$partial/$entries" ]; then
  mv "$partial/$entries" "$partial.inner" && rmdir "$partial" && mv "$partial.inner" "$partial"
fi
"""


def _download_script(model: Mapping[str, Any], fetch: _Fetch) -> str:
    q = shlex.quote
    lines = [
        "set -eu",
        f"id={q(source_id(model))}",
        f"target={q(_CLAIM_MOUNT + '/' + MODEL_SUBDIR)}",
        f"partial={q(partial_dir(model))}",
        f'if [ -f "$target/{MARKER}" ] && [ "$(cat "$target/{MARKER}")" = "$id" ]; then',
        '  echo "arks: $target already holds source $id"; exit 0',
        "fi",
        *(['rm -rf "$partial" "$partial.inner"'] if fetch.fresh else []),
        'mkdir -p "$partial"',
    ]
    if fetch.pip:
        lines += [
            'export PATH="$HOME/.local/bin:$PATH"',
            f"command -v {q(fetch.cli)} >/dev/null 2>&1 || "
            f"pip install --user --no-cache-dir --quiet {q(fetch.pip)}",
        ]
    lines += [" ".join(q(arg) for arg in step) for step in fetch.steps]
    script = "\n".join(lines) + "\n"
    if fetch.flatten:
        script += _FLATTEN
    return script + (
        f'printf \'%s\\n\' "$id" > "$partial/{MARKER}"\n'
        'rm -rf "$target"\n'
        'mv "$partial" "$target"\n'
        'echo "arks: source $id is complete in $target"\n'
    )


def _restricted(run_as_user: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": run_as_user,
        "runAsGroup": run_as_user,
        "fsGroup": run_as_user,
        # Re-chowning a volume of hundreds of GB on every retry would take minutes.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security(**extra: Any) -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, **extra}


def render_download_job(
    model: Mapping[str, Any], defaults: ModelDefaults | None = None
) -> dict[str, Any] | None:
    """The Job that fills the claim, or None for an adopted claim.

    `ttlSecondsAfterFinished` is not set: the reconciler reads the Job's outcome. A Failed Job
    stays Failed; deleting it makes the controller create it again (a retry).
    """
    if is_adopted(model):
        return None
    d = defaults or ModelDefaults()
    fetch = _fetch(model, d)
    meta = _meta(model, download_job_name(model), COMPONENT_DOWNLOAD)
    container: dict[str, Any] = {
        "name": "download",
        "image": fetch.image,
        "command": ["sh", "-c", _download_script(model, fetch)],
        "env": [{"name": "HOME", "value": "/tmp"}, *fetch.env],
        "resources": {
            "requests": {"cpu": d.download_cpu, "memory": d.download_memory},
            "limits": {"memory": d.download_memory_limit},
        },
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "model", "mountPath": _CLAIM_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if fetch.env_from:
        container["envFrom"] = fetch.env_from
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": d.backoff_limit,
            "activeDeadlineSeconds": d.active_deadline_s,
            # An evicted or preempted pod is not the download's fault: do not count it.
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    }
                ]
            },
            "template": {
                "metadata": {"labels": dict(meta["labels"])},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": _restricted(d.run_as_user),
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "model",
                            "persistentVolumeClaim": {"claimName": claim_name(model)},
                        },
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


# --- node-local cache ---------------------------------------------------------------------------


def cache_enabled(model: Mapping[str, Any]) -> bool:
    return bool((model["spec"].get("nodeCache") or {}).get("enabled"))


def _cache_root(model: Mapping[str, Any]) -> str:
    path = str((model["spec"].get("nodeCache") or {}).get("path") or "/var/lib/arks/models")
    return f"{path.rstrip('/') or ''}/{model['metadata']['namespace']}"


def cache_host_path(model: Mapping[str, Any]) -> str:
    """The node directory holding the model's files once the cache is warm."""
    return f"{_cache_root(model)}/{model['metadata']['name']}"


def _cache_node_selector(model: Mapping[str, Any]) -> dict[str, str]:
    return {
        str(k): str(v)
        for k, v in ((model["spec"].get("nodeCache") or {}).get("nodeSelector") or {}).items()
    }


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
            f'[ -f {_CLAIM_MOUNT}/{MARKER} ] || {{ echo "arks: the claim has no complete model"; exit 1; }}'
        )
    lines += [
        'rm -rf "$partial"',
        'mkdir -p "$partial"',
        f'cp -R {_CLAIM_MOUNT}/. "$partial/"',
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
    meta = _meta(model, cache_daemonset_name(model), COMPONENT_CACHE)
    labels = cache_pod_labels(model)
    selector = {LABEL_COMPONENT: labels[LABEL_COMPONENT], LABEL_MODEL: labels[LABEL_MODEL]}
    claim_mount: dict[str, Any] = {"name": "model", "mountPath": _CLAIM_MOUNT, "readOnly": True}
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
                "securityContext": _container_security(
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
                "securityContext": _container_security(
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
                "hostPath": {"path": _cache_root(model), "type": "DirectoryOrCreate"},
            },
        ],
    }
    node_selector = _cache_node_selector(model)
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


def render_model(
    model: Mapping[str, Any], defaults: ModelDefaults | None = None
) -> list[dict[str, Any]]:
    """Every object the model may need: PVC, download Job, cache DaemonSet (those that apply).

    The reconciler applies the DaemonSet only once the download is complete.
    """
    rendered = (
        render_pvc(model, defaults),
        render_download_job(model, defaults),
        render_cache_daemonset(model, defaults),
    )
    return [obj for obj in rendered if obj is not None]


# --- what engines mount -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelVolume:
    """How an engine pod reads a model: a volume, its mount's subPath, the pod's nodeSelector."""

    volume: dict[str, Any]
    sub_path: str
    node_selector: dict[str, str]
    """The pod's nodeSelector to use: its own, plus the cache's when `node_local`."""
    node_local: bool

    def mount(self, mount_path: str = _CLAIM_MOUNT) -> dict[str, Any]:
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
    cache = _cache_node_selector(model) if allow_node_local and cache_enabled(model) else {}
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
