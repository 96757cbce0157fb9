"""Every dashboard panel, every rule and the alerts, on a real Prometheus scraping the real stack.

One local stack (real Envoy, extproc, the standalone controller, simulated engines, a model whose
engine nobody serves), the rate-limit service, and Debian's Prometheus with the configuration
`arks up --prometheus` generates (`arks.prometheus_config.local_jobs`) and the shipped rule
files. Two rounds of traffic exercise every panel: successes (plain, streamed, embeddings),
estimated and unreported usage, each kind of denial (bad key, unknown model, model not granted,
rpm, quota, concurrency), engine errors (`x-sim-status`, a model with no engine), slow first
tokens and a drained engine. Two rounds, a scrape apart, because a counter born in the first
round only has a rate once the second round moves it.

Then every panel query of every dashboard runs against Prometheus's HTTP API, twice: with the
variables at "All" and with one namespace, model and user selected (a panel that filters on a
label its series lack is empty only then). Each must return series unless it is in ALLOW_LIST,
with the reason. The rules must all evaluate healthy, and the alerts the faults make true must
be pending or firing (production `for:` durations: most can only be pending here), and no other.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from arks import alert_rules
from arks.api import token_digest
from arks.dashboards import DEFAULTS, PanelQuery, queries, substitute, variable_queries
from arks.prometheus_config import local_jobs
from launcher.procs import Child, Supervisor, free_port, wait_http
from launcher.prometheus import rule_files
from launcher.stack import engine_targets
from tests.support.objects import backend, endpoint, token
from tests.support.prometheus import Prometheus
from tests.support.stack import ALICE, BOB, Stack, running_stack
from tests.support.waiting import wait_for

METERED = "sk-arks-test-panels-metered-01"  # the tenant selected in the second pass
CAPPED = "sk-arks-test-panels-capped-02"  # a quota it exhausts at once
THROTTLED = "sk-arks-test-panels-throttled-03"  # rpm 2
POOLED = "sk-arks-test-panels-pooled-04"
POOL = "model-pool"  # two engines of its own, least-load picking; one is killed: drained
SLOTS = 2  # the metered tenant's concurrency; its lingering streams take both
SETTLE_TIMEOUT_S = 3  # extproc's wait for an access-log entry, short so one goes unreported
LINGER_MS = 5000  # a stream open this long after [DONE] outlives that wait
SLOW_TTFT_MS = 2500  # above the TTFT alert's 2 s target
MESSAGES = [{"role": "user", "content": "What does a lighthouse keeper do?"}]
RATELIMIT_CONFIG = """
domain: panels
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 2, name: per_user}
"""

# (dashboard uid, panel title, refId) -> why the panel can have no data on this stack.
_NO_KUBERNETES_HPA = "kube-state-metrics' HPA series: no Kubernetes here"
_NO_RECONCILERS = (
    "the Kubernetes reconcilers' series: the standalone controller runs none (and a second, "
    "Kubernetes-mode controller would make two leaders)"
)
ALLOW_LIST: dict[tuple[str, str, str], str] = {
    **{("arks-engines", "Replicas: current vs desired", ref): _NO_KUBERNETES_HPA for ref in "ABC"},
    **{
        ("arks-control-plane", panel, "A"): _NO_RECONCILERS
        for panel in (
            "Reconciles by controller and result",
            "Reconcile latency p99",
            "Queue depth",
            "Queue wait p99",
        )
    },
}

# The alerts the injected faults make true. Those with a `for:` longer than the test are
# pending; none may be missing.
EXPECTED_ALERTS = {
    "ArksModelNoHealthyEngine",  # model-down: nobody listens at its engine's address
    "ArksEngineDrained",  # model-down's engine and the killed pool engine: weight 0
    "ArksTenantThrottled",  # rpm, quota and concurrency refusals in both rounds
    "ArksQuotaNearlyUsed",  # the capped tenant's quota: over 100 % after one answer
    "ArksEngineErrorRatioHigh",  # 503s of model-down, 500s of model-a's engine
    "ArksErrorBudgetBurnFast",  # those 5xx at the edge
    "ArksErrorBudgetBurnSlow",
    "ArksTimeToFirstTokenHigh",  # model-b's streams start after 2.5 s
    "ArksUsageMostlyEstimated",  # model-b's engine reports no usage
    "ArksUsageUnreported",  # a stream outlives extproc's settle timeout
}


def _grant(user: str, secret: str, models: list[str], **spec: Any) -> dict[str, Any]:
    doc = token(user, models, tokenHash=token_digest(secret))
    for grant in doc["spec"]["qos"]:
        grant.update(spec)
    return doc


def _quota(name: str, quotas: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksQuota",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "quotas": quotas,
            "prices": [{"model": "model-a", "input": 0.15, "output": 0.6}],
        },
    }


def documents(suffix: str, pool_ports: list[int]) -> list[dict[str, Any]]:
    limits = [{"type": "rpm", "value": 1000}, {"type": "tpm", "value": 1_000_000}]
    return [
        *[backend(f"sim-pool-{i}", port) for i, port in enumerate(pool_ports)],
        endpoint(POOL, *[f"sim-pool-{i}" for i in range(len(pool_ports))], weighting="least-load"),
        _quota(
            f"budget-{suffix}",
            [
                {"type": "total", "value": 1_000_000, "period": "day"},
                {"type": "cost", "value": 5, "period": "month"},
            ],
        ),
        _quota(f"cap-{suffix}", [{"type": "total", "value": 10, "period": "day"}]),
        _grant(
            f"metered-{suffix}",
            METERED,
            ["model-a"],
            quota={"name": f"budget-{suffix}"},
            rateLimits=[*limits, {"type": "concurrency", "value": SLOTS}],
        ),
        _grant(f"capped-{suffix}", CAPPED, ["model-a"], quota={"name": f"cap-{suffix}"}),
        _grant(
            f"throttled-{suffix}", THROTTLED, ["model-a"], rateLimits=[{"type": "rpm", "value": 2}]
        ),
        _grant(f"pooled-{suffix}", POOLED, [POOL]),
    ]


@dataclass
class RateLimitService:
    child: Child
    grpc_address: str
    metrics_address: str

    def ask(self, user: str) -> int:
        """One ShouldRateLimit call for `user`; its overall code."""
        entry = common.RateLimitDescriptor.Entry(key="user", value=user)
        request = rls_pb2.RateLimitRequest(
            domain="panels", descriptors=[common.RateLimitDescriptor(entries=[entry])]
        )
        with grpc.insecure_channel(self.grpc_address) as channel:
            answer = rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(request, timeout=5)
        return int(answer.overall_code)


def start_ratelimit(sup: Supervisor, tmp: Path) -> RateLimitService:
    config = tmp / "ratelimit.yaml"
    config.write_text(RATELIMIT_CONFIG)
    grpc_port, metrics_port = free_port(), free_port()
    child = sup.python(
        "ratelimit",
        "ratelimit",
        "--config",
        str(config),
        "--grpc-address",
        f"127.0.0.1:{grpc_port}",
        "--metrics-port",
        str(metrics_port),
        "--port",  # its HTTP and debug ports off upstream's defaults (8080, 6070)
        str(free_port()),
        "--debug-port",
        str(free_port()),
    )
    wait_http(child, f"http://127.0.0.1:{metrics_port}/metrics")
    return RateLimitService(child, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{metrics_port}")


def start_pool(sup: Supervisor, count: int = 2) -> tuple[list[int], list[Child]]:
    ports = [free_port() for _ in range(count)]
    children = []
    for i, port in enumerate(ports):
        child = sup.python(
            f"sim-pool-{i}", "launcher.sim", "--port", str(port), "--model", POOL,
            "--name", f"sim-pool-{i}",
        )  # fmt: skip
        wait_http(child, f"http://127.0.0.1:{port}/health")
        children.append(child)
    return ports, children


@dataclass
class Observed:
    prometheus: Prometheus
    selected: dict[str, str]  # the second pass's variable values


def _status(call: Callable[[], object]) -> int:
    """The status of one request made through the openai client: 200, or its error's."""
    try:
        call()
    except openai.APIStatusError as err:
        return err.status_code
    return 200


