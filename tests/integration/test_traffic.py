"""Traffic follows engine load: real Envoy programmed over xDS by the standalone controller,
three simulated engines whose load the test sets, requests counted by the engine that served.

Tolerances: Envoy's weighted least-request picks by weight when no request is in flight
(sequential requests here), so shares land within a few points of weight / sum; the tests
allow 0.08 absolute.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from arks.api import token_digest
from launcher.procs import Child, Supervisor, free_port, wait_http
from launcher.stack import LocalStack, StackSettings
from tests.support.objects import endpoint, pool, token
from tests.support.stack import kill_mid_run
from tests.support.waiting import wait_for

TOKEN = "sk-arks-traffic-test-0001"
MODEL = "qwen"
ENGINES = ("a", "b", "c")
TOLERANCE = 0.08

pytestmark = pytest.mark.timeout(120)


@dataclass
class Traffic:
    stack: LocalStack
    ports: dict[str, int]
    sims: dict[str, Child]

    def engine_of_port(self) -> dict[int, str]:
        return {port: name for name, port in self.ports.items()}

    def set_load(self, name: str, **load: Any) -> None:
        answer = httpx.put(f"http://127.0.0.1:{self.ports[name]}/sim/load", json=load, timeout=5)
        answer.raise_for_status()

    def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(f"{self.stack.controller_url}/status", timeout=5).json()
        return answer

    def weights(self) -> dict[str, int]:
        by_port = self.engine_of_port()
        return {
            by_port[int(e["engine"].rsplit(":", 1)[1])]: e["weight"]
            for e in self.status()["engines"]
        }

    def envoy_weights(self) -> dict[str, int]:
        """What Envoy runs: the weights of the model cluster's hosts on its admin /clusters."""
        clusters = httpx.get(f"{self.stack.admin_url}/clusters?format=json", timeout=5).json()
        by_port = self.engine_of_port()
        out = {}
        for cluster in clusters.get("cluster_statuses", []):
            if cluster["name"] != f"endpoint/default/{MODEL}":
                continue
            for host in cluster.get("host_statuses", []):
                port = host["address"]["socket_address"]["port_value"]
                out[by_port[port]] = int(host.get("weight", 1))
        return out

    def ask(self, client: httpx.Client) -> str:
        answer = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert answer.status_code == 200, answer.text
        return answer.headers["x-sim-instance"]

    def split(self, requests: int) -> dict[str, float]:
        with self.client() as client:
            served = collections.Counter(self.ask(client) for _ in range(requests))
        return {name: served.get(name, 0) / requests for name in ENGINES}

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.stack.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10
        )


def policy(ports: dict[str, int]) -> list[dict[str, Any]]:
    return [
        pool("pool", [ports[n] for n in ENGINES]),
        endpoint(MODEL, "pool", weighting="weighted"),
        token("alice", [MODEL], tokenHash=token_digest(TOKEN)),
    ]


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traffic]:
    tmp: Path = tmp_path_factory.mktemp("traffic")
    ports = {name: free_port() for name in ENGINES}
    policy_path = tmp / "policy.yaml"
    policy_path.write_text(yaml.safe_dump_all(policy(ports)))
    with Supervisor(log_dir=tmp / "logs") as sims:
        children = {}
        for name in ENGINES:
            children[name] = sims.python(
                f"sim-{name}",
                "launcher.sim",
                "--port",
                str(ports[name]),
                "--model",
                MODEL,
                "--name",
                name,
            )
        for name in ENGINES:
            wait_http(children[name], f"http://127.0.0.1:{ports[name]}/health")
        settings = StackSettings(
            policy=policy_path,
            state_dir=tmp / "state",
            port=free_port(),
            admin_port=free_port(),
            metrics_port=free_port(),
            controller_metrics_port=free_port(),
            simulate=False,
            controller_args=("--scrape-interval-s", "0.25"),
        )
        with LocalStack(settings) as stack:
            yield Traffic(stack, ports, children)


