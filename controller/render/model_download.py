"""Render the Job that downloads an ArksModel into its claim: pure, CR in, Job out.

One Job per source (Hugging Face, ModelScope, S3, HTTP(S) URL), named after the source id, so
a different source gets a different Job. It writes into `<claim>/.arks-partial-<id>` and, once
the fetch succeeded, writes the marker `.arks-complete` (holding the source id) and renames the
directory to `<claim>/model` in one step, so a half-finished download is never taken for a
model; a re-run finds the marker and exits.

Fetch commands are argv lists (data), quoted into a fixed shell wrapper, so no spec value is
ever interpreted by a shell. Owner references are left to the reconciler.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from controller.render.model import (
    CLAIM_MOUNT,
    MARKER,
    MODEL_SUBDIR,
    ModelDefaults,
    child_name,
    claim_name,
    container_security,
    fetch_identity,
    is_adopted,
    model_meta,
    source_id,
    source_of,
)

COMPONENT_DOWNLOAD = "model-download"
NO_CLI_EXIT = 127  # the shell's "command not found": the Job fails at once, no retries


def download_job_name(model: Mapping[str, Any]) -> str:
    return child_name(str(model["metadata"]["name"]), f"download-{source_id(model)}")


@dataclass(frozen=True)
class _Fetch:
    """How one source is fetched: image, commands (argv lists), environment."""

    image: str
    steps: list[list[str]]
    env: list[dict[str, Any]] = field(default_factory=list)
    env_from: list[dict[str, Any]] = field(default_factory=list)
    cli: str = ""  # checked on PATH first: an image without it fails the Job at once
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
    return f"{CLAIM_MOUNT}/.arks-partial-{source_id(model)}"


def _fetch(model: Mapping[str, Any], d: ModelDefaults) -> _Fetch:
    kind, spec = source_of(model)
    identity = fetch_identity(model)[kind]
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
            cli="hf",
        )
    if kind == "modelscope":
        argv = ["modelscope", "download", "--model", spec["repo"]]
        return _Fetch(
            d.modelscope_image,
            [[*argv, "--revision", identity["revision"], "--local_dir", out]],
            env=[{"name": "MODELSCOPE_CACHE", "value": "/tmp/modelscope"}],
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
        return _Fetch(d.s3_image, [argv], env_from=env_from, cli="aws")
    if kind == "url":
        url = identity["url"]
        name = _file_name(url)
        curl = ["curl", "--fail", "--location", "--silent", "--show-error"]
        curl += ["--retry", str(d.curl_retries), "--retry-all-errors"]
        unpack = next((u for u in _UNPACK if name.lower().endswith(u[0])), None)
        if unpack is None:  # a single file, e.g. a .gguf: it is the model
            return _Fetch(d.url_image, [[*curl, "--output", f"{out}/{name}", url]], cli="curl")
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
            cli="curl",
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
        f"target={q(CLAIM_MOUNT + '/' + MODEL_SUBDIR)}",
        f"partial={q(partial_dir(model))}",
        f'if [ -f "$target/{MARKER}" ] && [ "$(cat "$target/{MARKER}")" = "$id" ]; then',
        '  echo "arks: $target already holds source $id"; exit 0',
        "fi",
        *(['rm -rf "$partial" "$partial.inner"'] if fetch.fresh else []),
        'mkdir -p "$partial"',
    ]
    if fetch.cli:
        missing = (
            f"arks: this image has no {fetch.cli} command; give the controller an image that has"
        )
        lines.append(
            f"command -v {q(fetch.cli)} >/dev/null 2>&1 || "
            f"{{ echo {q(missing)} >&2; exit {NO_CLI_EXIT}; }}"
        )
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
    meta = model_meta(model, download_job_name(model), COMPONENT_DOWNLOAD)
    container: dict[str, Any] = {
        "name": "download",
        "image": fetch.image,
        "command": ["sh", "-c", _download_script(model, fetch)],
        "env": [{"name": "HOME", "value": "/tmp"}, *fetch.env],
        "resources": {
            "requests": {"cpu": d.download_cpu, "memory": d.download_memory},
            "limits": {"memory": d.download_memory_limit},
        },
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "model", "mountPath": CLAIM_MOUNT},
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
                    },
                    # An image without the CLI will not grow one by retrying.
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "download",
                            "operator": "In",
                            "values": [NO_CLI_EXIT],
                        },
                    },
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