def chat(client: openai.OpenAI, model: str, **extra: Any) -> int:
    return _status(
        lambda: client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=8, **extra
        )
    )


def stream(client: openai.OpenAI, model: str, **extra: Any) -> int:
    def read_all() -> object:
        return list(
            client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=8, stream=True, **extra
            )
        )

    return _status(read_all)


def embed(client: openai.OpenAI, model: str) -> int:
    return _status(lambda: client.embeddings.create(model=model, input=["a lighthouse"]))


def lingering_stream(stack: Stack) -> int:
    """A metered stream that stays open LINGER_MS after its last chunk, holding its
    concurrency slot, and ends after extproc gave up waiting for its access-log entry."""
    with httpx.stream(
        "POST",
        f"{stack.url}/v1/chat/completions",
        json={"model": "model-a", "messages": MESSAGES, "max_tokens": 5, "stream": True},
        headers={"authorization": f"Bearer {METERED}", "x-sim-linger-ms": str(LINGER_MS)},
        timeout=30,
    ) as response:
        response.read()
        return response.status_code


def traffic_round(stack: Stack, suffix: str) -> None:
    """One round of requests touching every panel; asserts each got the answer it provokes."""
    metered, alice = stack.client(METERED), stack.client(ALICE)
    no_usage = {"extra_headers": {"x-sim-omit-usage": "1"}}
    slow = {"extra_headers": {"x-sim-ttft-ms": str(SLOW_TTFT_MS), "x-sim-omit-usage": "1"}}
    with ThreadPoolExecutor(SLOTS + 2) as pool:
        lingering = [pool.submit(lingering_stream, stack) for _ in range(SLOTS)]
        slow_streams = [pool.submit(stream, alice, "model-b", **slow) for _ in range(2)]
        wait_for(
            lambda: stack.metric("arks_in_flight_requests", namespace="default", model="model-a"),
            lambda in_flight: in_flight >= SLOTS,
        )
        assert chat(metered, "model-a") == 429  # concurrency: both slots taken
        # Everyone else meanwhile: successes, engine errors, every kind of refusal.
        assert chat(alice, "model-a") == 200
        assert stream(alice, "model-a", stream_options={"include_usage": True}) == 200
        assert embed(alice, "model-a") == 200
        assert [chat(alice, "model-b", **no_usage) for _ in range(3)] == [200] * 3  # estimated
        engine_error = {"extra_headers": {"x-sim-status": "500"}}
        assert [chat(alice, "model-a", **engine_error) for _ in range(4)] == [500] * 4
        assert [chat(alice, "model-down") for _ in range(6)] == [503] * 6  # nobody listens
        assert [chat(stack.client(POOLED), POOL) for _ in range(4)] == [200] * 4  # picked
        assert chat(stack.client(f"sk-arks-not-a-key-{suffix}"), "model-a") == 401
        assert chat(alice, "no-such-model") == 404
        assert chat(stack.client(BOB), "model-b") == 403  # bob may use model-a only
        assert [chat(stack.client(THROTTLED), "model-a") for _ in range(3)][-1] == 429  # rpm
        assert [chat(stack.client(CAPPED), "model-a") for _ in range(2)][-1] == 429  # quota
        assert [f.result() for f in lingering] == [200] * SLOTS
        assert [f.result() for f in slow_streams] == [200] * 2
    # The metered tenant's own requests, one at a time: a request's concurrency slot is given
    # back at its settlement (its access-log entry), not when the answer ends.
    for request in (
        lambda: chat(metered, "model-a"),
        lambda: stream(metered, "model-a"),
        lambda: embed(metered, "model-a"),
        lambda: chat(metered, "model-a", **no_usage),
    ):
        stack.usage(f"metered-{suffix}", "model-a")
        assert request() == 200


