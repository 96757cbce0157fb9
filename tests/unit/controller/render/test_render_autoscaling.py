"""The autoscaler an ArksApplication renders: HPA or KEDA ScaledObject, per engine and release.

Whether the names and queries find the engines' series is tested against a real Prometheus in
tests/integration/test_autoscaling_metrics.py; here: shapes, schemas, choices.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from arks.engine_series import ADAPTER_QUANTILES, SERIES, adapter_metric, generation
from controller.render import RenderDefaults, render_application
from controller.render.autoscaling import DEFAULT_SCALE_DOWN, engine_series
from controller.render.engines import UnsupportedApplication
from tests.support.crd_schema import upstream_schema
from tests.support.objects import RENDER_DEFAULTS, model_on_claim
from tests.support.paths import REPO

K8S_VERSION = "1.33.0"
TYPES = ("waitingRequests", "kvCacheUsage", "timeToFirstToken", "timePerOutputToken", "cpu")
IMAGES = {
    "vllm": "vllm/vllm-openai:v0.8.5",
    "sglang": "lmsysorg/sglang:v0.4.6",
    "dynamo": "nvcr.io/nvidia/ai-dynamo/vllm-runtime:1.0.0",
}
TARGETS = {
    "waitingRequests": 5,
    "kvCacheUsage": 80,
    "timeToFirstToken": 500,
    "timePerOutputToken": 50,
    "cpu": 70,
}


def app(runtime: str, provider: str, *types: str, size: int = 1, **scaling: Any) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksApplication",
        "metadata": {"name": "chat", "namespace": "llm"},
        "spec": {
            "runtime": runtime,
            "image": IMAGES[runtime],
            "model": {"name": "qwen"},
            "size": size,
            "tensorParallelSize": size,
            "instanceSpec": {"resources": {"requests": {"cpu": "8"}}},
            "autoscaling": {
                "provider": provider,
                "minReplicas": 1,
                "maxReplicas": 4,
                "metrics": [{"type": t, "target": TARGETS[t]} for t in types],
                **scaling,
            },
        },
    }


def autoscaler_of(obj: dict[str, Any], defaults: RenderDefaults | None = None) -> dict[str, Any]:
    rendered = render_application(obj, model_on_claim("c"), defaults=defaults or RENDER_DEFAULTS)
    (found,) = [o for o in rendered if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    return found


def valid(obj: dict[str, Any]) -> None:
    if obj["kind"] == "ScaledObject":
        schema = upstream_schema("keda.sh_scaledobjects.yaml", "v1alpha1")
        jsonschema.validate(obj, schema)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("provider", ["hpa", "keda"])
@pytest.mark.parametrize("runtime", ["vllm", "sglang", "dynamo"])
@pytest.mark.parametrize("size", [1, 2])
def test_every_metric_type_renders_a_valid_autoscaler(
    runtime: str, provider: str, size: int
) -> None:
    obj = autoscaler_of(app(runtime, provider, *TYPES, size=size))
    valid(obj)
    workload = render_application(
        app(runtime, provider, *TYPES, size=size), model_on_claim("c"), defaults=RENDER_DEFAULTS
    )[0]
    spec = obj["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": workload["apiVersion"],
        "kind": workload["kind"],
        "name": workload["metadata"]["name"],
    }
    metrics = spec["metrics"] if provider == "hpa" else spec["triggers"]
    assert len(metrics) == len(TYPES)
    assert obj["metadata"]["labels"]["arks.ai/application"] == "chat"


@pytest.mark.parametrize("runtime", ["vllm", "sglang", "dynamo"])
def test_hpa_asks_prometheus_adapter_for_the_engines_own_series(runtime: str) -> None:
    series = SERIES[generation(runtime, IMAGES[runtime])]
    hpa = autoscaler_of(app(runtime, "hpa", *TYPES))
    waiting, kv, ttft, tpot, cpu = hpa["spec"]["metrics"]
    names = [m["pods"]["metric"]["name"] for m in (waiting, kv, ttft, tpot)]
    assert names == [
        adapter_metric(series.waiting),
        adapter_metric(series.kv_cache),
        adapter_metric(series.ttft, 90),
        adapter_metric(series.tpot, 90),
    ]
    assert all(":" not in n and n.startswith("arks_") for n in names)
    targets = [m["pods"]["target"] for m in (waiting, kv, ttft, tpot)]
    assert targets == [
        {"type": "AverageValue", "averageValue": "5"},
        {"type": "AverageValue", "averageValue": "800m"},  # 80 % of the 0..1 gauge
        {"type": "AverageValue", "averageValue": "500m"},  # 500 ms, in seconds
        {"type": "AverageValue", "averageValue": "50m"},
    ]
    assert cpu["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}


@pytest.mark.parametrize(
    ("runtime", "image", "version", "kv", "tpot"),
    [
        # vLLM before 0.11: the names v0.8.5 (the sample's image) exports.
        ("vllm", "vllm/vllm-openai:v0.8.5", "", "gpu_cache_usage_perc", "time_per_output_token"),
        ("vllm", "vllm/vllm-openai:v0.10.1.1", "", "gpu_cache_usage_perc", "time_per_output"),
        ("vllm", "registry.local:5000/vllm-openai:0.9.2", "", "gpu_cache_usage", "time_per_output"),
        # 0.11 on: the old names are hidden (KV cache) or deprecated (TPOT), then removed.
        ("vllm", "vllm/vllm-openai:v0.11.0", "", "kv_cache_usage_perc", "inter_token_latency"),
        ("vllm", "vllm/vllm-openai:v0.12.0-cu129", "", "kv_cache_usage", "inter_token_latency"),
        # A tag that says nothing: the current names, unless engineVersion says otherwise.
        ("vllm", "vllm/vllm-openai:latest", "", "kv_cache_usage_perc", "inter_token_latency"),
        ("vllm", "vllm/vllm-openai", "", "kv_cache_usage_perc", "inter_token_latency"),
        ("vllm", "vllm/vllm-openai@sha256:" + "a" * 64, "", "kv_cache_usage", "inter_token"),
        ("vllm", "mirror.corp/llm/serve:prod", "0.8.5", "gpu_cache_usage_perc", "time_per_out"),
        ("vllm", "vllm/vllm-openai:v0.8.5", "v0.11.1", "kv_cache_usage_perc", "inter_token"),
        # Dynamo's tag is Dynamo's release; only engineVersion says which vLLM it runs.
        ("dynamo", IMAGES["dynamo"], "", "kv_cache_usage_perc", "inter_token_latency"),
        ("dynamo", "nvcr.io/nvidia/ai-dynamo/vllm-runtime:0.4.0", "", "kv_cache_usage", "inter"),
        ("dynamo", IMAGES["dynamo"], "0.10.1", "gpu_cache_usage_perc", "time_per_output_token"),
    ],
)
def test_vllm_metric_names_follow_the_release(
    runtime: str, image: str, version: str, kv: str, tpot: str
) -> None:
    obj = app(runtime, "hpa", "kvCacheUsage", "timePerOutputToken")
    obj["spec"]["image"] = image
    if version:
        obj["spec"]["autoscaling"]["engineVersion"] = version
    kv_metric, tpot_metric = autoscaler_of(obj)["spec"]["metrics"]
    assert kv_metric["pods"]["metric"]["name"].startswith(f"arks_vllm_{kv}")
    assert tpot_metric["pods"]["metric"]["name"].startswith(f"arks_vllm_{tpot}")


def test_no_image_means_the_runtimes_default_image_and_its_names() -> None:
    obj = app("vllm", "hpa", "kvCacheUsage")
    del obj["spec"]["image"]
    assert engine_series(obj["spec"]) == SERIES["vllm"]  # vllm/vllm-openai:latest


@pytest.mark.parametrize("quantile", ADAPTER_QUANTILES)
def test_latency_quantile_picks_the_adapter_name_and_the_keda_quantile(quantile: int) -> None:
    for kind in ("timeToFirstToken", "timePerOutputToken"):
        obj = app("sglang", "hpa", kind)
        obj["spec"]["autoscaling"]["metrics"][0]["quantile"] = quantile
        (metric,) = autoscaler_of(obj)["spec"]["metrics"]
        assert metric["pods"]["metric"]["name"].endswith(f"_seconds_p{quantile}")
        obj["spec"]["autoscaling"]["provider"] = "keda"
        (trigger,) = autoscaler_of(obj)["spec"]["triggers"]
        assert trigger["metadata"]["query"].startswith(f"(histogram_quantile({quantile / 100:g},")


def test_keda_triggers_query_the_configured_prometheus_per_application() -> None:
    defaults = RenderDefaults(prometheus_url="http://prom.obs.svc:9090")
    obj = autoscaler_of(app("vllm", "keda", *TYPES), defaults)
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    assert (obj["spec"]["minReplicaCount"], obj["spec"]["maxReplicaCount"]) == (1, 4)
    waiting, kv, ttft, tpot, cpu = obj["spec"]["triggers"]
    sel = 'namespace="llm",arks_ai_application="chat"'
    assert waiting == {
        "type": "prometheus",
        "name": "waitingrequests",
        "metricType": "AverageValue",  # the HPA divides the sum by the replicas
        "metadata": {
            "serverAddress": "http://prom.obs.svc:9090",
            "query": f"sum(vllm:num_requests_waiting{{{sel}}}) or vector(0)",
            "threshold": "5",
        },
    }
    assert kv["metricType"] == "AverageValue" and kv["metadata"]["threshold"] == "0.8"
    assert kv["metadata"]["query"] == (
        f"sum(avg by (pod) (vllm:gpu_cache_usage_perc{{{sel}}})) or vector(0)"
    )
    # A latency is not a per-replica share: Value, one quantile over all the pods.
    assert ttft["metricType"] == "Value" and ttft["metadata"]["threshold"] == "0.5"
    assert ttft["metadata"]["query"] == (
        "(histogram_quantile(0.9, sum by (le) "
        f"(rate(vllm:time_to_first_token_seconds_bucket{{{sel}}}[2m]))) >= 0) or vector(0)"
    )
    assert "vllm:time_per_output_token_seconds_bucket" in tpot["metadata"]["query"]
    assert tpot["metadata"]["threshold"] == "0.05"
    assert cpu == {
        "type": "cpu",
        "name": "cpu",
        "metricType": "Utilization",
        "metadata": {"value": "70"},
    }


def test_behavior_defaults_to_a_slow_scale_down_for_both_providers() -> None:
    hpa = autoscaler_of(app("vllm", "hpa", "waitingRequests"))
    keda = autoscaler_of(app("vllm", "keda", "waitingRequests"))
    expected = {"scaleDown": dict(DEFAULT_SCALE_DOWN)}
    assert hpa["spec"]["behavior"] == expected
    assert keda["spec"]["advanced"] == {"horizontalPodAutoscalerConfig": {"behavior": expected}}


def test_behavior_given_is_passed_through_and_scale_down_default_only_fills_a_gap() -> None:
    up = {"stabilizationWindowSeconds": 30, "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]}  # fmt: skip
    down = {"selectPolicy": "Disabled"}
    only_up = autoscaler_of(app("sglang", "hpa", "waitingRequests", behavior={"scaleUp": up}))
    assert only_up["spec"]["behavior"] == {"scaleUp": up, "scaleDown": dict(DEFAULT_SCALE_DOWN)}
    both = app("sglang", "keda", "waitingRequests", behavior={"scaleUp": up, "scaleDown": down})
    obj = autoscaler_of(both)
    assert obj["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == {
        "scaleUp": up,
        "scaleDown": down,
    }
    valid(obj)
    valid(autoscaler_of({**both, "spec": {**both["spec"], "autoscaling": {**both["spec"]["autoscaling"], "provider": "hpa"}}}))  # fmt: skip


def test_empty_metrics_never_render_an_hpa_on_cpu() -> None:
    """An HPA without metrics is run on CPU utilisation by Kubernetes. Absent metrics get the
    CRD's default (waiting requests); an empty list is refused, as the CRD refuses it."""
    obj = app("vllm", "hpa")
    with pytest.raises(UnsupportedApplication, match="metrics is empty"):
        render_application(obj, model_on_claim("c"), defaults=RENDER_DEFAULTS)
    del obj["spec"]["autoscaling"]["metrics"]
    (metric,) = autoscaler_of(obj)["spec"]["metrics"]
    assert metric["pods"] == {
        "metric": {"name": "arks_vllm_num_requests_waiting"},
        "target": {"type": "AverageValue", "averageValue": "5"},
    }