def settle(
    traffic: Traffic, ok: Any, timeout: float = 20.0, quiet_s: float = 1.5
) -> dict[str, int]:
    """The weights once they satisfy `ok`, have not moved for `quiet_s` (six scrape rounds),
    and Envoy runs exactly those weights."""
    deadline = time.monotonic() + timeout
    last: dict[str, int] = {}
    since = time.monotonic()
    while True:
        weights = traffic.weights()
        now = time.monotonic()
        if weights != last:
            last, since = weights, now
        elif len(weights) == 3 and ok(weights) and now - since >= quiet_s:
            break
        assert now < deadline, f"weights did not settle as wanted within {timeout}s: {weights}"
        time.sleep(0.05)
    wait_for(
        traffic.envoy_weights, lambda e: e == {n: max(w, 1) for n, w in last.items()}, timeout=5
    )
    return last


def shares(weights: dict[str, int]) -> dict[str, float]:
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


def test_the_split_follows_load_and_a_longer_queue_shifts_traffic_away(traffic: Traffic) -> None:
    for name, waiting in zip(ENGINES, (0, 6, 20), strict=True):
        traffic.set_load(name, waiting=waiting)
    weights = settle(traffic, lambda w: w["a"] > w["b"] > w["c"] >= 1)
    split = traffic.split(300)
    assert traffic.weights() == weights  # real traffic on top of the set load moved nothing
    for name, expected in shares(weights).items():
        assert abs(split[name] - expected) <= TOLERANCE, (split, weights)

    traffic.set_load("a", waiting=40)  # the idle engine gets a long queue
    moved = settle(traffic, lambda w: w["a"] < w["c"] and w["b"] == max(w.values()))
    after = traffic.split(200)
    assert after["a"] < split["a"] - 0.2, (split, after)
    for name, expected in shares(moved).items():
        assert abs(after[name] - expected) <= TOLERANCE, (after, moved)


def test_weights_hold_still_under_steady_load(traffic: Traffic) -> None:
    for name, waiting in zip(ENGINES, (3, 8, 8), strict=True):
        traffic.set_load(name, waiting=waiting)
    settled = settle(traffic, lambda w: w["a"] > max(w["b"], w["c"]))
    seen = []
    deadline = time.monotonic() + 4  # 16 scrape rounds
    while time.monotonic() < deadline:
        seen.append(traffic.weights())
        time.sleep(0.1)
    assert all(w == settled for w in seen), {tuple(sorted(w.items())) for w in seen}


def test_a_controller_restart_mid_traffic_fails_no_request(traffic: Traffic) -> None:
    for name in ENGINES:
        traffic.set_load(name, waiting=0)
    settle(traffic, lambda w: min(w.values()) >= 50)
    failures: list[str] = []
    served = 0
    stop = threading.Event()

    def send() -> None:
        nonlocal served
        with traffic.client() as client:
            while not stop.is_set():
                answer = client.post(
                    "/v1/chat/completions",
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 2,
                    },
                )
                served += 1
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")

    sender = threading.Thread(target=send)
    sender.start()
    try:
        time.sleep(0.5)
        traffic.stack.restart_controller()
        time.sleep(0.5)
        traffic.set_load("c", waiting=30)  # the new controller programs Envoy
        settle(traffic, lambda w: w["c"] < w["a"])
    finally:
        stop.set()
        sender.join()
    assert served > 20 and failures == []


def test_an_engine_killed_mid_run_costs_no_client_an_error(traffic: Traffic) -> None:
    for name in ENGINES:
        traffic.set_load(name, waiting=0)
    settle(traffic, lambda w: min(w.values()) >= 50)  # c takes its share until it dies
    with traffic.client() as client:
        statuses, served_by = kill_mid_run(client, MODEL, traffic.sims["c"])
    assert statuses == {200: 150}
    weights = settle(traffic, lambda w: w["c"] == 0)  # drained once its scrapes fail
    assert weights["a"] > 0 and weights["b"] > 0 and served_by["c"] < 30
