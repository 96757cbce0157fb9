"""ArksModel rendering: golden files, strict validation, fetch commands, markers, model_volume.

Regenerate the golden files with
`ARKS_UPDATE_GOLDEN=1 pytest tests/unit/controller/render/test_render_model.py` and review the
diff; golden/model/SOURCES.md (next to this file) lists where the CLI facts come from.
The download and cache scripts are also run here, with stand-in CLIs, to check the marker
discipline (a half-finished fetch is never taken for a model; a finished one is not redone).
"""

from __future__ import annotations

import copy
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controller.render import render_model
from controller.render.model import (
    DOWNLOADER_IMAGE,
    MARKER,
    ModelDefaults,
    cache_host_path,
    cache_path_problem,
    cache_root,
    claim_name,
    model_sub_path,
    model_volume,
    render_pvc,
    source_id,
)
from controller.render.model_cache import (
    cache_daemonset_name,
    cache_pod_labels,
    cleanup_daemonset_name,
    cleanup_done,
    copy_failures,
    render_cache_daemonset,
    render_cache_source,
    render_cleanup_daemonset,
    retired_root,
    warm_nodes,
)
from controller.render.model_download import (
    NO_CLI_EXIT,
    download_job_name,
    download_steps,
    partial_dir,
    render_download_job,
)

GOLDEN = Path(__file__).parent / "golden" / "model"
K8S_VERSION = "1.33.0"

SOURCES: dict[str, dict[str, Any]] = {
    "huggingface": {
        "huggingface": {
            "repo": "Qwen/Qwen2.5-7B-Instruct",
            "revision": "main",
            "tokenSecretRef": {"name": "hf-token", "key": "token"},
        }
    },
    "modelscope": {"modelscope": {"repo": "Qwen/Qwen2.5-7B-Instruct", "revision": "master"}},
    "s3": {
        "s3": {
            "endpoint": "https://minio.storage.svc:9000",
            "bucket": "models",
            "prefix": "qwen/qwen2.5-7b-instruct",
            "credentialsSecretRef": {"name": "minio-credentials"},
        }
    },
    "url": {"url": {"url": "https://example.com/models/qwen2.5-7b-instruct.tar.gz"}},
    "pvc": {"pvc": {"claimName": "shared-models", "subPath": "qwen/7b"}},
}


def make_model(source: str | dict[str, Any], *, cache: bool = False, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": copy.deepcopy(SOURCES[source] if isinstance(source, str) else source)
    }
    if "pvc" not in body["source"]:
        body["storage"] = {"size": "40Gi", "storageClassName": "nfs-client"}
    if cache:
        body["nodeCache"] = {
            "enabled": True,
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "path": "/var/lib/arks/models",
        }
    body.update(spec)
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksModel",
        "metadata": {"name": "qwen2-5-7b-instruct", "namespace": "llm"},
        "spec": body,
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line scripts as literal blocks, and no YAML aliases: golden files are read by people."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False)


def job(model: dict[str, Any], defaults: ModelDefaults | None = None) -> dict[str, Any]:
    rendered = render_download_job(model, defaults)
    assert rendered is not None
    return rendered


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (only,) = obj["spec"]["template"]["spec"]["containers"]
    return dict(only)


def script(obj: dict[str, Any]) -> str:
    command = container(obj)["command"]
    assert command[:2] == ["sh", "-c"] and len(command) == 3
    return str(command[2])


def env(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(obj).get("env") or []}


# --- golden files and validity ------------------------------------------------------------------

CASES = list(SOURCES)


