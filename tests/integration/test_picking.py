"""Endpoint picking through real Envoy: extproc picks the engine of each request of a
least-load or prefix-cache endpoint from the engines' scraped load, Envoy's override_host
policy sends it there (and retries on the listed fallbacks). Three simulated engines whose
load the test sets; the engine that served says so in `x-sim-instance`.

The stack runs extproc with `--picker-fail-closed`, so the endpoint whose only engine is down
answers 503; failing open (Envoy balances) is covered by the unit tests.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from arks.api import token_digest
from launcher.procs import Child, Supervisor, free_port, wait_http
from launcher.stack import LocalStack, StackSettings
from tests.support.objects import token
from tests.support.stack import kill_mid_run
from tests.support.waiting import wait_for

TOKEN = "sk-arks-picking-test-0001"
LEAST, PREFIX, GHOST = "least", "prefix", "ghost"
ENGINES = ("a", "b", "c")
DESTINATION = "x-gateway-destination-endpoint"
SYSTEM_1 = "You are the ship's navigator. Answer with bearings and distances only. " * 30
SYSTEM_2 = "You are a patient chemistry tutor; explain every step of a reaction. " * 30

SCRAPE_INTERVAL_S = 0.25  # extproc's, for these tests

pytestmark = pytest.mark.timeout(120)


@dataclass
class Picking:
    stack: LocalStack
    ports: dict[str, int]
    sims: dict[str, Child]

    def set_load(self, name: str, waiting: int = 0) -> None:
        answer = httpx.put(
            f"http://127.0.0.1:{self.ports[name]}/sim/load", json={"waiting": waiting}, timeout=5
        )
        answer.raise_for_status()

    def loads(self, **waiting: int) -> None:
        """Set every live engine's queue, then wait two scrape rounds so that extproc saw them all
        (a round between two of these PUTs sees some old and some new loads)."""
        for name in ENGINES:
            if name in waiting or self.sims[name].popen.poll() is None:
                self.set_load(name, waiting.get(name, 0))
        time.sleep(2.5 * SCRAPE_INTERVAL_S)

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.stack.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10
        )

    def ask(
        self,
        client: httpx.Client,
        model: str = LEAST,
        messages: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        answer = client.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": messages or [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
            },
            headers=headers,
        )
        assert answer.status_code == 200, answer.text
        return answer.headers["x-sim-instance"]

    def picks_move_to(
        self, name: str, model: str = LEAST, messages: list[dict[str, str]] | None = None
    ) -> None:
        """Wait until the picker saw the new load (next scrape) and sends `name` the request."""
        with self.client() as client:
            wait_for(
                lambda: self.ask(client, model, messages), lambda served: served == name, timeout=10
            )

    def connect_failures(self, name: str) -> int:
        """Envoy's failed connections to an engine, in the least-load endpoint's cluster."""
        clusters = httpx.get(f"{self.stack.admin_url}/clusters?format=json", timeout=5).json()
        for cluster in clusters.get("cluster_statuses", []):
            if cluster["name"] != f"endpoint/default/{LEAST}":
                continue
            for host in cluster.get("host_statuses", []):
                if host["address"]["socket_address"]["port_value"] == self.ports[name]:
                    stats = {s["name"]: int(s.get("value", 0)) for s in host.get("stats", [])}
                    return stats.get("cx_connect_fail", 0)
        raise AssertionError(f"engine {name} not in Envoy's cluster")


def policy(ports: dict[str, int], ghost_port: int) -> list[dict[str, Any]]:
    def backend(name: str, addresses: list[int]) -> dict[str, Any]:
        return {
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "Backend",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"endpoints": [{"ip": {"address": "127.0.0.1", "port": p}} for p in addresses]},
        }

    def endpoint(model: str, weighting: str, pool: str) -> dict[str, Any]:
        return {
            "apiVersion": "arks.ai/v1",
            "kind": "ArksEndpoint",
            "metadata": {"name": model, "namespace": "default"},
            "spec": {
                "weighting": weighting,
                "routeConfigs": [
                    {"group": "gateway.envoyproxy.io", "kind": "Backend", "name": pool}
                ],
            },
        }

    return [
        backend("pool", [ports[n] for n in ENGINES]),
        backend("nowhere", [ghost_port]),
        endpoint(LEAST, "least-load", "pool"),
        endpoint(PREFIX, "prefix-cache", "pool"),
        endpoint(GHOST, "least-load", "nowhere"),
        token("alice", [LEAST, PREFIX, GHOST], tokenHash=token_digest(TOKEN)),
    ]


@pytest.fixture(scope="module")
def picking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Picking]:
    tmp: Path = tmp_path_factory.mktemp("picking")
    ports = {name: free_port() for name in ENGINES}
    policy_path = tmp / "policy.yaml"
    policy_path.write_text(yaml.safe_dump_all(policy(ports, free_port())))
    with Supervisor(log_dir=tmp / "logs") as sims:
        children = {}
        for name in ENGINES:
            children[name] = sims.python(
                f"sim-{name}",
                "launcher.sim",
                "--port",
                str(ports[name]),
                "--model",
                LEAST,
                "--model",
                PREFIX,
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
            extproc_args=("--picker-fail-closed", "--picker-interval-s", str(SCRAPE_INTERVAL_S)),
        )
        with LocalStack(settings) as stack:
            ready = Picking(stack, ports, children)
            with ready.client() as client:  # fail closed: 503 until extproc's first scrape
                wait_for(
                    lambda: (
                        client.post(
                            "/v1/chat/completions", json={"model": LEAST, "messages": []}
                        ).status_code
                    ),
                    lambda status: status == 200,
                    timeout=15,
                )
            yield ready


def test_least_load_sends_every_request_to_the_least_loaded_engine_and_follows_its_load(
    picking: Picking,
) -> None:
    picking.loads(a=40, b=0, c=90)
    picking.picks_move_to("b")
    with picking.client() as client:
        served = collections.Counter(picking.ask(client) for _ in range(40))
    assert served == {"b": 40}

    picking.loads(a=40, b=200, c=90)  # b gets a long queue: a is now the least loaded
    picking.picks_move_to("a")
    with picking.client() as client:
        served = collections.Counter(picking.ask(client) for _ in range(40))
    assert served == {"a": 40}


def test_a_client_cannot_choose_the_engine(picking: Picking) -> None:
    picking.loads(a=0, b=40, c=90)
    picking.picks_move_to("a")
    forged = {DESTINATION: f"127.0.0.1:{picking.ports['c']}"}
    with picking.client() as client:
        served = collections.Counter(picking.ask(client, headers=forged) for _ in range(20))
    assert served == {"a": 20}


def conversation(system: str, turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question {i}: where to next?"})
        if i < turns - 1:
            messages.append(
                {"role": "assistant", "content": f"Bearing {i * 17 % 360}, {i + 3} miles."}
            )
    return messages


def test_prefix_cache_keeps_a_conversation_on_one_engine_until_that_engine_is_busy(
    picking: Picking,
) -> None:
    picking.loads()  # every engine idle
    with picking.client() as client:
        first = [picking.ask(client, PREFIX, conversation(SYSTEM_1, turn)) for turn in range(1, 21)]
        other = [picking.ask(client, PREFIX, conversation(SYSTEM_2, turn)) for turn in range(1, 6)]
    assert len(set(first)) == 1, first  # 20 turns sharing a long system prompt: one engine
    assert len(set(other)) == 1, other  # another conversation has its own (which may be the same)
    holder = first[0]

    picking.set_load(holder, waiting=50)  # the holder gets a long queue: the conversation moves
    with picking.client() as client:
        moved = wait_for(
            lambda: picking.ask(client, PREFIX, conversation(SYSTEM_1, 21)), lambda s: s != holder
        )
        after = [
            picking.ask(client, PREFIX, conversation(SYSTEM_1, turn)) for turn in range(22, 27)
        ]
    assert set(after) == {moved}  # and stays where it went

    prefix_hits = picking_metric(picking, PREFIX, "prefix_hit")
    assert prefix_hits >= 19 + 4 + 5


def test_a_streamed_prefix_cache_request_still_gets_its_usage(picking: Picking) -> None:
    """The body is read for the prompt only; Envoy's Lua filter still asks the engine for usage
    (charged exactly), and removes the usage chunk the client did not ask for."""
    picking.loads()
    body = {"model": PREFIX, "messages": conversation(SYSTEM_2, 2), "max_tokens": 3, "stream": True}
    before = completion_tokens(picking, PREFIX)
    with picking.client() as client:
        answer = client.post("/v1/chat/completions", json=body)

    assert answer.status_code == 200, answer.text
    events = [
        line.removeprefix("data: ")
        for line in answer.text.splitlines()
        if line.startswith("data: {")
    ]
    assert events and not any('"usage"' in event for event in events)
    wait_for(lambda: completion_tokens(picking, PREFIX) - before, lambda d: d == 3, timeout=10)


def completion_tokens(picking: Picking, model: str) -> float:
    text = httpx.get(picking.stack.metrics_url, timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "arks_usage_tokens_total"
        and sample.labels.get("model") == model
        and sample.labels.get("type") == "completion"
    )


def picking_metric(picking: Picking, model: str, reason: str) -> float:
    text = httpx.get(picking.stack.metrics_url, timeout=5).text
    wanted = {"namespace": "default", "model": model, "reason": reason}
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "arks_picks_total" and sample.labels == wanted
    )


def test_fail_closed_answers_503_when_no_engine_can_be_picked(picking: Picking) -> None:
    with picking.client() as client:
        answer = client.post(
            "/v1/chat/completions",
            json={"model": GHOST, "messages": [{"role": "user", "content": "hi"}]},
        )

    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "no_backend"
    assert picking_metric(picking, GHOST, "refused") >= 1


def test_an_engine_killed_mid_run_costs_no_client_an_error_and_is_no_longer_picked(
    picking: Picking,
) -> None:
    picking.loads()  # equal loads: our own picks in flight spread the requests over all three
    with picking.client() as client:
        statuses, served = kill_mid_run(client, LEAST, picking.sims["c"])
    assert statuses == {200: 150}  # picks of the dead engine were retried on their fallbacks
    assert served["c"] > 0 and served["a"] > 0 and served["b"] > 0

    time.sleep(1.0)  # its scrapes have failed: out of the picks
    before = picking.connect_failures("c")
    assert before > 0  # c was picked after it died: those attempts went to the fallbacks
    with picking.client() as client:
        after = collections.Counter(picking.ask(client) for _ in range(40))
    assert picking.connect_failures("c") == before  # not even tried
    assert set(after) == {"a", "b"}
