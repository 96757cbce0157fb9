"""Faults under load, with what was charged compared to the engine's own count (the simulator
reports exactly what it processed): Redis restarting empty and with its append-only file, the
gateway SIGKILLed (and restarted by the supervisor, as `arks up` does), an engine SIGKILLed
mid-stream, clients leaving mid-stream, and an engine that stalls."""

from __future__ import annotations

import json
import os
import random
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from arks.api import token_digest
from arks.tokens import count_prompt
from launcher.procs import Backoff
from tests.chaos.attack import (
    Answer,
    charged_tokens,
    engine_running,
    engine_tokens,
    quota_doc,
    wave,
)
from tests.chaos.figures import Figure, Recorder
from tests.chaos.load import Load, Outcome, during, one_request, redis_ledger, settled
from tests.support.objects import token
from tests.support.redis_server import PrivateRedis
from tests.support.stack import running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

GROUP = "Faults under load (usage vs engine truth)"
SECRET = "sk-arks-chaos-faults-0123456789"
MESSAGES = [{"role": "user", "content": "Count to three."}]
CHAT = {"model": "model-a", "messages": MESSAGES, "max_tokens": 20}
STREAM = {**CHAT, "stream": True}
AUTH = {"authorization": f"Bearer {SECRET}"}
SNAPSHOT_S = 0.5  # running_stack's --snapshot-interval-s


def tenant(user: str, quota: str, **limits: int) -> list[dict]:
    doc = token(user, ["model-a"], tokenHash=token_digest(SECRET))
    doc["spec"]["qos"][0]["quota"] = {"name": quota}
    if limits:
        doc["spec"]["qos"][0]["rateLimits"] = [{"type": k, "value": v} for k, v in limits.items()]
    return [quota_doc(quota, 10**12), doc]


def held_count(outcomes: list[Outcome], *refusals: object) -> int:
    return sum(o.held(frozenset(refusals)) for o in outcomes)


def record(
    figures: Recorder,
    attack: str,
    parameters: dict,
    outcomes: list[Outcome],
    held: int,
    engine: int | None,
    charged: int | None,
    note: str = "",
    lost_allowed: tuple[float, float] | None = None,
) -> Figure:
    extra = {"lost_allowed": list(lost_allowed)} if lost_allowed else {}
    figure = Figure(GROUP, attack, parameters, len(outcomes), held, engine, charged, note, extra)
    figures.record(figure)
    return figure


@pytest.fixture
def user() -> str:
    return f"chaos-{uuid.uuid4().hex[:6]}"


# --- Redis restarts ------------------------------------------------------------------------------


@pytest.mark.parametrize("persistence", ["empty", "aof"])
def test_a_redis_restart_under_load_loses_at_most_what_the_readme_promises(
    tmp_path: Path, figures: Recorder, user: str, persistence: str
) -> None:
    """10 clients; Redis SIGKILLed 1 s in and back 1 s later, empty or from its append-only
    file. Every request is answered (the gateway fails open) and counted in the metrics exactly;
    the quota ledger loses nothing (empty) or at most the last second Redis had not written to
    its file (AOF) — README, "What can be lost"."""
    server = PrivateRedis(aof_dir=tmp_path / "aof" if persistence == "aof" else None)
    server.start()
    try:
        with running_stack(tmp_path / "stack", tenant(user, user), redis=server.url) as stack:
            engine_before = engine_tokens(stack.sim_ports["a"], "model-a")
            load = Load(stack.url, 10, CHAT, AUTH)
            started = time.monotonic()
            during(load, 3.0, (1.0, server.kill), (2.0, server.start))
            outcomes = load.stop()
            seconds = time.monotonic() - started
            charged = charged_tokens(stack, user, "model-a")
            engine = engine_tokens(stack.sim_ports["a"], "model-a") - engine_before
            time.sleep(3 * SNAPSHOT_S)  # restored and settled into the ledger
            ledger = wait_for(lambda: redis_ledger(server.url, user), lambda v: v > 0, timeout=10)
            held = held_count(outcomes)
            # Empty: nothing (the snapshot follows every settlement, the wipe is detected and the
            # snapshot added back). AOF: the last second Redis had not written (everysec).
            allowed = 0.0 if persistence == "empty" else engine / seconds * 1.2
            record(
                figures,
                f"Redis restart ({persistence})",
                {"clients": 10, "outage_s": 1.0, "load_s": 3.0},
                outcomes,
                held,
                engine,
                ledger,
                note=f"charged: the quota ledger in Redis (may lose ≤ {allowed:.0f}); the metrics "
                f"counted {charged}",
                lost_allowed=(0, allowed),
            )
    finally:
        server.kill()
    assert held == len(outcomes), [o for o in outcomes if not o.held(frozenset())][:3]
    assert charged == engine  # the gateway's own count never missed a token
    assert 0 <= engine - ledger <= allowed, (engine, ledger, allowed)


