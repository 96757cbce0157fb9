"""ArksApplication rendering: golden files, schema validity, engine flags, autoscaling.

Regenerate the golden files with
`ARKS_UPDATE_GOLDEN=1 pytest tests/unit/controller/render/test_render_application.py` and review
the diff; see golden/SOURCES.md (next to this file) for where the engine facts come from.
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

from arks.wire import label_value
from controller.render import RenderDefaults, render_application
from controller.render.disaggregated import render_disaggregated
from controller.render.engines import UnsupportedApplication, engine_command
from tests.support.crd_schema import upstream_schema
from tests.support.objects import RENDER_DEFAULTS, downloaded_model, model_on_claim
from tests.unit.controller.render.test_render_disaggregated import make_dapp

GOLDEN = Path(__file__).parent / "golden" / "application"
K8S_VERSION = "1.33.0"

IMAGES = {
    "vllm": "vllm/vllm-openai:v0.8.5",
    "sglang": "lmsysorg/sglang:v0.4.6",
    "dynamo": "nvcr.io/nvidia/ai-dynamo/vllm-runtime:1.0.0",
}


def make_app(runtime: str, size: int, **spec: Any) -> dict[str, Any]:
    """An ArksApplication: one GPU per pod at size 1, eight GPUs per pod across nodes."""
    base: dict[str, Any] = {
        "runtime": runtime,
        "image": IMAGES[runtime],
        "model": {"name": "qwen2-5-7b-instruct"},
        "servedModelName": "qwen-7b",
        "replicas": 2,
        "size": size,
        "tensorParallelSize": 1 if size == 1 else 8,
        "pipelineParallelSize": 1 if size == 1 or runtime == "sglang" else size,
        "runtimeCommonArgs": ["--max-model-len", "8192"],
        "instanceSpec": {
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L40S"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "env": [{"name": "LOG_LEVEL", "value": "INFO"}],
            "labels": {"team": "search"},
        },
        "autoscaling": {
            "minReplicas": 1,
            "maxReplicas": 4,
            "metrics": [
                {"type": "waitingRequests", "target": 8},
                {"type": "kvCacheUsage", "target": 80},
                {"type": "timeToFirstToken", "target": 500},
            ],
        },
    }
    if runtime == "sglang" and size > 1:
        base["tensorParallelSize"] = 8 * size
    base.update(spec)
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksApplication",
        "metadata": {"name": f"qwen-7b-{runtime}-n{size}", "namespace": "llm"},
        "spec": base,
    }


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {o["kind"]: o for o in objects}
    assert len(kinds) == len(objects)
    return kinds


def pod_templates(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The engine pod templates; the engine workload is always the first object."""
    workload = objects[0]
    if workload["kind"] == "Deployment":
        return {"single": workload["spec"]["template"]}
    lwt = workload["spec"]["leaderWorkerTemplate"]
    return {"leader": lwt["leaderTemplate"], "worker": lwt["workerTemplate"]}


def engine_container(template: dict[str, Any]) -> dict[str, Any]:
    (container,) = template["spec"]["containers"]
    assert container["name"] == "engine"
    return container


CASES = [(r, s) for r in ("vllm", "sglang", "dynamo") for s in (1, 2)]


