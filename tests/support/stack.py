"""The local stack for integration tests: real Envoy, extproc and simulated engines.

`running_stack` starts one on free ports with its own policy file (the base policy's backends,
endpoints and tokens plus any extra documents); tests read usage from the gateway's metrics, as
an operator would.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

from arks.api import token_digest
from launcher.procs import Child, Supervisor, free_port, wait_http
from launcher.stack import LocalStack, StackSettings
from tests.support.objects import backend, endpoint, token
from tests.support.waiting import wait_for

ALICE = "sk-arks-test-alice-5f1c0e0d9b8a"
BOB = "sk-arks-test-bob-77aa31c4e2d0"
EXPIRED = "sk-arks-test-expired-0c9d"
DISABLED = "sk-arks-test-disabled-1e2f"
ALL_TOKENS = (ALICE, BOB, EXPIRED, DISABLED)
MODEL_B_MAX_TOKENS = 100  # model-b's context: what an answer with no max_tokens may hold


@dataclass
class Stack:
    local: LocalStack
    policy_path: Path
    documents: list[dict]
    sim_ports: dict[str, int]
    engines: dict[str, Child] = field(default_factory=dict)  # "a", "b": to kill, stop, restart

    @property
    def url(self) -> str:
        return self.local.url

    def client(self, api_key: str = ALICE, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def write_policy(self, documents: list[dict]) -> None:
        self.documents = documents
        tmp = self.policy_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all(documents))
        tmp.replace(self.policy_path)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(self.local.metrics_url, timeout=5).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return self.metrics().get(key, 0.0)

    def usage(self, user: str, model: str) -> Usage:
        """Charged usage so far, once every admitted request has been charged."""
        ident = {"namespace": "default", "user": user, "model": model}
        m = wait_for(self.metrics, lambda m: m.get(("arks_usage_pending_requests", ()), 0) == 0)

        def get(name: str, **extra: str) -> float:
            return sum(
                v
                for (n, labels), v in m.items()
                if n == name
                and all(dict(labels).get(k) == val for k, val in {**ident, **extra}.items())
            )

        return Usage(
            requests=int(get("arks_requests_total")),
            prompt=int(get("arks_usage_tokens_total", type="prompt")),
            completion=int(get("arks_usage_tokens_total", type="completion")),
            estimated=int(get("arks_usage_estimated_requests_total")),
        )

    def wait_usage(
        self, user: str, model: str, before: Usage, requests: int = 1, timeout: float = 10
    ) -> Usage:
        """The usage charged since `before`, once `requests` more requests were charged."""
        return wait_for(
            lambda: self.usage(user, model) - before, lambda d: d.requests >= requests, timeout
        )


@dataclass(frozen=True)
class Usage:
    requests: int = 0
    prompt: int = 0
    completion: int = 0
    estimated: int = 0

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.requests - other.requests,
            self.prompt - other.prompt,
            self.completion - other.completion,
            self.estimated - other.estimated,
        )


def kill_mid_run(
    client: httpx.Client, model: str, engine: Child, requests: int = 150, at: int = 30
) -> tuple[collections.Counter[int], collections.Counter[str]]:
    """Send `requests` short chat requests, SIGKILL `engine` before request `at`; the answers'
    statuses and which engine (x-sim-instance) served the successful ones."""
    statuses: collections.Counter[int] = collections.Counter()
    served: collections.Counter[str] = collections.Counter()
    for i in range(requests):
        if i == at:
            engine.popen.kill()  # no goodbye: connections refused from now on
        answer = client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        statuses[answer.status_code] += 1
        if answer.status_code == 200:
            served[answer.headers["x-sim-instance"]] += 1
    return statuses, served


def base_policy(ports: dict[str, int]) -> list[dict]:
    return [
        backend("sim-a", ports["a"]),
        backend("sim-b", ports["b"]),
        backend("sim-down", ports["down"]),
        endpoint("model-a", "sim-a"),
        endpoint("model-b", "sim-b", max_tokens=MODEL_B_MAX_TOKENS),
        endpoint("model-down", "sim-down"),
        endpoint("model-empty"),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "bob-token", "namespace": "default"},
            "stringData": {"token": BOB},
        },
        token(
            "alice",
            ["model-a", "model-b", "model-down", "model-empty", "model-ghost"],
            tokenHash=token_digest(ALICE),
        ),
        token("bob", ["model-a"], tokenSecretRef={"name": "bob-token"}),
        token(
            "old", ["model-a"], tokenHash=token_digest(EXPIRED), expiresAt="2020-01-01T00:00:00Z"
        ),
        token("off", ["model-a"], tokenHash=token_digest(DISABLED), disabled=True),
    ]


@contextlib.contextmanager
def running_stack(
    tmp: Path,
    extra_documents: list[dict] = (),
    redis: str | None = None,
    extproc_args: tuple[str, ...] = (),
    kube_host: str | None = None,
    controller_args: tuple[str, ...] = (),
    ledger: str | None = None,
    cors_origins: tuple[str, ...] = (),
    trust_client_request_id: bool = False,
    extproc_workers: int = 1,
    envoy_concurrency: int = 2,
) -> Iterator[Stack]:
    """Two simulated engines, the base policy plus `extra_documents`, and the local stack;
    `ledger`: extproc's usage ledger URL (`{state_dir}` is filled in; None: no ledger);
    `cors_origins`: the browser origins Envoy's CORS policy allows; `trust_client_request_id`:
    Envoy keeps a client's x-request-id."""
    ports = {"a": free_port(), "b": free_port(), "down": free_port()}  # nothing listens on "down"
    tmp.mkdir(parents=True, exist_ok=True)
    policy_path = tmp / "policy.yaml"
    documents = [*base_policy(ports), *extra_documents]
    policy_path.write_text(yaml.safe_dump_all(documents))
    with Supervisor(log_dir=tmp / "logs") as sims:
        engines = {}
        for name, model in (("a", "model-a"), ("b", "model-b")):
            child = sims.python(
                f"sim-{name}",
                "launcher.sim",
                "--port",
                str(ports[name]),
                "--model",
                model,
                "--name",
                f"sim-{name}",
            )
            wait_http(child, f"http://127.0.0.1:{ports[name]}/health")
            engines[name] = child
        settings = StackSettings(
            policy=policy_path,
            state_dir=tmp / "state",
            port=free_port(),
            admin_port=free_port(),
            metrics_port=free_port(),
            controller_metrics_port=free_port(),
            simulate=False,
            redis=redis,
            extproc_args=("--snapshot-interval-s", "0.5", *extproc_args),
            controller_args=controller_args,
            kube_host=kube_host,
            ledger=ledger,
            cors_origins=cors_origins,
            trust_client_request_id=trust_client_request_id,
            extproc_workers=extproc_workers,
            envoy_concurrency=envoy_concurrency,
        )
        with LocalStack(settings) as local:
            yield Stack(local, policy_path, documents, ports, engines)