# --- the gateway killed --------------------------------------------------------------------------


def test_a_killed_gateway_is_restarted_and_loses_only_the_requests_in_flight(
    tmp_path: Path, figures: Recorder, user: str
) -> None:
    """10 streaming clients; the gateway SIGKILLed 1.5 s in, restarted by the supervisor. While
    it is away the answers are 503 `gateway_unavailable`; it serves again within seconds; the
    ledger (in Redis) lacks at most the requests in flight at the kill."""
    clients, tokens = 10, 20
    with running_stack(tmp_path, tenant(user, user), redis="redis://127.0.0.1:6379/0") as stack:
        lines: list[str] = []
        stack.local.supervisor.supervise(lines.append, poll_s=0.1, backoff=Backoff(first_s=0.3))
        extproc = next(c for c in stack.local.supervisor.children if c.name == "extproc")
        engine_before = engine_tokens(stack.sim_ports["a"], "model-a")
        headers = {**AUTH, "x-sim-output-tokens": str(tokens), "x-sim-tpot-ms": "10"}
        load = Load(stack.url, clients, STREAM, headers)
        killed_at: list[float] = []

        def kill() -> None:
            os.killpg(extproc.popen.pid, signal.SIGKILL)
            killed_at.append(time.monotonic())

        during(load, 4.0, (1.5, kill))
        outcomes = load.stop()
        back = wait_for(
            lambda: one_request(httpx.Client(base_url=stack.url, timeout=10), CHAT, AUTH),
            lambda o: o.status == 200,
            timeout=10,
        )
        back_after = time.monotonic() - killed_at[0]
        engine = engine_tokens(stack.sim_ports["a"], "model-a") - engine_before
        ledger = settled(lambda: redis_ledger("redis://127.0.0.1:6379/0", user))
        per_request = engine / max(1, sum(o.status == 200 for o in outcomes))
        # README: the usage of the requests in flight at the kill is lost. In flight: the one
        # each client is being answered and the one before it, whose access-log entry may still
        # have been on its way (measured: 10 to 15 requests' usage lost under 10 clients)
        allowed = 2 * clients * per_request
        held = held_count(outcomes, "gateway_unavailable")
        record(
            figures,
            "gateway SIGKILL (supervised restart)",
            {"clients": clients, "stream_tokens": tokens, "load_s": 4.0},
            outcomes,
            held,
            engine,
            ledger,
            note=f"charged: the quota ledger in Redis; serving again {back_after:.1f} s after "
            f"the kill; supervisor: {lines[0].split(' (log:')[0] if lines else 'silent'}",
            lost_allowed=(0, allowed),
        )
    assert back.status == 200
    assert any("restart" in line for line in lines), lines
    assert len(outcomes) - held <= clients, [o for o in outcomes if not o.held(frozenset())][:5]
    assert 0 <= engine - ledger <= allowed, (engine, ledger, allowed)


# --- engines and clients -------------------------------------------------------------------------


def test_an_engine_killed_mid_stream_is_charged_what_reached_the_clients(
    tmp_path: Path, figures: Recorder, user: str
) -> None:
    """20 long streams at once; their engine SIGKILLed half-way. Every request is charged (an
    estimate: no usage came), close to the prompt plus the tokens that reached the client."""
    clients = 20
    with running_stack(tmp_path, tenant(user, user)) as stack:
        # 200 tokens every 15 ms: 3 s, so all 20 run at once however slowly the clients start
        headers = {**AUTH, "x-sim-output-tokens": "200", "x-sim-tpot-ms": "15"}
        body = {**STREAM, "max_tokens": 200}
        before = stack.usage(user, "model-a")

        def one(_: int) -> Outcome:
            with httpx.Client(base_url=stack.url, timeout=30) as client:
                return one_request(client, body, headers)

        with ThreadPoolExecutor(clients) as pool:
            running = pool.map(one, range(clients))
            port = stack.sim_ports["a"]
            wait_for(lambda: engine_running(port, "model-a"), lambda n: n >= clients, timeout=20)
            time.sleep(0.5)  # every stream some 30 tokens in
            stack.engines["a"].popen.kill()
            outcomes = list(running)
        usage = stack.wait_usage(user, "model-a", before, requests=clients)
        admitted = sum(o.status == 200 for o in outcomes)
        delivered = sum(o.tokens for o in outcomes) + admitted * count_prompt(body)
        cut = sum(o.status == 200 and not o.complete for o in outcomes)
        # held: each request answered as far as the engine got, or refused, and charged once
        held = clients if usage.requests == clients else 0
        record(
            figures,
            "engine SIGKILL mid-stream",
            {"clients": clients, "stream_tokens": 200, "tpot_ms": 15},
            outcomes,
            held,
            delivered,
            usage.prompt + usage.completion,
            note=f"truth: prompt + tokens delivered to clients; {cut} streams cut, "
            f"{usage.estimated} charged an estimate",
            lost_allowed=(-0.2 * delivered, 0.2 * delivered),
        )
    assert usage.requests == clients  # every request counted, none twice
    assert cut >= clients // 2, outcomes  # the kill did cut the streams under way
    assert abs(delivered - (usage.prompt + usage.completion)) <= 0.2 * delivered


