"""`--workers N`: extproc (and the rate-limit service) as N processes on one gRPC port, sharing
their limits through Redis; refused without Redis; stopped whole, by a signal or when one dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from prometheus_client.parser import text_string_to_metric_families

from arks.api import token_digest
from launcher.procs import Child, Supervisor, free_port, wait_http
from tests.support import objects
from tests.support.gateway import headers_message
from tests.support.redis_server import PrivateRedis
from tests.support.stack import ALICE, running_stack
from tests.support.waiting import wait_for

TOKEN = "sk-workers-0123456789"
DAILY_LIMIT = 12
MAX_CONNECTIONS = 64  # new connections until both workers have answered (each lands on either)


def _policy(tmp: Path) -> Path:
    alice = objects.token("alice", ["qwen"], tokenHash=token_digest(TOKEN))
    alice["spec"]["qos"][0]["rateLimits"] = [{"type": "rpd", "value": DAILY_LIMIT}]
    path = tmp / "policy.yaml"
    path.write_text(yaml.safe_dump_all([objects.endpoint("qwen"), alice]))
    return path


@pytest.mark.parametrize(
    ("module", "args"),
    [("extproc", ["--policy", "POLICY"]), ("ratelimit", [])],
)
def test_workers_without_redis_are_refused_with_the_reason(
    module: str, args: list[str], tmp_path: Path
) -> None:
    args = [str(_policy(tmp_path)) if a == "POLICY" else a for a in args]
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert f"{module}: --workers 2 needs --redis" in done.stderr, done.stderr


def _headers_count(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith('arks_gateway_decision_seconds_count{phase="headers"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _ask(address: str, request_id: str) -> ep.ProcessingResponse:
    """One request's headers on a connection of its own (no channel shares its subchannel)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = ep_grpc.ExternalProcessorStub(channel)
        message = headers_message({"model": "qwen"}, token=TOKEN, request_id=request_id)
        (answer,) = list(stub.Process(iter([message]), timeout=10))
        return answer


def _pids_of_workers(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children]