@pytest.mark.parametrize("source", CASES)
def test_render_matches_golden_file(source: str) -> None:
    rendered = dump(render_model(make_model(source, cache=True)))
    path = GOLDEN / f"{source}.yaml"
    if os.environ.get("ARKS_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered)
    assert path.read_text() == rendered, f"{path} is stale; rerun with ARKS_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("source", CASES)
@pytest.mark.parametrize("cache", [False, True])
def test_every_object_validates_strictly(source: str, cache: bool) -> None:
    objects = render_model(make_model(source, cache=cache))
    assert objects or source == "pvc"
    for obj in objects:
        cache_ns = obj["kind"] == "DaemonSet"
        assert obj["metadata"]["namespace"] == ("arks-cache" if cache_ns else "llm")
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_rendering_is_pure() -> None:
    model = make_model("huggingface", cache=True)
    before = copy.deepcopy(model)
    first = render_model(model)
    assert model == before
    assert render_model(model) == first


# --- the claim ----------------------------------------------------------------------------------


def test_pvc_is_named_after_the_model_with_the_requested_storage() -> None:
    model = make_model("huggingface", storage={"size": "100Gi", "accessModes": ["ReadWriteOnce"]})
    pvc = render_pvc(model)
    assert pvc is not None
    assert pvc["metadata"]["name"] == claim_name(model) == "qwen2-5-7b-instruct"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"] == {"requests": {"storage": "100Gi"}}
    assert "storageClassName" not in pvc["spec"], "empty means the cluster default"


def test_pvc_defaults_to_read_write_many_and_the_given_class() -> None:
    pvc = render_pvc(make_model("s3"))
    assert pvc is not None
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == "nfs-client"
    custom = render_pvc(make_model("s3"), ModelDefaults(access_modes=("ReadWriteOnce",)))
    assert custom is not None and custom["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_an_adopted_claim_gets_no_pvc_and_no_job() -> None:
    model = make_model("pvc")
    assert render_pvc(model) is None
    assert render_download_job(model) is None
    assert render_model(model) == []
    assert claim_name(model) == "shared-models"
    assert model_sub_path(model) == "qwen/7b"


# --- download Jobs ------------------------------------------------------------------------------


def test_huggingface_job_runs_hf_download_with_the_token_from_its_secret() -> None:
    model = make_model("huggingface")
    (argv,) = download_steps(model)
    assert argv == [
        "hf",
        "download",
        "Qwen/Qwen2.5-7B-Instruct",
        "--revision",
        "main",
        "--local-dir",
        partial_dir(model),
    ]
    variables = env(job(model))
    assert variables["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}},
    }
    assert "HF_XET_HIGH_PERFORMANCE" not in variables
    fast = env(job(model, ModelDefaults(huggingface_high_performance=True)))
    assert fast["HF_XET_HIGH_PERFORMANCE"]["value"] == "1"
    assert container(job(model))["image"] == ModelDefaults().huggingface_image
    own = job(model, ModelDefaults(huggingface_image="mirror.example/arks:1"))
    assert container(own)["image"] == "mirror.example/arks:1"


def test_public_huggingface_model_has_no_token_and_default_revision() -> None:
    model = make_model({"huggingface": {"repo": "Qwen/Qwen2.5-0.5B"}})
    (argv,) = download_steps(model)
    assert argv[argv.index("--revision") + 1] == "main"
    assert "HF_TOKEN" not in env(job(model))


def test_modelscope_job_runs_modelscope_download() -> None:
    model = make_model("modelscope")
    (argv,) = download_steps(model)
    assert argv == [
        "modelscope",
        "download",
        "--model",
        "Qwen/Qwen2.5-7B-Instruct",
        "--revision",
        "master",
        "--local_dir",
        partial_dir(model),
    ]
    assert container(job(model))["image"] == ModelDefaults().modelscope_image


def test_s3_job_syncs_the_prefix_with_endpoint_and_credentials_from_the_secret() -> None:
    model = make_model("s3")
    (argv,) = download_steps(model)
    assert argv[:5] == [
        "aws",
        "s3",
        "sync",
        "s3://models/qwen/qwen2.5-7b-instruct/",
        partial_dir(model),
    ]
    assert argv[argv.index("--endpoint-url") + 1] == "https://minio.storage.svc:9000"
    assert "--no-sign-request" not in argv
    rendered = container(job(model))
    assert rendered["envFrom"] == [{"secretRef": {"name": "minio-credentials"}}]
    assert rendered["image"] == ModelDefaults().s3_image


def test_s3_without_credentials_is_a_public_bucket_on_aws() -> None:
    model = make_model({"s3": {"bucket": "open-models", "prefix": "/qwen/"}})
    (argv,) = download_steps(model)
    assert argv[3] == "s3://open-models/qwen/"
    assert "--no-sign-request" in argv and "--endpoint-url" not in argv
    assert "envFrom" not in container(job(model))
    whole = make_model({"s3": {"bucket": "open-models"}})
    assert download_steps(whole)[0][3] == "s3://open-models/"


@pytest.mark.parametrize(
    ("url", "unpack"),
    [
        ("https://example.com/m.tar.gz", ["tar", "-xzf"]),
        ("https://example.com/m.tgz?sig=abc", ["tar", "-xzf"]),
        ("https://example.com/m.tar.xz", ["tar", "-xJf"]),
        ("https://example.com/m.tar.bz2", ["tar", "-xjf"]),
        ("https://example.com/m.tar", ["tar", "-xf"]),
        ("https://example.com/M.ZIP", ["unzip", "-q", "-o"]),
    ],
)
def test_url_archives_are_fetched_with_retries_and_unpacked_by_extension(
    url: str, unpack: list[str]
) -> None:
    model = make_model({"url": {"url": url}})
    mkdir, curl, extract, cleanup = download_steps(model)
    out = partial_dir(model)
    assert mkdir == ["mkdir", "-p", f"{out}.download"]
    assert curl[0] == "curl" and curl[-1] == url
    assert {"--fail", "--location", "--retry-all-errors"} <= set(curl)
    assert curl[curl.index("--retry") + 1] == "5"
    archive = curl[curl.index("--output") + 1]
    assert archive.startswith(f"{out}.download/")
    assert extract[: len(unpack)] == unpack and extract[len(unpack)] == archive
    assert extract[-1] == out
    assert cleanup == ["rm", "-rf", f"{out}.download"]


def test_a_url_that_is_not_an_archive_is_the_model_file_itself() -> None:
    model = make_model({"url": {"url": "https://example.com/q/qwen2.5-7b-q4_k_m.gguf"}})
    (curl,) = download_steps(model)
    assert curl[curl.index("--output") + 1] == f"{partial_dir(model)}/qwen2.5-7b-q4_k_m.gguf"


def test_jobs_retry_with_backoff_have_a_deadline_and_keep_their_outcome() -> None:
    for source in ("huggingface", "modelscope", "s3", "url"):
        spec = job(make_model(source))["spec"]
        assert spec["backoffLimit"] == ModelDefaults().backoff_limit
        assert spec["activeDeadlineSeconds"] == ModelDefaults().active_deadline_s
        assert "ttlSecondsAfterFinished" not in spec, "the reconciler reads the outcome"
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container(job(make_model(source)))["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
        claim = [v for v in pod["volumes"] if v["name"] == "model"]
        assert claim == [
            {"name": "model", "persistentVolumeClaim": {"claimName": "qwen2-5-7b-instruct"}}
        ]


def test_no_secret_value_is_ever_inlined() -> None:
    secret_names = {"hf-token", "minio-credentials"}
    for source in CASES:
        for obj in render_model(make_model(source, cache=True)):
            for pod_container in _containers(obj):
                for variable in pod_container.get("env") or []:
                    sensitive = any(w in variable["name"] for w in ("TOKEN", "KEY", "SECRET"))
                    assert not (sensitive and "value" in variable), variable
                text = yaml.safe_dump(pod_container)
                for name in secret_names:
                    # Named only in references, never copied into commands.
                    assert name not in " ".join(pod_container.get("command") or [])
                assert "hf_" not in text


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    template = (obj.get("spec") or {}).get("template")
    if not template:
        return []
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_source_id_follows_the_source_only() -> None:
    base = make_model("huggingface")
    other_revision = make_model(
        {"huggingface": {**SOURCES["huggingface"]["huggingface"], "revision": "v2"}}
    )
    other_token = make_model(
        {"huggingface": {**SOURCES["huggingface"]["huggingface"], "tokenSecretRef": {"name": "x"}}}
    )
    defaulted = make_model({"huggingface": {"repo": "Qwen/Qwen2.5-7B-Instruct"}})
    assert source_id(base) != source_id(other_revision)
    assert download_job_name(base) != download_job_name(other_revision)
    assert source_id(base) == source_id(other_token), "a new token needs no new download"
    assert source_id(base) == source_id(defaulted), "the CRD default revision is the same source"
    ids = {source_id(make_model(s)) for s in CASES}
    assert len(ids) == len(CASES)
    assert download_job_name(base) == f"qwen2-5-7b-instruct-download-{source_id(base)}"


def test_long_model_names_give_valid_short_child_names() -> None:
    model = make_model("url")
    model["metadata"]["name"] = "a-very-long-model-name-" + "x" * 200
    for obj in render_model(model | {"spec": {**model["spec"], "nodeCache": {"enabled": True}}}):
        if obj["kind"] != "PersistentVolumeClaim":
            assert len(obj["metadata"]["name"]) <= 63
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    other = copy.deepcopy(model)
    other["metadata"]["name"] = "a-very-long-model-name-" + "x" * 199 + "y"
    assert download_job_name(model) != download_job_name(other)


# --- the scripts, run with stand-in CLIs --------------------------------------------------------


def _executable(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run(
    text: str, tmp: Path, mounts: dict[str, Path], path: str | None = None
) -> subprocess.CompletedProcess[str]:
    for mount, local in mounts.items():
        text = text.replace(mount, str(local))
    environment = {
        **os.environ,
        "HOME": str(tmp / "home"),
        "PATH": path or f"{tmp / 'bin'}:{os.environ['PATH']}",
    }
    return subprocess.run(
        ["sh", "-c", text], env=environment, capture_output=True, text=True, timeout=30, check=False
    )


def test_download_script_marks_completion_last_and_is_idempotent(tmp_path: Path) -> None:
    models, bin_dir = tmp_path / "models", tmp_path / "bin"
    models.mkdir()
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    # A stand-in `hf`: writes one file into --local-dir, fails while tmp/fail exists.
    _executable(
        bin_dir / "hf",
        f'echo "$@" >> {calls}\n'
        'while [ "$1" != "--local-dir" ]; do shift; done\n'
        'mkdir -p "$2" && echo weights > "$2/model.safetensors"\n'
        f"[ ! -e {tmp_path}/fail ]\n",
    )
    model = make_model("huggingface")
    text = script(job(model))
    (tmp_path / "fail").touch()
    failed = _run(text, tmp_path, {"/models": models})
    assert failed.returncode != 0
    assert not (models / "model").exists(), "a failed fetch is never the model"

    (tmp_path / "fail").unlink()
    done = _run(text, tmp_path, {"/models": models})
    assert done.returncode == 0, done.stderr
    assert (models / "model" / "model.safetensors").read_text() == "weights\n"
    assert (models / "model" / MARKER).read_text() == f"{source_id(model)}\n"
    assert not Path(str(models) + partial_dir(model).removeprefix("/models")).exists()

    again = _run(text, tmp_path, {"/models": models})
    assert again.returncode == 0 and "already holds" in again.stdout
    assert len(calls.read_text().splitlines()) == 2, "a complete model is not fetched again"


def test_url_script_unpacks_and_flattens_a_single_top_directory(tmp_path: Path) -> None:
    models, bin_dir = tmp_path / "models", tmp_path / "bin"
    models.mkdir()
    bin_dir.mkdir()
    archive = tmp_path / "served.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (("qwen/config.json", b"{}"), ("qwen/model.safetensors", b"w")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # A stand-in `curl` that "downloads" the archive to --output.
    _executable(
        bin_dir / "curl",
        f'while [ "$1" != "--output" ]; do shift; done\ncp {archive} "$2"\n',
    )
    model = make_model("url")
    done = _run(script(job(model)), tmp_path, {"/models": models})
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (models / "model").iterdir()) == sorted(
        ["config.json", "model.safetensors", MARKER]
    )
    assert [p.name for p in models.iterdir()] == ["model"], "no partial or archive left"


# --- node-local cache ---------------------------------------------------------------------------


def _source_objects(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in render_cache_source(model)}


def test_the_cache_source_serves_the_claim_read_only_to_the_cache_namespace_only() -> None:
    model = make_model("huggingface", cache=True)
    objects = _source_objects(model)
    assert sorted(objects) == ["Deployment", "NetworkPolicy", "Service"]
    for obj in objects.values():
        assert obj["metadata"]["namespace"] == "llm", "in the model's namespace, owned by it"
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (serve,) = pod["containers"]
    assert serve["command"][:4] == ["python", "-m", "controller.cache_transfer", "serve"]
    assert serve["volumeMounts"] == [
        {"name": "model", "mountPath": "/models", "readOnly": True, "subPath": "model"}
    ]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": "qwen2-5-7b-instruct",
        "readOnly": True,
    }
    assert_restricted(pod)
    ingress = objects["NetworkPolicy"]["spec"]["ingress"]
    assert ingress == [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "arks-cache"}
                    },
                    "podSelector": {
                        "matchLabels": {
                            "arks.ai/component": "model-cache",
                            "arks.ai/model-namespace": "llm",
                            "arks.ai/model": "qwen2-5-7b-instruct",
                        }
                    },
                }
            ],
            "ports": [{"port": 8080, "protocol": "TCP"}],
        }
    ]
    # Only this model's cache pods: another tenant's cache pods, sent here by a source Service
    # of theirs turned into an ExternalName for this one, are not let in.
    peer = ingress[0]["from"][0]["podSelector"]
    assert _matches(peer, cache_pod_labels(model))
    other = copy.deepcopy(model)
    other["metadata"]["namespace"] = "attacker"
    assert not _matches(peer, cache_pod_labels(other))
    selector = objects["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"].items()
    assert selector <= objects["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert objects["Service"]["spec"]["selector"].items() == selector
    assert render_cache_source(make_model("huggingface")) == []


def assert_restricted(pod: dict[str, Any]) -> None:
    """Pod Security `restricted`, as far as a pod spec says it."""
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True and context["seccompProfile"] == {
        "type": "RuntimeDefault"
    }
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert not [v for v in pod["volumes"] if "hostPath" in v]


def test_cache_daemonset_runs_in_the_cache_namespace_with_least_privilege() -> None:
    model = make_model("huggingface", cache=True)
    ds = render_cache_daemonset(model, ModelDefaults(cache_namespace="node-cache"))
    assert ds is not None
    kubernetes_validate.validate(ds, K8S_VERSION, strict=True)
    meta = ds["metadata"]
    assert meta["namespace"] == "node-cache"
    assert meta["labels"]["arks.ai/model-namespace"] == "llm"
    assert meta["labels"]["arks.ai/model"] == "qwen2-5-7b-instruct"
    assert meta["annotations"]["arks.ai/cache-root"] == "/var/lib/arks/models/llm"
    assert "ownerReferences" not in meta, "an owner reference cannot cross namespaces"
    template = ds["spec"]["template"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert template["metadata"]["labels"] == cache_pod_labels(model)
    pod = template["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["volumes"] == [
        {
            "name": "cache",
            "hostPath": {"path": "/var/lib/arks/models/llm", "type": "DirectoryOrCreate"},
        }
    ], "the cache root only; no claim (it is in another namespace)"
    own, copy_ = pod["initContainers"]
    assert own["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert own["command"] == ["chown", "1000:1000", "/cache"]
    for c in (copy_, *pod["containers"]):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]} and not sc["allowPrivilegeEscalation"]
    assert not [
        c for c in (own, copy_, *pod["containers"]) if c["securityContext"].get("privileged")
    ]
    argv = copy_["command"]
    assert argv[:4] == ["python", "-m", "controller.cache_transfer", "fetch"]
    assert (
        argv[argv.index("--source") + 1] == "http://qwen2-5-7b-instruct-cache-source.llm.svc:8080"
    )
    assert argv[argv.index("--id") + 1] == source_id(model)
    assert "--require-marker" in argv and "--reserve-bytes" in argv
    probe = pod["containers"][0]["readinessProbe"]["exec"]["command"]
    assert probe == ["test", "-f", f"/cache/qwen2-5-7b-instruct/{MARKER}"]
    assert cache_host_path(model) == "/var/lib/arks/models/llm/qwen2-5-7b-instruct"


def test_cache_objects_of_two_models_never_share_a_name() -> None:
    a = make_model("s3", nodeCache={"enabled": True})
    b = make_model("s3", nodeCache={"enabled": True})
    a["metadata"].update(namespace="a", name="b-c")
    b["metadata"].update(namespace="a-b", name="c")
    assert cache_daemonset_name(a) != cache_daemonset_name(b)
    assert cleanup_daemonset_name(a, "/x") != cleanup_daemonset_name(a, "/y")


def test_a_tenants_node_selector_never_puts_cache_pods_on_the_control_plane() -> None:
    # The selector is the tenant's and the pods tolerate every taint on the nodes it picks:
    # `node-role.kubernetes.io/control-plane: ""` would copy a model onto etcd's disk.
    model = make_model("huggingface", cache=True)
    model["spec"]["nodeCache"]["nodeSelector"] = {"node-role.kubernetes.io/control-plane": ""}
    cache = render_cache_daemonset(model)
    cleanup = render_cleanup_daemonset(model, "/var/lib/arks/models/llm", {"pool": "gpu"})
    assert cache is not None
    for ds in (cache, cleanup):
        pod = ds["spec"]["template"]["spec"]
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        (term,) = terms["nodeSelectorTerms"]
        assert {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"} in (
            term["matchExpressions"]
        )
    assert "podAntiAffinity" in cleanup["spec"]["template"]["spec"]["affinity"], "both kept"


def test_no_daemonset_without_the_cache_and_no_tolerations_without_a_selector() -> None:
    assert render_cache_daemonset(make_model("s3")) is None
    everywhere = make_model("s3", nodeCache={"enabled": True})
    ds = render_cache_daemonset(everywhere)
    assert ds is not None
    assert "nodeSelector" not in ds["spec"]["template"]["spec"]
    assert "tolerations" not in ds["spec"]["template"]["spec"]


def test_adopted_claim_cache_serves_its_sub_path_without_a_marker_check() -> None:
    model = make_model("pvc", cache=True)
    ds = render_cache_daemonset(model)
    assert ds is not None
    assert "--require-marker" not in ds["spec"]["template"]["spec"]["initContainers"][1]["command"]
    serve = _source_objects(model)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert serve["volumeMounts"][0]["subPath"] == "qwen/7b"


def test_the_cleanup_daemonset_removes_the_copy_where_the_cache_ran() -> None:
    model = make_model("huggingface", cache=True)
    ds = render_cleanup_daemonset(model, "/old/root/llm", {"pool": "gpu"})
    kubernetes_validate.validate(ds, K8S_VERSION, strict=True)
    pod = ds["spec"]["template"]["spec"]
    assert pod["volumes"][0]["hostPath"]["path"] == "/old/root/llm"
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"] == [{"operator": "Exists"}]
    (remove,) = pod["initContainers"]
    assert remove["command"] == [
        "python",
        "-m",
        "controller.cache_transfer",
        "remove",
        "--root",
        "/cache",
        "--name",
        "qwen2-5-7b-instruct",
    ]
    assert remove["securityContext"]["runAsUser"] == 1000, "the copier's user owns the copy"
    assert retired_root(ds) == ("/old/root/llm", {"pool": "gpu"})
    assert not cleanup_done(ds), "no status yet: not done"
    ds["status"] = {"desiredNumberScheduled": 2, "numberReady": 1}
    assert not cleanup_done(ds)
    ds["status"] = {"desiredNumberScheduled": 2, "numberReady": 2}
    assert cleanup_done(ds)
    ds["metadata"]["generation"] = 3
    ds["status"]["observedGeneration"] = 2
    assert not cleanup_done(ds), "the status of an older spec"


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_a_cleanup_pod_waits_on_its_node_for_the_copiers_of_its_directory() -> None:
    # The cache DaemonSet's pods are deleted by the garbage collector after it: a copier still
    # running would rename its copy into place after the cleanup deleted it.
    model = make_model("huggingface", cache=True)
    cache = render_cache_daemonset(model)
    assert cache is not None
    copier = cache["spec"]["template"]["metadata"]["labels"]
    assert "arks.ai/cache-root-digest" not in cache["spec"]["selector"]["matchLabels"], (
        "a DaemonSet's selector is immutable: a moved cache keeps its DaemonSet"
    )
    root = retired_root(cache)[0]
    cleanup = render_cleanup_daemonset(model, root, {"pool": "gpu"})
    (term,) = cleanup["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert "namespaces" not in term, "the cache namespace: the cleanup pod's own"
    assert _matches(term["labelSelector"], copier)
    cleanup_pod = cleanup["spec"]["template"]["metadata"]["labels"]
    assert not _matches(term["labelSelector"], cleanup_pod), "never waits for itself"
    moved = copy.deepcopy(model)
    moved["spec"]["nodeCache"]["path"] = "/mnt/nvme"
    moved_cache = render_cache_daemonset(moved, ModelDefaults(cache_roots=("/mnt/nvme",)))
    assert moved_cache is not None
    assert moved_cache["spec"]["selector"] == cache["spec"]["selector"]
    new_copier = moved_cache["spec"]["template"]["metadata"]["labels"]
    assert not _matches(term["labelSelector"], new_copier), "the new directory's copiers run on"


def test_the_same_directory_spelled_otherwise_is_not_a_move() -> None:
    model = make_model("huggingface", cache=True)
    model["spec"]["nodeCache"]["path"] = "/var/lib//arks/models/"
    assert cache_path_problem(model, ModelDefaults().cache_roots) is None
    assert cache_root(model) == "/var/lib/arks/models/llm"


def test_a_copy_that_found_no_disk_is_reported_with_its_message() -> None:
    def pod(node: str, code: int, message: str, current: bool) -> dict[str, Any]:
        terminated = {"exitCode": code, "message": message, "reason": "Error"}
        state = (
            {"state": {"terminated": terminated}}
            if current
            else {
                "state": {"running": {}},
                "lastState": {"terminated": terminated},
            }
        )
        return {
            "spec": {"nodeName": node},
            "status": {"initContainerStatuses": [{"name": "copy", **state}]},
        }

    pods = [
        pod("gpu-b", 2, "arks: not enough disk for the model on this node: it needs 9 bytes", True),
        pod("gpu-a", 1, "arks: cannot read http://x/index", False),
        pod("gpu-c", 0, "", True),
    ]
    assert copy_failures(pods) == [
        ("gpu-a", "CopyFailed", "arks: cannot read http://x/index"),
        (
            "gpu-b",
            "NoDiskSpace",
            "arks: not enough disk for the model on this node: it needs 9 bytes",
        ),
    ]


def test_warm_nodes_are_the_sorted_nodes_of_ready_cache_pods() -> None:
    def pod(node: str | None, ready: bool, deleting: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": f"p-{node}"}
        if deleting:
            meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
        return {
            "metadata": meta,
            "spec": {"nodeName": node} if node else {},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
        }

    pods = [pod("gpu-b", True), pod("gpu-a", True), pod("gpu-c", False), pod(None, True)]
    pods += [pod("gpu-d", True, deleting=True), pod("gpu-a", True)]
    assert warm_nodes(pods) == ["gpu-a", "gpu-b"]


# --- model_volume -------------------------------------------------------------------------------


def test_model_volume_is_the_claim_at_the_model_directory_by_default() -> None:
    volume = model_volume(make_model("huggingface"), {"nvidia.com/gpu.product": "L40S"})
    assert volume.volume == {
        "name": "model",
        "persistentVolumeClaim": {"claimName": "qwen2-5-7b-instruct", "readOnly": True},
    }
    assert volume.sub_path == "model" and not volume.node_local
    assert volume.node_selector == {"nvidia.com/gpu.product": "L40S"}
    assert volume.mount() == {
        "name": "model",
        "mountPath": "/models",
        "readOnly": True,
        "subPath": "model",
    }


def test_model_volume_of_an_adopted_claim_uses_its_sub_path() -> None:
    volume = model_volume(make_model("pvc"), volume_name="weights")
    assert volume.volume["persistentVolumeClaim"]["claimName"] == "shared-models"
    assert volume.mount("/data")["subPath"] == "qwen/7b"
    assert volume.mount("/data")["name"] == "weights"
    root = model_volume(make_model({"pvc": {"claimName": "c"}}))
    assert "subPath" not in root.mount()


def test_model_volume_uses_the_node_cache_and_pins_the_pod_to_cache_nodes() -> None:
    model = make_model("huggingface", cache=True)
    volume = model_volume(model, {"nvidia.com/gpu.product": "L40S"})
    assert volume.node_local
    assert volume.volume == {
        "name": "model",
        "hostPath": {"path": cache_host_path(model), "type": "Directory"},
    }
    assert volume.sub_path == "" and "subPath" not in volume.mount()
    assert volume.node_selector == {
        "nvidia.com/gpu.product": "L40S",
        "nvidia.com/gpu.present": "true",
    }
    unpinned = model_volume(model)
    assert unpinned.node_local and unpinned.node_selector == {"nvidia.com/gpu.present": "true"}


def test_model_volume_falls_back_to_the_claim_when_the_cache_cannot_be_guaranteed() -> None:
    model = make_model("huggingface", cache=True)
    conflicting = model_volume(model, {"nvidia.com/gpu.present": "false"})
    assert not conflicting.node_local and "persistentVolumeClaim" in conflicting.volume
    assert conflicting.node_selector == {"nvidia.com/gpu.present": "false"}
    everywhere = make_model("huggingface", nodeCache={"enabled": True})
    assert not model_volume(everywhere).node_local, "an empty selector cannot pin the pod"
    disabled = make_model("huggingface", nodeCache={"enabled": False, "nodeSelector": {"a": "b"}})
    assert not model_volume(disabled, {"a": "b"}).node_local


def _pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pods = []
    for obj in objects:
        spec = obj.get("spec") or {}
        lwt = spec.get("leaderWorkerTemplate") or {}
        for template in (
            spec.get("template"),
            lwt.get("leaderTemplate"),
            lwt.get("workerTemplate"),
        ):
            if template:
                pods.append(template["spec"])
    return pods


def test_no_rendered_pod_installs_anything_at_run_time() -> None:
    from controller.render import render_application
    from controller.render.disaggregated import render_disaggregated
    from tests.support.objects import RENDER_DEFAULTS
    from tests.unit.controller.render.test_render_application import make_app
    from tests.unit.controller.render.test_render_disaggregated import make_dapp

    objects: list[dict[str, Any]] = []
    for source in SOURCES:
        objects += render_model(make_model(source, nodeCache={"enabled": True}))
    for runtime in ("vllm", "sglang", "dynamo"):
        for size in (1, 2):
            model = make_model("huggingface")
            objects += render_application(make_app(runtime, size), model, defaults=RENDER_DEFAULTS)
            if runtime != "vllm":
                objects += render_disaggregated(
                    make_dapp(runtime, size), model, defaults=RENDER_DEFAULTS
                )
    pods = _pod_specs(objects)
    assert len(pods) > 20
    installers = ("pip ", "pip3 ", "pip install", "uv pip", "apt-get", "apk add", "yum ", "dnf ")
    for pod in pods:
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            words = " ".join([*c.get("command", []), *c.get("args", [])])
            assert not [i for i in installers if i in words], (c["name"], words)


@pytest.mark.parametrize("source", ["huggingface", "modelscope", "s3", "url"])
def test_an_image_without_the_cli_fails_the_job_at_once_and_says_why(
    tmp_path: Path, source: str
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    rendered = job(make_model(source))
    # Only the shell's own tools: no hf, modelscope, aws or curl.
    only_shell = tmp_path / "bin"
    only_shell.mkdir()
    for tool in ("sh", "cat", "mkdir", "rm", "mv", "printf", "echo"):
        found = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True)
        if found.stdout.strip().startswith("/"):
            (only_shell / tool).symlink_to(found.stdout.strip())
    result = _run(script(rendered), tmp_path, {"/models": models}, path=str(only_shell))
    assert result.returncode == NO_CLI_EXIT
    assert "this image has no" in result.stderr
    assert not (models / "model").exists()
    rules = rendered["spec"]["podFailurePolicy"]["rules"]
    assert {
        "action": "FailJob",
        "onExitCodes": {"containerName": "download", "operator": "In", "values": [NO_CLI_EXIT]},
    } in rules, "no retries: an image does not grow a CLI"


def test_the_default_download_image_is_the_arks_image_built_with_the_download_clis() -> None:
    from tests.support.paths import REPO

    kustomization = yaml.safe_load((REPO / "manifests/base/kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert DOWNLOADER_IMAGE == f"{image['name']}:{image['newTag']}"
    assert ModelDefaults().huggingface_image == ModelDefaults().modelscope_image == DOWNLOADER_IMAGE
    assert '"arks[download]"' in (REPO / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    extra = pyproject.split("download = [", 1)[1].split("]", 1)[0]
    # The packages whose console scripts are the `hf` and `modelscope` the Jobs run.
    assert '"huggingface_hub>=0.34"' in extra and '"modelscope-hub>=0.5"' in extra


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/var/lib/arks/models", True),
        ("/var/lib/arks/models/", True),
        ("/var/lib/arks/models/nvme", False),
        ("/var/lib/arks/models2", False),
        ("/etc", False),
        ("/", False),
        ("/var/lib/arks/models/../../../etc", False),
        ("/var/lib/arks/models/./x", False),
        ("var/lib/arks/models", False),
    ],
)
def test_a_tenant_cannot_point_the_privileged_cache_pods_at_any_host_directory(
    path: str, allowed: bool
) -> None:
    model = make_model("huggingface", cache=True)
    model["spec"]["nodeCache"]["path"] = path
    assert (cache_path_problem(model, ModelDefaults().cache_roots) is None) == allowed
    assert (render_cache_daemonset(model) is not None) == allowed
    assert bool(render_cache_source(model)) == allowed
    volume = model_volume(model, {})
    assert volume.node_local == allowed, "engines read the claim when there is no copy"


def test_the_operator_allows_other_cache_roots() -> None:
    model = make_model("huggingface", cache=True)
    model["spec"]["nodeCache"]["path"] = "/mnt/nvme"
    d = ModelDefaults(cache_roots=("/var/lib/arks/models", "/mnt/nvme"))
    assert cache_path_problem(model, d.cache_roots) is None
    assert render_cache_daemonset(model, d) is not None
    assert model_volume(model, {}, cache_roots=d.cache_roots).node_local


def test_a_tenant_cannot_aim_its_cache_at_another_tenants_model() -> None:
    # Namespace `b` caches model `a` at <root>/b/a. Namespace `a` naming <root>/b as its path
    # would get <root>/b/a as its cache root: its copier would write into b's model directory
    # (replacing any sub-directory named like its model) and its cleanup delete from it.
    victim = make_model("huggingface", cache=True)
    victim["metadata"] = {"name": "a", "namespace": "b"}
    attacker = make_model("huggingface", cache=True)
    attacker["metadata"] = {"name": "original", "namespace": "a"}
    attacker["spec"]["nodeCache"]["path"] = "/var/lib/arks/models/b"
    assert cache_root(attacker) == cache_host_path(victim)  # what the path would mean
    assert cache_path_problem(attacker, ModelDefaults().cache_roots) is not None
    assert render_cache_daemonset(attacker) is None
    assert not model_volume(attacker, {}).node_local


@pytest.mark.parametrize("name", ["qwen2.5-7b", "1-model", "qwen2-5-7b"])
def test_cache_source_names_are_valid_service_names(name: str) -> None:
    import re

    model = make_model("huggingface", cache=True)
    model["metadata"]["name"] = name
    names = {o["metadata"]["name"] for o in render_cache_source(model)}
    (service_name,) = names
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", service_name) and len(service_name) <= 63
    other = make_model("huggingface", cache=True)
    other["metadata"]["name"] = name.replace(".", "-")
    if other["metadata"]["name"] != name:
        assert {o["metadata"]["name"] for o in render_cache_source(other)} != names
