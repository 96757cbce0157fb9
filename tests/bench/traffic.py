"""The traffic control plane's figures (part of `make bench`; `--only traffic` runs just these):

1. Propagation: how long from an engine's load change (its /metrics) until Envoy runs the new
   weights — the scrape interval, the weight tracker's smoothing, the snapshot and the xDS push,
   read on Envoy's admin `/clusters`. Measured at the controller's default scrape interval and
   at a short one.
2. The xDS push of one weight change among many models, state of the world against delta
   (`tests/bench/xds_push.py`).
3. Picking: the per-request cost of the gateway picking the engine (`least-load`, and
   `prefix-cache`, which reads the body) against weighted routing (`weighted`), all in one
   stack, arms interleaved: Python CPU per request of the gateway process and the latency the
   client sees.

    .venv/bin/python -m tests.bench.traffic [--out docs/benchmarks.md] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from arks.api import token_digest
from launcher.procs import Supervisor, free_port, wait_http
from launcher.stack import LocalStack, StackSettings
from tests.bench import report, xds_push
from tests.support.cpu import cpu_seconds

BEGIN = "<!-- traffic-bench: begin (python -m tests.bench.traffic replaces this section) -->"
END = "<!-- traffic-bench: end -->"
TOKEN = "sk-arks-bench-traffic-0001"
ENGINES = ("a", "b", "c")
BUSY_WAITING = 30  # the changed engine's queue: far enough to move its weight for sure


@dataclass(frozen=True)
class Settings:
    trials: int = 8  # load changes per scrape interval
    intervals_s: tuple[float, ...] = (1.0, 0.25)  # 1.0: what `arks up` runs
    requests: int = 600  # per picking arm and round
    rounds: int = 3
    models: int = 300  # for the xDS push figures
    pushes: int = 20
    quick: bool = False

    @classmethod
    def smoke(cls) -> Settings:
        return cls(
            trials=2, intervals_s=(0.25,), requests=60, rounds=1, models=20, pushes=2, quick=True
        )


@dataclass
class Engines:
    ports: dict[str, int]

    def set_waiting(self, name: str, waiting: int) -> None:
        httpx.put(
            f"http://127.0.0.1:{self.ports[name]}/sim/load", json={"waiting": waiting}, timeout=5
        ).raise_for_status()


def _policy(ports: dict[str, int]) -> list[dict[str, Any]]:
    backend = {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "Backend",
        "metadata": {"name": "pool", "namespace": "default"},
        "spec": {
            "endpoints": [{"ip": {"address": "127.0.0.1", "port": ports[n]}} for n in ENGINES]
        },
    }
    endpoints: list[dict[str, Any]] = [
        {
            "apiVersion": "arks.ai/v1",
            "kind": "ArksEndpoint",
            "metadata": {"name": f"bench-{weighting}", "namespace": "default"},
            "spec": {
                "weighting": weighting,
                "routeConfigs": [
                    {"group": "gateway.envoyproxy.io", "kind": "Backend", "name": "pool"}
                ],
            },
        }
        for weighting in ("weighted", "least-load", "prefix-cache")
    ]
    models = [f"bench-{w}" for w in ("weighted", "least-load", "prefix-cache")]
    token = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksToken",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {
            "tokenHash": token_digest(TOKEN),
            "qos": [{"arksEndpoint": {"name": m}} for m in models],
        },
    }
    return [backend, *endpoints, token]


@contextmanager
def _stack(work: Path, interval_s: float) -> Iterator[tuple[LocalStack, Engines]]:
    ports = {name: free_port() for name in ENGINES}
    work.mkdir(parents=True, exist_ok=True)
    policy = work / "policy.yaml"
    policy.write_text(yaml.safe_dump_all(_policy(ports)))
    with Supervisor(log_dir=work / "logs") as sims:
        for name in ENGINES:
            child = sims.python(
                f"sim-{name}",
                "launcher.sim",
                "--port",
                str(ports[name]),
                "--name",
                name,
                *(
                    a
                    for m in ("bench-weighted", "bench-least-load", "bench-prefix-cache")
                    for a in ("--model", m)
                ),
            )
            wait_http(child, f"http://127.0.0.1:{ports[name]}/health")
        settings = StackSettings(
            policy=policy,
            state_dir=work / "state",
            port=free_port(),
            admin_port=free_port(),
            metrics_port=free_port(),
            controller_metrics_port=free_port(),
            simulate=False,
            controller_args=("--scrape-interval-s", str(interval_s)),
        )
        with LocalStack(settings) as stack:
            yield stack, Engines(ports)


def _envoy_weights(stack: LocalStack, by_port: dict[int, str]) -> dict[str, int]:
    clusters = httpx.get(f"{stack.admin_url}/clusters?format=json", timeout=5).json()
    out = {}
    for cluster in clusters.get("cluster_statuses", []):
        if cluster["name"] == "endpoint/default/bench-weighted":
            for host in cluster.get("host_statuses", []):
                out[by_port[host["address"]["socket_address"]["port_value"]]] = int(
                    host.get("weight", 1)
                )
    return out


def _until(check: Callable[[], Any], timeout_s: float, poll_s: float = 0.01) -> float:
    """Seconds until `check()` is truthy (polled every `poll_s`)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"not within {timeout_s}s")
        time.sleep(poll_s)
    return time.monotonic() - started