def _wait_weight_zero(prometheus: Prometheus, model: str, timeout: float = 20.0) -> None:
    wait_for(
        lambda: prometheus.query(f'arks_engine_weight{{model="{model}"}} == 0'),
        bool,
        timeout,
        interval=0.2,
    )


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    suffix = uuid.uuid4().hex[:6]
    tmp = tmp_path_factory.mktemp("panels")
    with Supervisor(log_dir=tmp / "logs") as sup:
        pool_ports, pool = start_pool(sup)
        limiter = start_ratelimit(sup, tmp)
        extproc_args = ("--usage-settle-timeout-s", str(SETTLE_TIMEOUT_S))
        with running_stack(
            tmp / "stack", documents(suffix, pool_ports), extproc_args=extproc_args
        ) as stack:
            local = stack.local
            engines = engine_targets(local.policy)
            jobs = local_jobs(
                gateway=f"127.0.0.1:{local.settings.metrics_port}",
                controller=f"127.0.0.1:{local.controller_metrics_port}",
                envoy_admin=f"127.0.0.1:{local.settings.admin_port}",
                ratelimit=limiter.metrics_address,
                engines=engines,
            )
            prometheus = Prometheus.start_jobs(
                sup, tmp / "prometheus", jobs, 1, [str(p) for p in rule_files()]
            )
            listening = len(jobs) - 1 + len(engines) - 1  # all but model-down's engine
            prometheus.wait_up(listening)
            # The rate-limit service within and over its limit (2 a minute), in both rounds.
            for _ in range(2):
                codes = [limiter.ask(f"panels-{suffix}") for _ in range(3)]
                assert codes[-1] == rls_pb2.RateLimitResponse.OVER_LIMIT
                traffic_round(stack, suffix)
                prometheus.wait_scrapes(2)
                if pool[1].alive():
                    pool[1].popen.kill()  # the controller drains it after failed scrapes
                    _wait_weight_zero(prometheus, POOL)
            stack.usage(f"metered-{suffix}", "model-a")  # every admitted request settled
            prometheus.wait_scrapes(2)
            yield Observed(
                prometheus,
                {"namespace": "default", "model": f"(model-a|{POOL})", "user": f"metered-{suffix}"},
            )


