"""ArksDisaggregatedApplication rendering: golden files, schema validity, PD flags, router, RBAC.

Regenerate the golden files with
`ARKS_UPDATE_GOLDEN=1 pytest tests/unit/controller/render/test_render_disaggregated.py` and review
the diff; see golden/SOURCES.md (next to this file) for where the engine and router facts come from.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from controller.render.disaggregated import render_disaggregated
from controller.render.engines import UnsupportedApplication
from tests.support.crd_schema import upstream_schema
from tests.support.objects import RENDER_DEFAULTS, downloaded_model, model_on_claim
from tests.support.paths import REPO

GOLDEN = Path(__file__).parent / "golden" / "disaggregated"
K8S_VERSION = "1.33.0"
NS = "llm"

IMAGES = {
    "sglang": "lmsysorg/sglang:v0.4.6",
    "dynamo": "nvcr.io/nvidia/ai-dynamo/vllm-runtime:1.0.0",
}
ROUTER_ARGS = {"sglang": ["--policy", "cache_aware"], "dynamo": ["--router-mode", "kv"]}


def group(runtime: str, size: int, **extra: Any) -> dict[str, Any]:
    """One GPU per pod at size 1; eight GPUs per pod across nodes."""
    spec: dict[str, Any] = {
        "replicas": 1,
        "size": size,
        "tensorParallelSize": 1 if size == 1 else 8 * size,
        "instanceSpec": {
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100"},
            "env": [{"name": "LOG_LEVEL", "value": "INFO"}],
        },
    }
    if runtime == "dynamo" and size > 1:
        spec.update(tensorParallelSize=8, pipelineParallelSize=size)
    spec.update(extra)
    return spec


def make_dapp(runtime: str, size: int, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "runtime": runtime,
        "image": IMAGES[runtime],
        "model": {"name": "deepseek-v3"},
        "servedModelName": "deepseek-v3",
        "router": {
            "replicas": 2,
            "args": ROUTER_ARGS[runtime],
            "instanceSpec": {"resources": {"requests": {"cpu": "2", "memory": "4Gi"}}},
        },
        "prefill": group(runtime, size, runtimeCommonArgs=["--max-model-len", "8192"]),
        "decode": group(runtime, size, replicas=2),
    }
    if runtime == "sglang":
        base["prefill"]["runtimeCommonArgs"] += ["--disaggregation-transfer-backend", "nixl"]
    base.update(spec)
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksDisaggregatedApplication",
        "metadata": {"name": f"ds-{runtime}-n{size}", "namespace": NS},
        "spec": base,
    }


def named(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    result = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(result) == len(objects)
    return result


def workload(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (found,) = [
        o
        for o in objects
        if o["kind"] in ("Deployment", "LeaderWorkerSet")
        and o["metadata"]["labels"]["arks.ai/component"] == component
    ]
    return found


def templates(w: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if w["kind"] == "Deployment":
        return {"single": w["spec"]["template"]}
    lwt = w["spec"]["leaderWorkerTemplate"]
    return {"leader": lwt["leaderTemplate"], "worker": lwt["workerTemplate"]}


def container(template: dict[str, Any]) -> dict[str, Any]:
    (only,) = template["spec"]["containers"]
    return dict(only)


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, (name, argv)
    return argv[argv.index(name) + 1]


def selector_after(argv: list[str], name: str) -> dict[str, str]:
    """The `key=value` words after `name`, up to the next flag."""
    words = argv[argv.index(name) + 1 :]
    pairs = []
    for word in words:
        if word.startswith("--"):
            break
        pairs.append(word.split("=", 1))
    return dict(pairs)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    entries = c.get("env") or []
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), names
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in entries}


CASES = [(r, s) for r in ("sglang", "dynamo") for s in (1, 2)]


@pytest.mark.parametrize(("runtime", "size"), CASES)
def test_render_matches_golden_file(runtime: str, size: int) -> None:
    rendered = yaml.safe_dump_all(
        render_disaggregated(
            make_dapp(runtime, size), downloaded_model("deepseek-v3"), defaults=RENDER_DEFAULTS
        ),
        sort_keys=False,
    )
    path = GOLDEN / f"{runtime}-size{size}.yaml"
    if os.environ.get("ARKS_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered)
    assert path.read_text() == rendered, f"{path} is stale; rerun with ARKS_UPDATE_GOLDEN=1"


@pytest.mark.parametrize(("runtime", "size"), CASES)
def test_every_object_validates_strictly(runtime: str, size: int) -> None:
    lws_schema = upstream_schema("leaderworkerset.x-k8s.io_leaderworkersets.yaml", "v1")
    objects = render_disaggregated(
        make_dapp(runtime, size), model_on_claim("claim"), defaults=RENDER_DEFAULTS
    )
    for obj in objects:
        assert obj["metadata"]["namespace"] == NS
        if obj["kind"] == "LeaderWorkerSet":
            jsonschema.validate(obj, lws_schema)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    kinds = sorted(o["kind"] for o in objects)
    workload_kind = "Deployment" if size == 1 else "LeaderWorkerSet"
    expected = ["Deployment", workload_kind, workload_kind, "Service"]
    if runtime == "sglang":
        expected += ["Role", "RoleBinding", "ServiceAccount"]
    assert kinds == sorted(expected)


def test_rendering_is_pure() -> None:
    dapp = make_dapp("sglang", 2)
    before = copy.deepcopy(dapp)
    first = render_disaggregated(dapp, model_on_claim("claim"), defaults=RENDER_DEFAULTS)
    assert dapp == before
    assert render_disaggregated(dapp, model_on_claim("claim"), defaults=RENDER_DEFAULTS) == first


def test_the_sample_manifest_renders() -> None:
    sample = yaml.safe_load(
        (REPO / "manifests/samples/arksdisaggregatedapplication.yaml").read_text()
    )
    objects = named(render_disaggregated(sample, model_on_claim("claim"), defaults=RENDER_DEFAULTS))
    assert ("LeaderWorkerSet", "deepseek-v3-pd-prefill") in objects
    assert ("LeaderWorkerSet", "deepseek-v3-pd-decode") in objects
    assert ("Service", "deepseek-v3-pd") in objects


@pytest.mark.parametrize("size", [1, 2])
def test_sglang_groups_run_in_their_disaggregation_mode(size: int) -> None:
    objects = render_disaggregated(
        make_dapp("sglang", size), model_on_claim("c"), defaults=RENDER_DEFAULTS
    )
    for mode in ("prefill", "decode"):
        w = workload(objects, mode)
        assert w["metadata"]["name"] == f"ds-sglang-n{size}-{mode}"
        for role, template in templates(w).items():
            argv = container(template)["command"]
            assert argv[:3] == ["python3", "-m", "sglang.launch_server"], role
            assert flag(argv, "--disaggregation-mode") == mode
            assert flag(argv, "--model-path") == "/models"
            if size > 1:
                assert flag(argv, "--nnodes") == str(size)
                assert flag(argv, "--node-rank") == "$(LWS_WORKER_INDEX)"
                assert flag(argv, "--tp-size") == str(8 * size)
            if mode == "prefill":
                assert flag(argv, "--disaggregation-bootstrap-port") == "8998"
            else:
                assert "--disaggregation-bootstrap-port" not in argv
            # The prefill args' transfer backend is the pair's: decode must use it too.
            assert flag(argv, "--disaggregation-transfer-backend") == "nixl"


@pytest.mark.parametrize("size", [1, 2])
def test_prefill_serving_pods_announce_their_bootstrap_port(size: int) -> None:
    objects = render_disaggregated(
        make_dapp("sglang", size), model_on_claim("c"), defaults=RENDER_DEFAULTS
    )
    serving = "single" if size == 1 else "leader"
    prefill = templates(workload(objects, "prefill"))
    annotations = prefill[serving]["metadata"].get("annotations") or {}
    assert annotations["sglang.ai/bootstrap-port"] == "8998"
    ports = {p["name"]: p["containerPort"] for p in container(prefill[serving])["ports"]}
    assert ports == {"http": 30000, "bootstrap": 8998}
    if size > 1:
        assert "annotations" not in prefill["worker"]["metadata"]
    decode = templates(workload(objects, "decode"))[serving]
    assert "sglang.ai/bootstrap-port" not in (decode["metadata"].get("annotations") or {})


@pytest.mark.parametrize("size", [1, 2])
def test_sglang_router_discovers_exactly_the_serving_pods(size: int) -> None:
    objects = render_disaggregated(
        make_dapp("sglang", size), model_on_claim("c"), defaults=RENDER_DEFAULTS
    )
    router = workload(objects, "router")
    assert router["metadata"]["name"] == f"ds-sglang-n{size}-router"
    assert router["spec"]["replicas"] == 2
    c = container(router["spec"]["template"])
    argv = c["command"]
    assert argv[:3] == ["python3", "-m", "sglang_router.launch_router"]
    assert "--pd-disaggregation" in argv and "--service-discovery" in argv
    assert flag(argv, "--service-discovery-namespace") == NS
    assert flag(argv, "--service-discovery-port") == "30000"
    # sglang-router has no flag for it: it reads the sglang.ai/bootstrap-port annotation.
    assert "--bootstrap-port-annotation" not in argv
    assert flag(argv, "--port") == "30000" and flag(argv, "--host") == "0.0.0.0"
    assert argv[-2:] == ["--policy", "cache_aware"], "the user's router args come last"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readiness"
    assert c["livenessProbe"]["httpGet"]["path"] == "/liveness"
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}}, "no GPU"

    for mode, other in (("prefill", "decode"), ("decode", "prefill")):
        selector = selector_after(argv, f"--{mode}-selector")
        for role, template in templates(workload(objects, mode)).items():
            labels = template["metadata"]["labels"]
            assert (selector.items() <= labels.items()) == (role != "worker"), (mode, role)
            port = container(template).get("ports", [{}])[0].get("containerPort")
            assert role == "worker" or port == 30000
        for template in templates(workload(objects, other)).values():
            assert not selector.items() <= template["metadata"]["labels"].items()


def test_sglang_router_may_watch_pods_of_its_namespace_only() -> None:
    objects = named(
        render_disaggregated(make_dapp("sglang", 1), model_on_claim("c"), defaults=RENDER_DEFAULTS)
    )
    router_pod = objects[("Deployment", "ds-sglang-n1-router")]["spec"]["template"]["spec"]
    account = objects[("ServiceAccount", "ds-sglang-n1-router")]
    role = objects[("Role", "ds-sglang-n1-router")]
    binding = objects[("RoleBinding", "ds-sglang-n1-router")]
    assert router_pod["serviceAccountName"] == account["metadata"]["name"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "ds-sglang-n1-router",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ds-sglang-n1-router", "namespace": NS}
    ]


def test_a_router_service_account_of_the_users_own_is_bound_not_created() -> None:
    dapp = make_dapp("sglang", 1)
    dapp["spec"]["router"]["instanceSpec"]["serviceAccountName"] = "routers"
    objects = named(render_disaggregated(dapp, model_on_claim("c"), defaults=RENDER_DEFAULTS))
    assert not [k for k in objects if k[0] == "ServiceAccount"]
    binding = objects[("RoleBinding", "ds-sglang-n1-router")]
    assert binding["subjects"][0]["name"] == "routers"
    router_pod = objects[("Deployment", "ds-sglang-n1-router")]["spec"]["template"]["spec"]
    assert router_pod["serviceAccountName"] == "routers"


@pytest.mark.parametrize(("runtime", "port"), [("sglang", 30000), ("dynamo", 8000)])
def test_the_public_service_is_the_router(runtime: str, port: int) -> None:
    objects = render_disaggregated(
        make_dapp(runtime, 1), model_on_claim("c"), defaults=RENDER_DEFAULTS
    )
    svc = named(objects)[("Service", f"ds-{runtime}-n1")]
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}
    ]
    selector = svc["spec"]["selector"].items()
    assert selector <= workload(objects, "router")["spec"]["template"]["metadata"]["labels"].items()
    for mode in ("prefill", "decode"):
        for template in templates(workload(objects, mode)).values():
            assert not selector <= template["metadata"]["labels"].items()


@pytest.mark.parametrize("size", [1, 2])
def test_dynamo_prefill_and_decode_workers_pair_through_the_frontend(size: int) -> None:
    objects = render_disaggregated(
        make_dapp("dynamo", size), model_on_claim("c"), defaults=RENDER_DEFAULTS
    )
    assert not [o for o in objects if o["kind"] in ("Role", "RoleBinding", "ServiceAccount")]
    router = container(workload(objects, "router")["spec"]["template"])
    assert router["command"] == [
        "python3",
        "-m",
        "dynamo.frontend",
        "--http-port",
        "8000",
        "--router-mode",
        "kv",
    ]
    namespace = env_of(router)["DYN_NAMESPACE"]
    assert namespace == f"{NS}-ds-dynamo-n{size}"
    for mode in ("prefill", "decode"):
        for role, template in templates(workload(objects, mode)).items():
            c = container(template)
            env = env_of(c)
            assert env["DYN_NAMESPACE"] == namespace
            assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
            if role == "worker":
                assert "ray start '--address=$(LWS_LEADER_ADDRESS):6379' --block" in c["command"][2]
                continue
            engine = c["command"] if size == 1 else c["command"][2].split()
            assert "dynamo.vllm" in engine
            assert flag(engine, "--disaggregation-mode") == mode
            assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "system"}


@pytest.mark.parametrize(
    "spec",
    [
        {"runtime": "vllm"},
        {"prefill": {"size": 2, "tensorParallelSize": 3}},
        {"decode": {"pipelineParallelSize": 2}},  # SGLang has no pipeline flag in our table
    ],
)
def test_unsupported_specs_are_permanent_errors(spec: dict[str, Any]) -> None:
    dapp = make_dapp("sglang", 1)
    dapp["spec"].update(spec)
    with pytest.raises(UnsupportedApplication):
        render_disaggregated(dapp, model_on_claim("c"), defaults=RENDER_DEFAULTS)


def test_the_crd_default_runtime_is_sglang() -> None:
    dapp = make_dapp("sglang", 1)
    del dapp["spec"]["runtime"]
    objects = render_disaggregated(dapp, model_on_claim("c"), defaults=RENDER_DEFAULTS)
    argv = container(templates(workload(objects, "decode"))["single"])["command"]
    assert argv[:3] == ["python3", "-m", "sglang.launch_server"]


RDMA_INSTANCE: dict[str, Any] = {
    "resources": {"limits": {"nvidia.com/gpu": "8", "rdma/hca_shared_devices_a": "1"}},
    "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
    "podSecurityContext": {"runAsUser": 0, "fsGroup": 1000},
    "hostNetwork": True,
    "hostIPC": True,
    "runtimeClassName": "nvidia",
    "priorityClassName": "llm-serving",
    "schedulerName": "volcano",
    "imagePullSecrets": [{"name": "registry"}],
    "tolerations": [{"key": "rdma", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "rdma", "operator": "In", "values": ["yes"]}]}
                ]
            }
        }
    },
}


@pytest.mark.parametrize("size", [1, 2])
def test_instance_spec_carries_what_rdma_needs_into_every_engine_pod(size: int) -> None:
    dapp = make_dapp("sglang", size)
    for mode in ("prefill", "decode"):
        dapp["spec"][mode]["instanceSpec"] = copy.deepcopy(RDMA_INSTANCE)
        dapp["spec"][mode]["runtimeCommonArgs"] = ["--disaggregation-ib-device", "mlx5_0"]
    objects = render_disaggregated(dapp, model_on_claim("c"), defaults=RENDER_DEFAULTS)
    lws_schema = upstream_schema("leaderworkerset.x-k8s.io_leaderworkersets.yaml", "v1")
    for mode in ("prefill", "decode"):
        w = workload(objects, mode)
        if w["kind"] == "LeaderWorkerSet":
            jsonschema.validate(w, lws_schema)
        else:
            kubernetes_validate.validate(w, K8S_VERSION, strict=True)
        for role, template in templates(w).items():
            pod = template["spec"]
            for key in (
                "hostIPC",
                "runtimeClassName",
                "priorityClassName",
                "schedulerName",
                "imagePullSecrets",
                "tolerations",
                "affinity",
            ):
                assert pod[key] == RDMA_INSTANCE[key], (mode, role, key)
            assert pod["hostNetwork"] is True
            assert pod["dnsPolicy"] == "ClusterFirstWithHostNet", "cluster DNS on the host network"
            assert pod["securityContext"] == RDMA_INSTANCE["podSecurityContext"]
            c = container(template)
            assert c["securityContext"] == {"capabilities": {"add": ["IPC_LOCK"]}}
            assert c["resources"]["limits"] == RDMA_INSTANCE["resources"]["limits"]
            if role != "worker" or "ray" not in c["command"][-1]:
                assert flag(c["command"], "--disaggregation-ib-device") == "mlx5_0"
    # The router's instanceSpec is its own: the engines' RDMA setup does not leak into it.
    router_pod = workload(objects, "router")["spec"]["template"]["spec"]
    assert "hostNetwork" not in router_pod and "securityContext" not in router_pod


def test_the_router_takes_the_same_pass_through_fields() -> None:
    dapp = make_dapp("sglang", 1)
    dapp["spec"]["router"]["instanceSpec"].update(
        priorityClassName="system-cluster-critical",
        imagePullSecrets=[{"name": "registry"}],
        securityContext={"runAsNonRoot": True},
    )
    router = workload(
        render_disaggregated(dapp, model_on_claim("c"), defaults=RENDER_DEFAULTS), "router"
    )
    kubernetes_validate.validate(router, K8S_VERSION, strict=True)
    pod = router["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert container(router["spec"]["template"])["securityContext"] == {"runAsNonRoot": True}


def test_a_name_that_cannot_name_a_service_is_refused() -> None:
    dapp = make_dapp("sglang", 1)
    dapp["metadata"]["name"] = "qwen2.5-pd"
    with pytest.raises(UnsupportedApplication, match="DNS-1035"):
        render_disaggregated(dapp, downloaded_model(), defaults=RENDER_DEFAULTS)
