"""The whole autoscaling metrics path on real parts: engine simulators in each metrics style
(vLLM, vLLM before 0.11, SGLang) scraped by a real Prometheus with the labels the engine
PodMonitor gives; every name a rendered HPA asks for resolved through our prometheus-adapter
rules as the adapter does it (tests/support/prometheus_adapter.py: the adapter itself is a Go
binary that cannot run here) and evaluated; every rendered KEDA trigger's query evaluated.
Each must find the engines' series and give the value they export, for every runtime, release
and metric type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from arks.engine_series import ADAPTER_QUANTILES
from controller.render import render_application
from launcher.procs import Supervisor, free_port, wait_http
from tests.support.objects import RENDER_DEFAULTS, model_on_claim
from tests.support.prometheus import Prometheus, Target
from tests.support.prometheus_adapter import Rule, load_rules, resolve

NAMESPACE = "llm"
MODEL = "m1"
TTFT_S, TPOT_S = 0.6, 0.06  # in the buckets (0.5, 0.75] and (0.05, 0.075] of both engines
LOAD = {  # pod -> (waiting, kv cache usage) set through /sim/load
    "chat-new-0": (3, 0.4),
    "chat-new-1": (1, 0.2),
    "chat-old-0": (6, 0.7),
    "chat-sg-0": (2, 0.5),
}
BUSY = ("chat-new-0", "chat-old-0", "chat-sg-0")  # chat-new-1 serves nothing: an idle pod


@dataclass(frozen=True)
class App:
    name: str
    runtime: str
    image: str
    style: str
    pods: tuple[str, ...]


APPS = [
    App("chat-new", "vllm", "vllm/vllm-openai:v0.11.0", "vllm", ("chat-new-0", "chat-new-1")),
    # Dynamo runs the current vLLM: the same series as chat-new.
    App(
        "chat-new",
        "dynamo",
        "nvcr.io/nvidia/ai-dynamo/vllm-runtime:1.0.0",
        "vllm",
        ("chat-new-0", "chat-new-1"),
    ),
    App("chat-old", "vllm", "vllm/vllm-openai:v0.8.5", "vllm-legacy", ("chat-old-0",)),
    App("chat-sg", "sglang", "lmsysorg/sglang:v0.4.6", "sglang", ("chat-sg-0",)),
]
STYLES = {"chat-new": "vllm", "chat-old": "vllm-legacy", "chat-sg": "sglang"}


def quantile_in(lo: float, hi: float, q: float) -> float:
    """histogram_quantile when every observation fell in the bucket (lo, hi]."""
    return lo + (hi - lo) * q


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("autoscaling")
    with Supervisor(log_dir=tmp / "logs") as sup:
        ports = {}
        for pod in LOAD:
            app = pod.rsplit("-", 1)[0]
            ports[pod] = port = free_port()
            child = sup.python(
                pod, "launcher.sim", "--port", str(port), "--model", MODEL, "--name", pod,
                "--metrics-style", STYLES[app],
            )  # fmt: skip
            wait_http(child, f"http://127.0.0.1:{port}/health")
        targets = [
            Target(
                f"127.0.0.1:{ports[pod]}",
                # What Prometheus Operator's PodMonitor relabelling attaches (podmonitor.yaml).
                {
                    "namespace": NAMESPACE,
                    "pod": pod,
                    "container": "engine",
                    "arks_ai_application": pod.rsplit("-", 1)[0],
                },
            )
            for pod in LOAD
        ]
        prom = Prometheus.start(sup, tmp / "prometheus", targets)
        prom.wait_up(len(LOAD))
        prom.wait_scrapes(1)  # the histograms' zeros, so rate() sees the traffic below

        def request(pod: str) -> None:
            resp = httpx.post(
                f"http://127.0.0.1:{ports[pod]}/v1/completions",
                json={"model": MODEL, "prompt": "hello"},
                headers={
                    "x-sim-ttft-ms": str(TTFT_S * 1000),
                    "x-sim-tpot-ms": str(TPOT_S * 1000),
                    "x-sim-output-tokens": "3",
                },
                timeout=10.0,
            )
            assert resp.status_code == 200, resp.text

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(request, [pod for pod in BUSY for _ in range(3)]))
        for pod, (waiting, kv) in LOAD.items():
            resp = httpx.put(
                f"http://127.0.0.1:{ports[pod]}/sim/load",
                json={"waiting": waiting, "kv_cache_usage": kv},
                timeout=5.0,
            )
            assert resp.status_code == 200, resp.text
        prom.wait_scrapes(2)
        yield prom


def discovered(prom: Prometheus, rules: list[Rule]) -> list[tuple[Rule, str]]:
    """The adapter's discovery: each rule's seriesQuery, filtered by its name pattern."""
    pairs = []
    for rule in rules:
        names = {s["__name__"] for s in prom.series(rule.series_query)}
        pairs += [(rule, n) for n in sorted(names) if rule.api_name(n) is not None]
    return pairs


def application(app: App, provider: str, quantile: int) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksApplication",
        "metadata": {"name": app.name, "namespace": NAMESPACE},
        "spec": {
            "runtime": app.runtime,
            "image": app.image,
            "model": {"name": "qwen"},
            "autoscaling": {
                "provider": provider,
                "maxReplicas": 4,
                "metrics": [
                    {"type": "waitingRequests", "target": 5},
                    {"type": "kvCacheUsage", "target": 80},
                    {"type": "timeToFirstToken", "target": 500, "quantile": quantile},
                    {"type": "timePerOutputToken", "target": 50, "quantile": quantile},
                ],
            },
        },
    }


def autoscaler(obj: dict[str, Any], prometheus_url: str = "") -> dict[str, Any]:
    defaults = RENDER_DEFAULTS
    if prometheus_url:
        defaults = dataclasses.replace(defaults, prometheus_url=prometheus_url)
    return render_application(obj, model_on_claim("c"), defaults=defaults)[-1]


def expected_per_pod(pod: str, quantile: int) -> list[float]:
    """waiting, kv, TTFT and TPOT quantiles of one pod, as the HPA should read them."""
    waiting, kv = LOAD[pod]
    if pod not in BUSY:
        return [waiting, kv, 0.0, 0.0]  # served nothing in the window: 0, not NaN
    q = quantile / 100
    return [waiting, kv, quantile_in(0.5, 0.75, q), quantile_in(0.05, 0.075, q)]


@pytest.mark.parametrize("quantile", ADAPTER_QUANTILES)
@pytest.mark.parametrize("app", APPS, ids=lambda a: f"{a.runtime}-{a.style}")
def test_every_hpa_metric_resolves_through_the_adapter_rules_to_the_engines_value(
    prometheus: Prometheus, app: App, quantile: int
) -> None:
    pairs = discovered(prometheus, load_rules())
    hpa = autoscaler(application(app, "hpa", quantile))
    assert hpa["kind"] == "HorizontalPodAutoscaler"
    for i, metric in enumerate(hpa["spec"]["metrics"]):
        name = metric["pods"]["metric"]["name"]
        rule, series = resolve(pairs, name)
        result = prometheus.query(rule.query(series, NAMESPACE, app.pods))
        values = {labels["pod"]: value for labels, value in result}
        assert set(values) == set(app.pods), (name, result)  # one value per pod, none missing
        for pod in app.pods:
            want = expected_per_pod(pod, quantile)[i]
            assert values[pod] == pytest.approx(want, rel=1e-6, abs=1e-9), (name, pod)


@pytest.mark.parametrize("quantile", [50, 90, 99])
@pytest.mark.parametrize("app", APPS, ids=lambda a: f"{a.runtime}-{a.style}")
def test_every_keda_query_reads_the_applications_engines(
    prometheus: Prometheus, app: App, quantile: int
) -> None:
    obj = autoscaler(application(app, "keda", quantile), prometheus.url)
    assert obj["kind"] == "ScaledObject"
    waiting, kv, ttft, tpot = obj["spec"]["triggers"]
    q = quantile / 100

    def value(trigger: dict[str, Any]) -> float:
        assert trigger["metadata"]["serverAddress"] == prometheus.url
        (sample,) = prometheus.query(trigger["metadata"]["query"])  # KEDA wants one element
        return sample[1]

    assert value(waiting) == sum(LOAD[p][0] for p in app.pods)
    assert value(kv) == pytest.approx(sum(LOAD[p][1] for p in app.pods))
    # One quantile over the application: the idle pod adds no observation.
    assert value(ttft) == pytest.approx(quantile_in(0.5, 0.75, q))
    assert value(tpot) == pytest.approx(quantile_in(0.05, 0.075, q))


def test_keda_queries_of_an_application_without_engines_read_zero(prometheus: Prometheus) -> None:
    """No engine yet (or none scraped): 0, never an empty or NaN result."""
    app = App("not-started", "vllm", "vllm/vllm-openai:v0.11.0", "vllm", ())
    for trigger in autoscaler(application(app, "keda", 90))["spec"]["triggers"]:
        assert prometheus.query(trigger["metadata"]["query"]) == [({}, 0.0)]


def test_the_new_kv_cache_name_finds_nothing_on_vllm_0_8(prometheus: Prometheus) -> None:
    """Why the release matters: an HPA asking vLLM 0.8.5 for kv_cache_usage_perc gets nothing
    (FailedGetPodsMetric), and an HPA missing a metric never scales down."""
    assert prometheus.query('vllm:kv_cache_usage_perc{pod="chat-old-0"}') == []
    assert prometheus.query('vllm:gpu_cache_usage_perc{pod="chat-old-0"}') != []
    assert prometheus.query('vllm:gpu_cache_usage_perc{pod="chat-new-0"}') == []


def test_prometheus_scrapes_what_the_podmonitor_labels_promise(prometheus: Prometheus) -> None:
    for labels, _ in prometheus.query("up"):
        assert labels["namespace"] == NAMESPACE and labels["arks_ai_application"]
        assert labels["pod"] in LOAD