@dataclass
class Outcome:
    query: PanelQuery
    expr: str
    series: int | None  # None: Prometheus refused the query
    error: str = ""


def run_panels(prometheus: Prometheus, values: dict[str, str]) -> list[Outcome]:
    out = []
    for q in queries():
        expr = substitute(q.expr, values)
        try:
            out.append(Outcome(q, expr, len(prometheus.query(expr))))
        except AssertionError as err:
            out.append(Outcome(q, expr, None, str(err)[:300]))
    return out


def _key(q: PanelQuery) -> tuple[str, str, str]:
    return (q.dashboard, q.panel, q.ref_id)


def test_every_panel_query_is_valid_and_has_data(observed: Observed) -> None:
    passes = {
        "all": DEFAULTS,
        "selected": {**DEFAULTS, **observed.selected},
    }
    problems = []
    counts = {}
    for name, values in passes.items():
        outcomes = run_panels(observed.prometheus, values)
        invalid = [o for o in outcomes if o.series is None]
        empty = [o for o in outcomes if o.series == 0 and _key(o.query) not in ALLOW_LIST]
        allowed = [o for o in outcomes if _key(o.query) in ALLOW_LIST]
        stale = [o for o in allowed if o.series]
        problems += [f"{name}: invalid {_key(o.query)}: {o.error}" for o in invalid]
        problems += [f"{name}: no series {_key(o.query)}: {o.expr}" for o in empty]
        problems += [f"{name}: allow-listed but has data {_key(o.query)}" for o in stale]
        with_series = sum(1 for o in outcomes if o.series)
        counts[name] = (len(outcomes), with_series, len(allowed))
    record_counts(counts)
    assert not problems, "\n".join(problems)