def test_clients_leaving_mid_stream_are_charged_close_to_what_the_engine_did(
    tmp_path: Path, figures: Recorder, user: str
) -> None:
    """20 streams of 200 tokens, 10 at a time, each client leaving after a seeded random number
    of chunks: each is charged once, an estimate close to what the engine did."""
    clients = 20
    rng = random.Random(10)
    with running_stack(tmp_path, tenant(user, user)) as stack:
        engine_before = engine_tokens(stack.sim_ports["a"], "model-a")
        before = stack.usage(user, "model-a")
        body = {**STREAM, "max_tokens": 200}
        headers = {**AUTH, "x-sim-output-tokens": "200", "x-sim-tpot-ms": "5"}
        leave_after = [rng.randint(1, 150) for _ in range(clients)]

        def one(chunks: int) -> int:
            seen = 0
            with (
                httpx.Client(base_url=stack.url, timeout=30) as client,
                client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r,
            ):
                for line in r.iter_lines():
                    seen += line.startswith("data: ")
                    if seen >= chunks:
                        break
            return seen

        with ThreadPoolExecutor(10) as pool:
            received = list(pool.map(one, leave_after))
        usage = stack.wait_usage(user, "model-a", before, requests=clients)
        engine = engine_tokens(stack.sim_ports["a"], "model-a") - engine_before
        charged = usage.prompt + usage.completion
        outcomes = [Outcome(200, None, True, n) for n in received]
        record(
            figures,
            "clients leave mid-stream",
            {"clients": clients, "stream_tokens": 200, "tpot_ms": 5},
            outcomes,
            clients if usage.requests == clients else 0,
            engine,
            charged,
            note=f"{usage.estimated} charged an estimate",
            lost_allowed=(-0.2 * engine, 0.2 * engine),
        )
    assert usage.requests == clients
    assert abs(engine - charged) <= 0.2 * engine, (engine, charged)


def test_a_stalled_engine_frees_its_slots_and_the_tenant_recovers(
    tmp_path: Path, figures: Recorder, user: str
) -> None:
    """The engine SIGSTOPped for 3 s under 8 clients with a 2 s timeout (concurrency 8): the
    clients give up, their slots come back, every request is charged once, and once the
    engine resumes the tenant gets all 8 slots again."""
    clients = 8
    with running_stack(tmp_path, tenant(user, user, concurrency=clients)) as stack:
        engine = stack.engines["a"]
        engine_before = engine_tokens(stack.sim_ports["a"], "model-a")
        before = stack.usage(user, "model-a")
        load = Load(stack.url, clients, CHAT, AUTH, timeout=2)
        during(
            load,
            5.0,
            (1.0, lambda: engine.popen.send_signal(signal.SIGSTOP)),
            (4.0, lambda: engine.popen.send_signal(signal.SIGCONT)),
        )
        outcomes = load.stop()

        waves: list[list[Answer]] = []  # every wave is charged for what it got, not only the last

        def next_wave() -> list[Answer]:
            waves.append(wave(stack.url, clients, json.dumps(CHAT).encode(), AUTH))
            return waves[-1]

        again = wait_for(
            next_wave,
            lambda answers: all(a.status == 200 for a in answers),
            timeout=15,
            interval=0.5,
        )
        usage = stack.usage(user, "model-a") - before
        early = [a for answers in waves[:-1] for a in answers]
        tried = len(outcomes) + len(early) + len(again)
        engine_total = engine_tokens(stack.sim_ports["a"], "model-a") - engine_before
        timed_out = sum(o.status == 0 for o in outcomes)
        # held: answered, given up by the client, or refused for a slot still held by a request
        # the engine has not answered
        held = held_count(outcomes, "rate_limit_exceeded") + timed_out + len(again)
        record(
            figures,
            "engine stalled 3 s (SIGSTOP)",
            {"clients": clients, "client_timeout_s": 2, "stall_s": 3},
            outcomes + [Outcome(a.status, None, True, 0) for a in again],
            held,
            engine_total,
            usage.prompt + usage.completion,
            note=f"{timed_out} clients timed out; {usage.estimated} charged an estimate",
        )
    assert all(a.status == 200 for a in again)
    refused = sum(o.status not in (0, 200) for o in outcomes) + sum(a.status != 200 for a in early)
    assert usage.requests == tried - refused