@dataclass
class Propagation:
    interval_s: float
    first_s: list[float] = field(default_factory=list)  # until Envoy runs a changed weight
    settled_s: list[float] = field(default_factory=list)  # until it runs the weight that then stays


def propagation(work: Path, interval_s: float, trials: int) -> Propagation:
    out = Propagation(interval_s)
    with _stack(work, interval_s) as (stack, engines):
        by_port = {p: n for n, p in engines.ports.items()}
        for name in ENGINES:
            engines.set_waiting(name, 0)
        quiet = max(3 * interval_s, 1.0)
        _settled(stack, by_port, quiet, timeout_s=60)
        for trial in range(trials):
            before = _envoy_weights(stack, by_port)
            waiting = BUSY_WAITING if trial % 2 == 0 else 0
            started = time.monotonic()
            engines.set_waiting("c", waiting)
            _until(_changed(stack, by_port, "c", before.get("c")), timeout_s=60)
            out.first_s.append(time.monotonic() - started)
            final_at = _settled(stack, by_port, quiet, timeout_s=60)
            out.settled_s.append(final_at - started)
    return out


def _changed(
    stack: LocalStack, by_port: dict[int, str], engine: str, was: int | None
) -> Callable[[], bool]:
    return lambda: _envoy_weights(stack, by_port).get(engine) != was


def _settled(stack: LocalStack, by_port: dict[int, str], quiet_s: float, timeout_s: float) -> float:
    """Wait until Envoy's weights have not moved for `quiet_s`; return when they last moved."""
    deadline = time.monotonic() + timeout_s
    last, since = _envoy_weights(stack, by_port), time.monotonic()
    while time.monotonic() - since < quiet_s:
        if time.monotonic() > deadline:
            raise RuntimeError("Envoy's weights never settled")
        time.sleep(0.01)
        now = _envoy_weights(stack, by_port)
        if now != last:
            last, since = now, time.monotonic()
    return since


ARMS = ("weighted", "least-load", "prefix-cache")
SYSTEM_PROMPT = "You are a careful assistant for the Arks benchmark. " * 40  # ~2 KB, shared prefix


@dataclass
class Picking:
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ARMS, 0))
    cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ARMS, 0.0))
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in ARMS})

    def cpu_us(self, arm: str) -> float:
        return 1e6 * self.cpu_s[arm] / max(self.requests[arm], 1)

    def p(self, arm: str, q: float) -> float:
        values = sorted(self.latencies_ms[arm])
        return values[min(len(values) - 1, int(q * len(values)))]