@pytest.mark.parametrize("provider", ["hpa", "keda"])
def test_cpu_needs_a_cpu_request_on_the_engine_pods(provider: str) -> None:
    obj = app("vllm", provider, "waitingRequests", "cpu")
    obj["spec"]["instanceSpec"] = {"resources": {"limits": {"nvidia.com/gpu": "1"}}}
    with pytest.raises(UnsupportedApplication, match=r"requests\.cpu"):
        render_application(obj, model_on_claim("c"), defaults=RENDER_DEFAULTS)
    obj["spec"]["instanceSpec"]["resources"]["limits"]["cpu"] = "4"  # requests default to limits
    assert autoscaler_of(obj)


def test_the_autoscaler_owns_the_replica_count_with_either_provider() -> None:
    for provider in ("hpa", "keda"):
        workload = render_application(app("vllm", provider, "waitingRequests"), model_on_claim("c"))[0]  # fmt: skip
        assert "replicas" not in workload["spec"]


def test_the_sample_asks_for_what_vllm_0_8_5_exports() -> None:
    """The issue's case: the sample pins vllm/vllm-openai:v0.8.5, which has no
    vllm:kv_cache_usage_perc; its HPA must ask for gpu_cache_usage_perc."""
    sample = yaml.safe_load((REPO / "manifests" / "samples" / "arksapplication.yaml").read_text())
    hpa = autoscaler_of(sample)
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert names == [
        "arks_vllm_num_requests_waiting",
        "arks_vllm_gpu_cache_usage_perc",
        "arks_vllm_time_to_first_token_seconds_p90",
    ]
    assert hpa["spec"]["behavior"]["scaleDown"] == {"stabilizationWindowSeconds": 900}
    valid(hpa)