def test_extproc_workers_share_one_port_and_enforce_one_limit(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    second_metrics = metrics_port + 1  # the second worker's
    address = f"127.0.0.1:{grpc_port}"
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        parent = sup.python(
            "extproc",
            "extproc",
            "--policy", str(_policy(tmp_path)),
            "--redis", private_redis.url,
            "--grpc-address", address,
            "--metrics-port", str(metrics_port),
            "--workers", "2",
        )  # fmt: skip
        wait_http(parent, f"http://127.0.0.1:{metrics_port}/metrics")
        wait_http(parent, f"http://127.0.0.1:{second_metrics}/metrics")

        answers = []
        while len(answers) < MAX_CONNECTIONS and (
            len(answers) < 2 * DAILY_LIMIT
            or min(_headers_count(metrics_port), _headers_count(second_metrics)) == 0
        ):
            answers.append(_ask(address, f"req-{len(answers)}"))

        # Both processes answered on the one port ...
        assert _headers_count(metrics_port) > 0 and _headers_count(second_metrics) > 0
        assert _headers_count(metrics_port) + _headers_count(second_metrics) == len(answers)
        # ... and the daily limit held across them: the counter is Redis's, not a worker's.
        forwarded = [a for a in answers if a.HasField("request_headers")]
        refused = [a for a in answers if a.HasField("immediate_response")]
        assert len(forwarded) == DAILY_LIMIT
        assert len(refused) == len(answers) - DAILY_LIMIT
        assert {a.immediate_response.status.code for a in refused} == {429}

        # A worker that dies takes the service down whole (its supervisor restarts it).
        pid = parent.popen.pid
        workers = _pids_of_workers(pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        assert parent.popen.wait(timeout=20) != 0
        deadline = time.monotonic() + 20
        while Path(f"/proc/{workers[1]}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{workers[1]}").exists()


def _ratelimit_workers(sup: Supervisor, redis: PrivateRedis) -> tuple[Child, list[int]]:
    """`python -m ratelimit --workers 2`, both workers serving: the parent and their pids."""
    metrics_port = free_port()
    parent = sup.python(
        "ratelimit",
        "ratelimit",
        "--redis", redis.url,
        "--grpc-address", f"127.0.0.1:{free_port()}",
        "--metrics-port", str(metrics_port),
        # its HTTP and debug ports off upstream's defaults (8080, 6070)
        "--port", str(free_port()), "--debug-port", str(free_port()),
        "--workers", "2",
    )  # fmt: skip
    wait_http(parent, f"http://127.0.0.1:{metrics_port}/metrics")
    wait_http(parent, f"http://127.0.0.1:{metrics_port + 1}/metrics")
    workers = _pids_of_workers(parent.popen.pid)
    assert len(workers) == 2
    return parent, workers


def test_a_signal_to_the_parent_stops_every_worker(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        parent, workers = _ratelimit_workers(sup, private_redis)

        parent.popen.send_signal(signal.SIGTERM)
        assert parent.popen.wait(timeout=30) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_workers_die_with_a_parent_killed_outright(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        parent, workers = _ratelimit_workers(sup, private_redis)

        parent.popen.kill()
        parent.popen.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(Path(f"/proc/{pid}").exists() for pid in workers):
            assert time.monotonic() < deadline, "a worker outlived its parent"
            time.sleep(0.05)


CAROL = "sk-workers-carol-4c1d"
CAROL_DAILY = 30


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _total(ports: list[int], name: str, **labels: str) -> float:
    return sum(
        value
        for port in ports
        for (n, have), value in _samples(port).items()
        if n == name and all(dict(have).get(k) == v for k, v in labels.items())
    )


def test_the_local_stack_with_two_workers_serves_charges_and_limits_once(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """Through real Envoy, whose ext_proc streams spread over several connections to the one
    port: every answer charged once whichever worker admitted or settled it, and a limit
    enforced once across the workers."""
    carol = objects.token("carol", ["model-a"], tokenHash=token_digest(CAROL))
    carol["spec"]["qos"][0]["rateLimits"] = [{"type": "rpd", "value": CAROL_DAILY}]
    # 16 Envoy threads, each with its own connections to extproc's port: the kernel spreads them
    # over the two workers (all on one: 1 in 30,000), as a cluster's many-threaded Envoys do.
    with running_stack(
        tmp_path,
        extra_documents=[carol],
        redis=private_redis.url,
        extproc_workers=2,
        envoy_concurrency=16,
    ) as stack:
        base = stack.local.settings.metrics_port
        ports = [base, base + 1]

        def chat(_: int, key: str = ALICE) -> openai.types.chat.ChatCompletion | int:
            try:
                return stack.client(api_key=key, timeout=30).chat.completions.create(
                    model="model-a", messages=[{"role": "user", "content": "hi"}]
                )
            except openai.APIStatusError as err:
                return err.status_code

        answers: list[openai.types.chat.ChatCompletion | int] = []
        with ThreadPoolExecutor(64) as pool:
            for _ in range(3):  # bursts until both workers have decided some requests
                answers += pool.map(chat, range(64))
                counts = [
                    _total([p], "arks_gateway_decision_seconds_count", phase="headers")
                    for p in ports
                ]
                if min(counts) > 0:
                    break
            assert min(counts) > 0, counts
            done = [a for a in answers if not isinstance(a, int)]
            assert len(done) == len(answers)  # every one answered
            prompt = sum(a.usage.prompt_tokens for a in done if a.usage)
            completion = sum(a.usage.completion_tokens for a in done if a.usage)
            wait_for(
                lambda: _total(ports, "arks_requests_total", user="alice"),
                lambda n: n >= len(done),
                timeout=15,
            )
            assert _total(ports, "arks_requests_total", user="alice") == len(done)
            assert _total(ports, "arks_usage_tokens_total", user="alice", type="prompt") == prompt
            assert (
                _total(ports, "arks_usage_tokens_total", user="alice", type="completion")
                == completion
            )

            carols = list(pool.map(lambda i: chat(i, CAROL), range(CAROL_DAILY + 12)))
        assert sum(1 for a in carols if not isinstance(a, int)) == CAROL_DAILY
        assert sorted(a for a in carols if isinstance(a, int)) == [429] * 12


def test_arks_up_refuses_workers_without_redis(tmp_path: Path) -> None:
    arks = Path(sys.executable).parent / "arks"
    done = subprocess.run(
        [str(arks), "up", "--extproc-workers", "3", "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--extproc-workers 3 needs --redis" in done.stderr, done.stderr