def picking(work: Path, requests: int, rounds: int) -> Picking:
    """Sequential requests per arm, arms interleaved per round; the gateway's CPU per request."""
    out = Picking()
    with _stack(work, 1.0) as (stack, _engines):
        (extproc,) = [c for c in stack.supervisor.children if c.name == "extproc"]
        headers = {"authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=stack.url, headers=headers, timeout=10) as client:

            def ask(arm: str, i: int) -> float:
                body = {
                    "model": f"bench-{arm}",
                    "max_tokens": 2,
                    "messages": [
                        {"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": f"question {i % 50}"},
                    ],
                }
                started = time.perf_counter()
                answer = client.post("/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - started
                if answer.status_code != 200:
                    raise RuntimeError(f"{arm}: {answer.status_code} {answer.text[:200]}")
                return elapsed * 1000

            for arm in ARMS:  # warm every path (and the picker's first scrape)
                for i in range(20):
                    ask(arm, i)
            time.sleep(1.0)
            for r in range(rounds):
                for arm in ARMS if r % 2 == 0 else tuple(reversed(ARMS)):
                    before = cpu_seconds(extproc.popen.pid)
                    for i in range(requests):
                        out.latencies_ms[arm].append(ask(arm, i))
                    time.sleep(0.3)  # the access log's last batch
                    out.cpu_s[arm] += cpu_seconds(extproc.popen.pid) - before
                    out.requests[arm] += requests
    return out


def render_section(
    results: Sequence[Propagation],
    command: str,
    pick: Picking | None = None,
    pushes: Sequence[xds_push.Push] = (),
) -> str:
    rows = [
        [
            f"{p.interval_s:g} s",
            f"{statistics.median(p.first_s):.2f} s",
            f"{max(p.first_s):.2f} s",
            f"{statistics.median(p.settled_s):.2f} s",
            f"{max(p.settled_s):.2f} s",
            str(len(p.first_s)),
        ]
        for p in results
    ]
    table = report.markdown_table(
        [
            "scrape interval",
            "first weight change, median",
            "max",
            "final weight, median",
            "max",
            "load changes",
        ],
        rows,
    )
    return "\n".join(
        [
            BEGIN,
            "## Traffic control plane",
            "",
            f"`{command}`",
            "",
            "### Load change → weights in Envoy",
            "",
            f"One engine of three goes from an idle queue to {BUSY_WAITING} waiting requests and back (the",
            "simulator's `PUT /sim/load`); the clock runs from that change until Envoy's admin `/clusters`",
            "shows the engine's new weight (first change) and until the weight it then keeps (final).",
            "It is the scrape interval, the weight tracker's smoothing rounds and the xDS push.",
            "",
            table,
            "",
            *(xds_push.lines(list(pushes)) if pushes else []),
            *(_picking_lines(pick) if pick is not None else []),
            END,
        ]
    )


def _picking_lines(pick: Picking) -> list[str]:
    base = pick.cpu_us("weighted")
    rows = [
        [
            arm,
            f"{pick.cpu_us(arm):.0f} µs",
            f"{pick.cpu_us(arm) / base:.2f}x" if base else "-",
            f"{pick.p(arm, 0.5):.2f} ms",
            f"{pick.p(arm, 0.5) - pick.p('weighted', 0.5):+.2f} ms",
            f"{pick.p(arm, 0.99):.2f} ms",
            str(pick.requests[arm]),
        ]
        for arm in ARMS
    ]
    return [
        "### Picking the engine per request",
        "",
        "The same three engines behind three model names, one per `weighting`; sequential requests",
        "with a ~2 KB shared system prompt, arms interleaved. CPU is the gateway process's (from",
        "`/proc`) per request; latency is the client's, so only the differences between arms mean",
        "much. `prefix-cache` reads the request body (a second ext_proc message); `least-load`",
        "decides on the headers alone, like `weighted`.",
        "",
        report.markdown_table(
            [
                "weighting",
                "gateway CPU / request",
                "vs weighted",
                "p50",
                "p50 vs weighted",
                "p99",
                "requests",
            ],
            rows,
        ),
        "",
    ]


def write_section(path: Path, section: str) -> None:
    report.replace_section(path, BEGIN, END, section)


def run_section(*, quick: bool, command: str, settings: Settings | None = None) -> str:
    settings = settings or (Settings.smoke() if quick else Settings())
    results = []
    with tempfile.TemporaryDirectory(prefix="arks-bench-traffic-") as tmp:
        for i, interval in enumerate(settings.intervals_s):
            result = propagation(Path(tmp) / f"p{i}", interval, settings.trials)
            print(
                f"scrape every {interval:g}s: first change median {statistics.median(result.first_s):.2f}s, "
                f"final median {statistics.median(result.settled_s):.2f}s",
                flush=True,
            )
            results.append(result)
        pushes = [
            xds_push.push(Path(tmp), delta, settings.models, settings.pushes)
            for delta in (False, True)
        ]
        for p in pushes:
            print(
                f"xDS push, {p.protocol}: {p.resources:.0f} endpoint assignments, "
                f"median {1000 * statistics.median(p.seconds):.1f} ms to Envoy",
                flush=True,
            )
        pick = picking(Path(tmp) / "picking", settings.requests, settings.rounds)
        for arm in ARMS:
            print(
                f"{arm}: {pick.cpu_us(arm):.0f} µs gateway CPU/request, p50 {pick.p(arm, 0.5):.2f} ms",
                flush=True,
            )
    return render_section(results, command, pick, pushes)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.traffic", description=__doc__)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    command = "python -m tests.bench.traffic" + (" --quick" if args.quick else "")
    section = run_section(quick=args.quick, command=command)
    if args.out is not None:
        write_section(args.out, section)
        print(f"wrote the traffic section of {args.out}")


if __name__ == "__main__":
    main()