@pytest.mark.parametrize(("runtime", "size"), CASES)
def test_render_matches_golden_file(runtime: str, size: int) -> None:
    rendered = yaml.safe_dump_all(
        render_application(make_app(runtime, size), downloaded_model(), defaults=RENDER_DEFAULTS),
        sort_keys=False,
    )
    path = GOLDEN / f"{runtime}-size{size}.yaml"
    if os.environ.get("ARKS_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered)
    assert path.read_text() == rendered, f"{path} is stale; rerun with ARKS_UPDATE_GOLDEN=1"


def test_rendering_is_pure() -> None:
    app = make_app("vllm", 2)
    before = copy.deepcopy(app)
    first = render_application(app, model_on_claim("claim"), defaults=RENDER_DEFAULTS)
    assert app == before
    assert render_application(app, model_on_claim("claim"), defaults=RENDER_DEFAULTS) == first


@pytest.mark.parametrize(("runtime", "size"), CASES)
def test_core_objects_validate_strictly(runtime: str, size: int) -> None:
    for obj in render_application(
        make_app(runtime, size), model_on_claim("claim"), defaults=RENDER_DEFAULTS
    ):
        assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == "llm"
        if obj["kind"] == "LeaderWorkerSet":
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def lws_schema() -> dict[str, Any]:
    return upstream_schema("leaderworkerset.x-k8s.io_leaderworkersets.yaml", "v1")


@pytest.mark.parametrize("runtime", ["vllm", "sglang", "dynamo"])
def test_leaderworkerset_validates_against_upstream_crd(runtime: str) -> None:
    (lws,) = [
        o
        for o in render_application(
            make_app(runtime, 2), model_on_claim("claim"), defaults=RENDER_DEFAULTS
        )
        if o["kind"] == "LeaderWorkerSet"
    ]
    jsonschema.validate(lws, lws_schema())


def test_strict_lws_schema_rejects_unknown_fields() -> None:
    lws = by_kind(
        render_application(make_app("vllm", 2), model_on_claim("claim"), defaults=RENDER_DEFAULTS)
    )["LeaderWorkerSet"]
    lws["spec"]["leaderWorkerTemplate"]["sizee"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(lws, lws_schema())


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, (name, argv)
    return argv[argv.index(name) + 1]


def test_vllm_single_node_flags() -> None:
    app = make_app("vllm", 1, tensorParallelSize=2, pipelineParallelSize=2)
    argv = engine_command(app, "single")
    assert argv[:3] == ["vllm", "serve", "/models"]
    assert flag(argv, "--served-model-name") == "qwen-7b"
    assert flag(argv, "--tensor-parallel-size") == "2"
    assert flag(argv, "--pipeline-parallel-size") == "2"
    assert flag(argv, "--port") == "8000"
    assert flag(argv, "--host") == "0.0.0.0"
    assert argv[-2:] == ["--max-model-len", "8192"], "user args come last"
    container = engine_container(
        pod_templates(render_application(app, model_on_claim("c"), defaults=RENDER_DEFAULTS))[
            "single"
        ]
    )
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


def test_sglang_single_node_flags() -> None:
    argv = engine_command(make_app("sglang", 1, tensorParallelSize=4), "single")
    assert argv[:3] == ["python3", "-m", "sglang.launch_server"]
    assert flag(argv, "--model-path") == "/models"
    assert flag(argv, "--served-model-name") == "qwen-7b"
    assert flag(argv, "--tp-size") == "4"
    assert flag(argv, "--port") == "30000"
    assert flag(argv, "--host") == "0.0.0.0"
    assert "--enable-metrics" in argv
    assert "--nnodes" not in argv and "--dist-init-addr" not in argv


def test_vllm_multi_node_runs_ray_head_then_engine_and_ray_workers() -> None:
    objects = render_application(make_app("vllm", 2), model_on_claim("c"), defaults=RENDER_DEFAULTS)
    templates = pod_templates(objects)
    leader = engine_container(templates["leader"])["command"]
    worker = engine_container(templates["worker"])["command"]
    assert leader[:2] == worker[:2] == ["sh", "-c"]
    assert leader[2].startswith("ray start --head --port=6379 && exec vllm serve /models ")
    assert "--distributed-executor-backend ray" in leader[2]
    assert "--tensor-parallel-size 8 --pipeline-parallel-size 2" in leader[2]
    assert leader[2].endswith("--max-model-len 8192")
    assert "'--address=$(LWS_LEADER_ADDRESS):6379'" in worker[2]
    assert "--block" in worker[2] and worker[2].startswith("until ")
    assert by_kind(objects)["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]["size"] == 2
    for template in templates.values():
        gpus = engine_container(template)["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == "8"  # tp 8 * pp 2 / size 2


def test_sglang_multi_node_every_pod_runs_engine_with_lws_rank() -> None:
    templates = pod_templates(
        render_application(make_app("sglang", 2), model_on_claim("c"), defaults=RENDER_DEFAULTS)
    )
    for role, template in templates.items():
        argv = engine_container(template)["command"]
        assert argv[:3] == ["python3", "-m", "sglang.launch_server"], role
        assert flag(argv, "--tp-size") == "16"
        assert flag(argv, "--dist-init-addr") == "$(LWS_LEADER_ADDRESS):20000"
        assert flag(argv, "--nnodes") == "2"
        assert flag(argv, "--node-rank") == "$(LWS_WORKER_INDEX)"
        assert argv[-2:] == ["--context-length", "8192"], "SGLang's name for --max-model-len"
        assert engine_container(template)["resources"]["limits"]["nvidia.com/gpu"] == "8"


@pytest.mark.parametrize("runtime", ["vllm", "sglang"])
def test_only_the_leader_serves_http_and_is_behind_the_service(runtime: str) -> None:
    objects = render_application(
        make_app(runtime, 2), model_on_claim("c"), defaults=RENDER_DEFAULTS
    )
    templates = pod_templates(objects)
    leader, worker = engine_container(templates["leader"]), engine_container(templates["worker"])
    assert leader["ports"][0]["name"] == "http" and "readinessProbe" in leader
    assert "ports" not in worker and "readinessProbe" not in worker
    selector = by_kind(objects)["Service"]["spec"]["selector"]
    assert selector.items() <= templates["leader"]["metadata"]["labels"].items()
    assert not selector.items() <= templates["worker"]["metadata"]["labels"].items()


def test_deployment_service_selects_engine_pods() -> None:
    objects = render_application(make_app("vllm", 1), model_on_claim("c"), defaults=RENDER_DEFAULTS)
    kinds = by_kind(objects)
    pod_labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert kinds["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert kinds["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels["team"] == "search"


def test_model_claim_mounted_read_only() -> None:
    template = pod_templates(
        render_application(
            make_app("vllm", 1), model_on_claim("my-claim", "qwen"), defaults=RENDER_DEFAULTS
        )
    )["single"]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "model"]
    assert volume["persistentVolumeClaim"] == {"claimName": "my-claim", "readOnly": True}
    (mount,) = [m for m in engine_container(template)["volumeMounts"] if m["name"] == "model"]
    assert mount == {"name": "model", "mountPath": "/models", "readOnly": True, "subPath": "qwen"}


def test_explicit_gpu_resources_win() -> None:
    app = make_app("vllm", 1, tensorParallelSize=2)
    app["spec"]["instanceSpec"]["resources"] = {"limits": {"nvidia.com/gpu": 1}}
    container = engine_container(
        pod_templates(render_application(app, model_on_claim("c"), defaults=RENDER_DEFAULTS))[
            "single"
        ]
    )
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}


def test_heterogeneous_hardware_same_served_name() -> None:
    a = make_app("vllm", 1)
    b = make_app("vllm", 1)
    a["metadata"]["name"], b["metadata"]["name"] = "qwen-l40s", "qwen-h100"
    b["spec"]["instanceSpec"]["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-H100"}
    ra, rb = (
        render_application(a, model_on_claim("c"), defaults=RENDER_DEFAULTS),
        render_application(b, model_on_claim("c"), defaults=RENDER_DEFAULTS),
    )
    names_a = {(o["kind"], o["metadata"]["name"]) for o in ra}
    names_b = {(o["kind"], o["metadata"]["name"]) for o in rb}
    assert not names_a & names_b
    for objects, product in ((ra, "NVIDIA-L40S"), (rb, "NVIDIA-H100")):
        template = pod_templates(objects)["single"]
        assert template["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": product}
        assert template["metadata"]["labels"]["arks.ai/served-model-name"] == "qwen-7b"
        assert all(
            o["metadata"]["labels"]["arks.ai/served-model-name"] == "qwen-7b" for o in objects
        )
    sel_a = by_kind(ra)["Service"]["spec"]["selector"]
    assert not sel_a.items() <= pod_templates(rb)["single"]["metadata"]["labels"].items()


def test_served_name_label_is_valid_for_hub_style_names() -> None:
    app = make_app("vllm", 1, servedModelName="meta-llama/Llama-3.1-8B-Instruct")
    for obj in render_application(app, model_on_claim("c"), defaults=RENDER_DEFAULTS):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"]["annotations"]["arks.ai/served-model-name"] == (
            "meta-llama/Llama-3.1-8B-Instruct"
        )
    assert label_value("meta-llama/Llama-3.1-8B-Instruct") != label_value(
        "meta-llama-Llama-3.1-8B-Instruct"
    )
    assert label_value("qwen-7b") == "qwen-7b"


@pytest.mark.parametrize(
    ("runtime", "waiting", "kv", "ttft"),
    [
        # The fixture pins vllm/vllm-openai:v0.8.5: vLLM before 0.11 names the KV-cache gauge
        # gpu_cache_usage_perc (kv_cache_usage_perc does not exist in 0.8.5).
        (
            "vllm",
            "arks_vllm_num_requests_waiting",
            "arks_vllm_gpu_cache_usage_perc",
            "arks_vllm_time_to_first_token_seconds_p90",
        ),
        (
            "sglang",
            "arks_sglang_num_queue_reqs",
            "arks_sglang_token_usage",
            "arks_sglang_time_to_first_token_seconds_p90",
        ),
    ],
)
def test_hpa_metrics_per_type(runtime: str, waiting: str, kv: str, ttft: str) -> None:
    for size, kind in ((1, "Deployment"), (2, "LeaderWorkerSet")):
        objects = render_application(
            make_app(runtime, size), model_on_claim("c"), defaults=RENDER_DEFAULTS
        )
        kinds = by_kind(objects)
        hpa = kinds["HorizontalPodAutoscaler"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == (kind, kinds[kind]["metadata"]["name"])
        assert ref["apiVersion"] == kinds[kind]["apiVersion"]
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
        assert "replicas" not in kinds[kind]["spec"], "the HPA owns replicas"
        pods, kv_metric, ttft_metric = hpa["spec"]["metrics"]
        assert pods["pods"]["metric"]["name"] == waiting
        assert pods["pods"]["target"] == {"type": "AverageValue", "averageValue": "8"}
        assert kv_metric["pods"]["metric"]["name"] == kv
        assert kv_metric["pods"]["target"]["averageValue"] == "800m"  # 80 % of a 0..1 gauge
        assert ttft_metric["pods"]["metric"]["name"] == ttft
        assert ttft_metric["pods"]["target"]["averageValue"] == "500m"  # 500 ms in seconds


def test_no_autoscaling_means_fixed_replicas_and_no_hpa() -> None:
    app = make_app("sglang", 2)
    del app["spec"]["autoscaling"]
    kinds = by_kind(render_application(app, model_on_claim("c"), defaults=RENDER_DEFAULTS))
    assert "HorizontalPodAutoscaler" not in kinds
    assert kinds["LeaderWorkerSet"]["spec"]["replicas"] == 2


@pytest.mark.parametrize(
    "spec",
    [
        {"runtime": "nonesuch"},
        {"tensorParallelSize": 3, "size": 2},
        {"runtime": "sglang", "image": "x", "pipelineParallelSize": 2},
    ],
)
def test_unsupported_specs_are_permanent_errors(spec: dict[str, Any]) -> None:
    app = make_app("vllm", 1)
    app["spec"].update(spec)
    with pytest.raises(UnsupportedApplication):
        render_application(app, model_on_claim("c"), defaults=RENDER_DEFAULTS)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    entries = container.get("env") or []
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in entries}


def dynamo_parts(
    objects: list[dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(worker workload, frontend Deployment, Service) of a rendered dynamo application."""
    workload, frontend, svc = objects[:3]
    assert frontend["kind"] == "Deployment" and frontend["metadata"]["name"].endswith("-frontend")
    assert svc["kind"] == "Service"
    return workload, frontend, svc


def test_dynamo_worker_runs_the_vllm_backend_registered_in_dynamo_discovery() -> None:
    app = make_app("dynamo", 1, tensorParallelSize=2)
    objects = render_application(app, model_on_claim("c"), defaults=RENDER_DEFAULTS)
    workload, _, _ = dynamo_parts(objects)
    assert (workload["kind"], workload["metadata"]["name"]) == ("Deployment", "qwen-7b-dynamo-n1")
    container = engine_container(workload["spec"]["template"])
    argv = container["command"]
    assert argv[:3] == ["python3", "-m", "dynamo.vllm"]
    assert flag(argv, "--model") == "/models"
    assert flag(argv, "--served-model-name") == "qwen-7b"
    assert flag(argv, "--tensor-parallel-size") == "2"
    assert "--port" not in argv and "--host" not in argv, "workers serve no HTTP API"
    assert argv[-2:] == ["--max-model-len", "8192"]
    env = env_of(container)
    assert env["DYN_NAMESPACE"] == "llm-qwen-7b-dynamo-n1"
    assert env["ETCD_ENDPOINTS"] == "http://dynamo-platform-etcd.dynamo-system:2379"
    assert env["NATS_SERVER"] == "nats://dynamo-platform-nats.dynamo-system:4222"
    assert env["DYN_SYSTEM_PORT"] == "9090"
    assert env["LOG_LEVEL"] == "INFO", "the user's env is kept"
    assert container["ports"] == [{"name": "system", "containerPort": 9090, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "system"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/live", "port": "system"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_dynamo_frontend_serves_the_api_behind_the_service() -> None:
    objects = render_application(
        make_app("dynamo", 1), model_on_claim("c"), defaults=RENDER_DEFAULTS
    )
    workload, frontend, svc = dynamo_parts(objects)
    (container,) = frontend["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python3", "-m", "dynamo.frontend", "--http-port", "8000"]
    assert container["image"] == IMAGES["dynamo"]
    assert "nvidia.com/gpu" not in str(container.get("resources")), "the frontend needs no GPU"
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/live", "port": "http"}
    worker_env = env_of(engine_container(workload["spec"]["template"]))
    assert env_of(container)["DYN_NAMESPACE"] == worker_env["DYN_NAMESPACE"]
    # The frontend tokenizes with the files the workers registered from /models.
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]

    frontend_pods = frontend["spec"]["template"]["metadata"]["labels"]
    worker_pods = workload["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= frontend_pods.items()
    assert not svc["spec"]["selector"].items() <= worker_pods.items()
    assert svc["spec"]["ports"][0]["port"] == 8000
    # Two Deployments of one application must not select each other's pods.
    assert not frontend["spec"]["selector"]["matchLabels"].items() <= worker_pods.items()
    assert not workload["spec"]["selector"]["matchLabels"].items() <= frontend_pods.items()


def test_dynamo_multi_node_workers_form_a_ray_cluster_under_the_leader() -> None:
    objects = render_application(
        make_app("dynamo", 2), model_on_claim("c"), defaults=RENDER_DEFAULTS
    )
    workload, frontend, svc = dynamo_parts(objects)
    assert workload["kind"] == "LeaderWorkerSet"
    templates = pod_templates(objects)
    leader = engine_container(templates["leader"])
    worker = engine_container(templates["worker"])
    assert leader["command"][2].startswith(
        "ray start --head --port=6379 && exec python3 -m dynamo.vllm "
    )
    assert "--distributed-executor-backend ray" in leader["command"][2]
    assert "'--address=$(LWS_LEADER_ADDRESS):6379'" in worker["command"][2]
    assert "readinessProbe" in leader and "readinessProbe" not in worker
    assert (
        svc["spec"]["selector"].items()
        <= frontend["spec"]["template"]["metadata"]["labels"].items()
    )


def test_dynamo_autoscaling_scales_the_workers_on_vllm_metrics() -> None:
    objects = render_application(
        make_app("dynamo", 1), model_on_claim("c"), defaults=RENDER_DEFAULTS
    )
    (hpa,) = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == objects[0]["metadata"]["name"]
    # Dynamo's tag is its own release, not its vLLM's: the current vLLM names.
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "arks_vllm_num_requests_waiting"
    assert hpa["spec"]["metrics"][1]["pods"]["metric"]["name"] == "arks_vllm_kv_cache_usage_perc"
    assert "replicas" not in objects[0]["spec"]
    assert objects[1]["spec"]["replicas"] == 1, "the frontend keeps its own count"


def test_dynamo_endpoints_come_from_render_defaults_and_user_env_wins() -> None:
    app = make_app("dynamo", 1)
    app["spec"]["instanceSpec"]["env"].append(
        {"name": "ETCD_ENDPOINTS", "value": "http://mine:2379"}
    )
    defaults = RenderDefaults(dynamo_etcd_endpoints="http://etcd.infra:2379", dynamo_nats_server="")
    workload, frontend, _ = dynamo_parts(
        render_application(app, model_on_claim("c"), defaults=defaults)
    )
    worker_env = env_of(engine_container(workload["spec"]["template"]))
    assert worker_env["ETCD_ENDPOINTS"] == "http://mine:2379"
    assert "NATS_SERVER" not in worker_env
    (container,) = frontend["spec"]["template"]["spec"]["containers"]
    assert env_of(container)["ETCD_ENDPOINTS"] == "http://etcd.infra:2379"


def test_engines_read_the_node_local_copy_and_run_on_the_cache_nodes() -> None:
    cache = {
        "enabled": True,
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "path": "/var/lib/arks/models",
    }
    model = downloaded_model(nodeCache=cache)
    app = make_app("vllm", 2)
    for template in pod_templates(
        render_application(app, model, defaults=RENDER_DEFAULTS)
    ).values():
        (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "model"]
        assert volume["hostPath"] == {
            "path": "/var/lib/arks/models/default/qwen2-5-7b-instruct",
            "type": "Directory",
        }
        assert template["spec"]["nodeSelector"] == {
            **app["spec"]["instanceSpec"]["nodeSelector"],
            "nvidia.com/gpu.present": "true",
        }
        (mount,) = [m for m in engine_container(template)["volumeMounts"] if m["name"] == "model"]
        assert mount == {"name": "model", "mountPath": "/models", "readOnly": True}


def test_a_cache_on_other_nodes_than_the_engines_leaves_them_on_the_claim() -> None:
    cache = {"enabled": True, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100"}}
    app = make_app("vllm", 1)
    app["spec"]["instanceSpec"]["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-L40S"}
    template = pod_templates(
        render_application(app, downloaded_model(nodeCache=cache), defaults=RENDER_DEFAULTS)
    )["single"]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "model"]
    assert volume["persistentVolumeClaim"]["claimName"] == "qwen2-5-7b-instruct"
    assert template["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L40S"}


def test_the_dynamo_frontend_reads_the_claim_even_with_a_node_cache() -> None:
    cache = {"enabled": True, "nodeSelector": {"nvidia.com/gpu.present": "true"}}
    _, frontend, _ = dynamo_parts(
        render_application(
            make_app("dynamo", 1), downloaded_model(nodeCache=cache), defaults=RENDER_DEFAULTS
        )
    )
    (volume,) = frontend["spec"]["template"]["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == "qwen2-5-7b-instruct"
    assert "nvidia.com/gpu.present" not in (
        frontend["spec"]["template"]["spec"].get("nodeSelector") or {}
    )


def test_dynamo_without_the_platform_addresses_is_refused_with_what_to_set() -> None:
    for render in (
        lambda: render_application(make_app("dynamo", 1), model_on_claim("c")),
        lambda: render_disaggregated(make_dapp("dynamo", 1), model_on_claim("c")),
    ):
        with pytest.raises(UnsupportedApplication, match="--dynamo-etcd-endpoints"):
            render()
    # Other runtimes need nothing of it.
    render_application(make_app("vllm", 1), model_on_claim("c"))


@pytest.mark.parametrize("name", ["qwen2.5-7b", "a" * 64, "7b-qwen", "qwen-"])
def test_a_name_that_cannot_name_a_service_is_refused_in_the_status(name: str) -> None:
    # The API server refuses such a Service (and a label value over 63 characters): without
    # this every apply would fail, and the status would not say why.
    app = make_app("vllm", 1)
    app["metadata"]["name"] = name
    with pytest.raises(UnsupportedApplication, match="DNS-1035"):
        render_application(app, downloaded_model(), defaults=RENDER_DEFAULTS)
    app["metadata"]["name"] = "a" * 63
    objects = render_application(app, downloaded_model(), defaults=RENDER_DEFAULTS)
    assert by_kind(objects)["Service"]["metadata"]["name"] == "a" * 63
