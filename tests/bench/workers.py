"""`make bench`'s extproc-workers section: the gateway with one extproc process against two on
one port (`--workers 2`), both on Redis (workers must share their counters), same load,
interleaved.

    .venv/bin/python -m tests.bench.gateway --out docs/benchmarks.md --only workers

Starts its own redis-server (Debian's) on a free port. Envoy runs 2 threads in both
configurations (a worker gets connections, at least one per Envoy thread).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from launcher.procs import Supervisor, free_port
from tests.bench import report, targets, wrk
from tests.bench.workloads import chat, preflight, stream

BEGIN = "<!-- workers-bench: begin (python -m tests.bench.gateway --only workers replaces this section) -->"
END = "<!-- workers-bench: end -->"
ENVOY_THREADS = 2


@contextmanager
def redis_server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True
            ).stdout.strip()
            != "PONG"
        ):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start (apt-get install redis-server)")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


def run_section(*, quick: bool, command: str) -> str:
    from tests.bench.gateway import ENGINE_OUTPUT_TOKENS, Arm, Settings, measure

    settings = Settings.from_args(["--quick"] if quick else ["--duration", "24", "--rounds", "4"])
    wrk_bin = wrk.ensure_wrk()
    token = "sk-arks-bench-workers-" + uuid.uuid4().hex
    workloads = [chat(32), stream(32, client_asks_usage=True)]
    lines = [
        BEGIN,
        "## extproc workers: one process against two on one port",
        "",
        f"`{command}`; the gateway twice, its counters in Redis (a redis-server of the bench's "
        f"own), Envoy with {ENVOY_THREADS} threads in both, one simulated engine, interleaved "
        "rounds. Python CPU: every extproc process (with two workers, the parent and both) and "
        "the controller.",
        "",
        "| workload | 1 worker: req/s | 2 workers: req/s | ÷ | 1 worker: p99 ms | 2 workers: p99 ms "
        "| 1 worker: Python µs/req | 2 workers: Python µs/req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="arks-bench-workers-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        redis = stack.enter_context(redis_server())
        sup = stack.enter_context(Supervisor(log_dir=work / "logs"))
        engine_port = targets.start_engine(sup, ENGINE_OUTPUT_TOKENS)
        configs = [
            stack.enter_context(
                targets.gateway(
                    work, engine_port, token, ENVOY_THREADS, None, f"workers-{n}", redis, n
                )
            )
            for n in (1, 2)
        ]
        for workload in workloads:
            for target in configs:
                preflight(target.url, workload, token, target.name)
            results = measure(
                wrk_bin, [Arm(t.name, t, workload) for t in configs], work, token, settings
            )
            one, two = (results[(workload.key, t.name)] for t in configs)
            row = (
                f"| {workload.title} | {one.load.rps:.0f} | {two.load.rps:.0f} | "
                f"{two.load.rps / one.load.rps:.2f}x | {one.p99:.1f} | {two.p99:.1f} | "
                f"{one.python_us:.0f} | {two.python_us:.0f} |"
            )
            print(row, flush=True)
            lines.append(row)
    lines += [
        "",
        "On this 2-core machine Envoy, the engine and wrk already take most of the second core "
        "while one extproc process takes the first: a second worker has little CPU to run on. "
        "What it shows here is the cost (a second process's event loop and gRPC threads) and "
        "that nothing breaks; the gain needs idle cores (each worker is one more core's worth "
        "of decisions).",
        "",
        END,
    ]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    report.replace_section(path, BEGIN, END, text)
