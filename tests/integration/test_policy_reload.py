"""Editing the policy file re-keys extproc and re-routes Envoy without a restart."""

from __future__ import annotations

import copy
import threading
import time

import httpx
import yaml

from arks.api import token_digest
from arks.policy import load_policy_file
from tests.support.objects import backend, endpoint, token
from tests.support.stack import ALICE, BOB, Stack, base_policy
from tests.support.waiting import wait_for

CAROL = "sk-arks-test-carol-93be01"


def status(stack: Stack, api_key: str, model: str) -> int:
    resp = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {api_key}"},
        timeout=10,
    )
    return resp.status_code


def test_policy_changes_apply_while_running_and_a_bad_file_keeps_the_last_good_one(
    stack: Stack,
) -> None:
    assert status(stack, CAROL, "model-a") == 401
    assert status(stack, BOB, "model-a") == 200

    # Add carol and a new model served by sim-b's engine under another Backend; revoke bob.
    documents = [d for d in copy.deepcopy(stack.documents) if d["metadata"]["name"] != "bob"]
    documents += [
        token("carol", ["model-a", "model-c"], tokenHash=token_digest(CAROL)),
        backend("sim-c", stack.sim_ports["b"]),
        endpoint("model-c", "sim-c"),
    ]
    stack.write_policy(documents)
    wait_for(lambda: status(stack, CAROL, "model-a"), lambda s: s == 200, timeout=10)
    wait_for(lambda: status(stack, BOB, "model-a"), lambda s: s == 401, timeout=10)
    # The new route reaches the engine (it serves model-b only, so it answers 404 for model-c:
    # that answer comes from the engine, past Envoy's new route).
    wait_for(
        lambda: httpx.post(
            f"{stack.url}/v1/chat/completions",
            json={"model": "model-c", "messages": []},
            headers={"authorization": f"Bearer {CAROL}"},
        ).headers.get("x-sim-instance"),
        lambda instance: instance == "sim-b",
        timeout=10,
    )

    # A broken file: the last good policy stays in force, and the log names the problem.
    broken = copy.deepcopy(documents)
    broken[-3]["spec"]["qos"][0]["rateLimits"] = [{"type": "rph", "value": 1}]
    stack.write_policy(broken)
    extproc_log = stack.local.settings.state_dir / "logs" / "extproc.log"
    wait_for(extproc_log.read_text, lambda text: "rateLimits[0].type" in text, timeout=10)
    text = extproc_log.read_text()
    assert "policy reload failed, keeping the last good policy" in text
    assert f"{stack.policy_path}: document {len(broken) - 2}" in text  # file and document
    assert status(stack, CAROL, "model-a") == 200
    assert status(stack, ALICE, "model-a") == 200
    assert status(stack, BOB, "model-a") == 401


def test_a_truncated_or_emptied_policy_file_never_becomes_the_policy(stack: Stack) -> None:
    """An editor or a template truncates the file and writes it again in place, under traffic:
    every request is served by the last good policy, and the log says why the others were not."""
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            statuses.append(status(stack, ALICE, "model-a"))

    good = stack.policy_path.read_text()
    documents = good.split("\n---\n")
    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        stack.policy_path.write_text("")  # truncated in place
        time.sleep(1.5)
        stack.policy_path.write_text("# being regenerated\n")
        time.sleep(1.5)
        stack.policy_path.write_text(documents[0] + "\n")  # cut after its first object
        time.sleep(1.5)
        stack.policy_path.write_text(good)  # the writer finishes
        time.sleep(1.5)
    finally:
        stop.set()
        sender.join()
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    text = (stack.local.settings.state_dir / "logs" / "extproc.log").read_text()
    assert "no objects (an empty or comment-only file is not a policy)" in text
    assert "would remove every token" in text


def test_a_large_policy_file_is_reloaded_without_stalling_requests(stack: Stack) -> None:
    """A policy file of thousands of tokens takes about a second to parse: extproc parses it
    off its request loop, so requests keep being answered meanwhile (on the loop, every one
    in flight waited out the whole parse)."""
    good = base_policy(stack.sim_ports)  # the stack's first policy (earlier tests changed it)
    many = [
        token(f"bulk-{i}", ["model-a"], tokenHash=token_digest(f"sk-bulk-{i}")) for i in range(8000)
    ]
    documents = [*good, *many, token("carol", ["model-a"], tokenHash=token_digest(CAROL))]
    path = stack.policy_path.with_name("large-policy.yaml")
    path.write_text(yaml.safe_dump_all(documents))
    started = time.monotonic()
    load_policy_file(path)
    parse_s = time.monotonic() - started
    assert parse_s > 0.4  # large enough to show a stall (here, in a process of its own)

    latencies: list[float] = []
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            statuses.append(status(stack, ALICE, "model-a"))
            latencies.append(time.monotonic() - sent)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        stack.write_policy(documents)
        wait_for(lambda: status(stack, CAROL, "model-a"), lambda s: s == 200, timeout=30)
    finally:
        stop.set()
        sender.join()
        stack.write_policy(good)
    wait_for(lambda: status(stack, CAROL, "model-a"), lambda s: s == 401, timeout=30)
    assert set(statuses) == {200}, sorted(set(statuses))
    assert len(latencies) > 20
    assert max(latencies) < parse_s / 2, (max(latencies), parse_s)