@contextlib.contextmanager
def pooled_stack(
    tmp: Path, documents: list[dict], ports: dict[str, int], model: str
) -> Iterator[Stack]:
    """A simulated engine serving `model` per name of `ports` (`sim-<name>` on its port, 5 ms
    to the first token, 1 ms a token), the policy `documents` (which place them, e.g.
    `pool("pool", list(ports.values()))`), and the local stack without its own simulators."""
    (tmp / "policy.yaml").write_text(yaml.safe_dump_all(documents))
    with Supervisor(log_dir=tmp / "logs") as sims:
        engines = {
            name: sims.python(
                f"sim-{name}", "launcher.sim", "--port", str(port), "--model", model,
                "--name", f"sim-{name}", "--ttft-ms", "5", "--tpot-ms", "1",
            )
            for name, port in ports.items()
        }  # fmt: skip
        for name, port in ports.items():
            wait_http(engines[name], f"http://127.0.0.1:{port}/health")
        settings = StackSettings(
            policy=tmp / "policy.yaml",
            state_dir=tmp / "state",
            port=free_port(),
            admin_port=free_port(),
            metrics_port=free_port(),
            controller_metrics_port=free_port(),
            simulate=False,
        )
        with LocalStack(settings) as local:
            yield Stack(local, tmp / "policy.yaml", documents, ports, engines)