def record_counts(counts: dict[str, tuple[int, int, int]]) -> None:
    lines = [
        "# Panel-query check on a real Prometheus (tests/integration/test_dashboards_on_prometheus.py)",
        "",
        "| variables | queries run | with series | allow-listed |",
        "|---|---|---|---|",
        *[
            f"| {name} | {run} | {data} | {allowed} |"
            for name, (run, data, allowed) in counts.items()
        ],
        "",
        "Allow-list:",
        *[f"- {uid} / {panel} / {ref}: {why}" for (uid, panel, ref), why in ALLOW_LIST.items()],
        "",
    ]
    print("\n".join(lines))  # in the test's output (pytest -s); nothing written outside the tree


_LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)")


def test_every_variable_query_lists_values(observed: Observed) -> None:
    for values in (DEFAULTS, {**DEFAULTS, **observed.selected}):
        for query in variable_queries():
            match = _LABEL_VALUES.fullmatch(query)
            assert match, query
            selector = substitute(match["selector"], values)
            found = {s[0].get(match["label"], "") for s in observed.prometheus.query(selector)}
            assert found - {""}, (query, selector)


def test_every_rule_group_loads_and_every_rule_evaluates_healthy(observed: Observed) -> None:
    groups = observed.prometheus.rule_groups()
    assert sorted(g["name"] for g in groups) == sorted(g.name for g in alert_rules.GROUPS)
    for group in groups:
        assert len(group["rules"]) == len(
            next(g for g in alert_rules.GROUPS if g.name == group["name"]).rules
        )
        for rule in group["rules"]:
            assert (rule["name"], rule["health"], rule.get("lastError", "")) == (
                rule["name"],
                "ok",
                "",
            )
            assert not rule["lastEvaluation"].startswith("0001"), rule["name"]  # evaluated


def test_the_injected_faults_raise_their_alerts_and_no_others(observed: Observed) -> None:
    def active() -> list[dict[str, Any]]:
        return list(observed.prometheus._data("/api/v1/alerts", {})["alerts"])

    alerts = wait_for(
        active, lambda a: EXPECTED_ALERTS <= {x["labels"]["alertname"] for x in a}, timeout=30
    )
    assert {a["labels"]["alertname"] for a in alerts} == EXPECTED_ALERTS
    assert {a["state"] for a in alerts} <= {"pending", "firing"}

    def labels(alert: str, *names: str) -> set[tuple[str, ...]]:
        return {
            tuple(a["labels"][n] for n in names)
            for a in alerts
            if a["labels"]["alertname"] == alert
        }

    user = observed.selected["user"].removeprefix("metered-")
    assert labels("ArksModelNoHealthyEngine", "model") == {("model-down",)}
    assert labels("ArksEngineDrained", "model") == {("model-down",), (POOL,)}
    assert labels("ArksTenantThrottled", "user", "reason") == {
        (f"metered-{user}", "concurrency"),
        (f"throttled-{user}", "rpm"),
        (f"capped-{user}", "quota"),
    }
    assert labels("ArksQuotaNearlyUsed", "quota", "type") == {(f"cap-{user}", "total")}
    assert labels("ArksEngineErrorRatioHigh", "model") == {("model-a",), ("model-down",)}
    assert labels("ArksTimeToFirstTokenHigh", "model") == {("model-b",)}
    assert labels("ArksUsageMostlyEstimated", "model") == {("model-b",)}
    assert labels("ArksUsageUnreported", "model") == {("model-a",)}
