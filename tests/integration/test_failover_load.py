"""Failover under load: one of two engines is SIGKILLed while 40 clients keep asking. Every request
not already being answered by the dead engine must be retried on the other one, so no client
sees an error (Envoy's default circuit breakers allowed 3 retries in flight per cluster and
answered the rest 503 `upstream_rq_retry_overflow`)."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from arks.api import token_digest
from launcher.procs import Child, Supervisor, free_port, wait_http
from launcher.stack import LocalStack, StackSettings
from tests.support.objects import endpoint, pool, token

TOKEN = "sk-arks-failover-test-0001"
MODEL = "qwen"
CLIENTS = 40

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, dict[str, Child]]]:
    tmp: Path = tmp_path_factory.mktemp("failover")
    ports = {name: free_port() for name in ("a", "b")}
    documents = [
        pool("pool", list(ports.values())),
        endpoint(MODEL, "pool", weighting="static"),
        token("alice", [MODEL], tokenHash=token_digest(TOKEN)),
    ]
    (tmp / "policy.yaml").write_text(yaml.safe_dump_all(documents))
    with Supervisor(log_dir=tmp / "logs") as sims:
        children = {
            name: sims.python(
                f"sim-{name}",
                "launcher.sim",
                "--port",
                str(port),
                "--model",
                MODEL,
                "--name",
                name,
                "--ttft-ms",
                "20",
            )
            for name, port in ports.items()
        }
        for name, port in ports.items():
            wait_http(children[name], f"http://127.0.0.1:{port}/health")
        settings = StackSettings(
            policy=tmp / "policy.yaml",
            state_dir=tmp / "state",
            port=free_port(),
            admin_port=free_port(),
            metrics_port=free_port(),
            controller_metrics_port=free_port(),
            simulate=False,
        )
        with LocalStack(settings) as stack:
            yield stack, children


def test_killing_one_of_two_engines_under_40_clients_costs_no_client_an_error(
    pair: tuple[LocalStack, dict[str, Child]],
) -> None:
    stack, engines = pair
    statuses: collections.Counter[int] = collections.Counter()
    served: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(
            base_url=stack.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30
        ) as http:
            while not stop.is_set():
                answer = http.post(
                    "/v1/chat/completions",
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 2,
                    },
                )
                with lock:
                    statuses[answer.status_code] += 1
                    if answer.status_code == 200:
                        served[answer.headers["x-sim-instance"]] += 1

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        with lock:
            assert served["a"] > 0 and served["b"] > 0, served  # both engines take traffic
        engines["b"].popen.kill()  # no goodbye: its connections are refused from now on
        time.sleep(3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    errors = {code: n for code, n in statuses.items() if code != 200}
    assert errors == {}, f"{errors} of {sum(statuses.values())} requests failed"
    assert statuses[200] > 200
