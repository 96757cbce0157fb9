"""`make bench`'s tail-latency section: the gateway's p99 and p99.9, with and without each
measure taken against its stalls.

    .venv/bin/python -m tests.bench.gateway --out docs/benchmarks.md --only tail

Configurations, each measured alone (every other configuration's processes are stopped with
SIGSTOP while one takes load, so their timers do not land in its tail; the engine is shared):
- plain Envoy, and the floor (a do-nothing ext_proc): what the structure's own tail is;
- the gateway as shipped;
- the gateway with start-up's objects not frozen (`gc.freeze()` reverted), and with extproc's
  periodic work off (housekeeping reverted), both by `tests/bench/revert/sitecustomize.py`;
- the gateway as shipped, with its standalone controller stopped (what its scrapes cost), and
  with its metrics read every second (Prometheus reads them every 5-30 s; rendering them holds
  the interpreter while the request loop waits).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from launcher.procs import Supervisor
from tests.bench import report, targets, wrk
from tests.bench.targets import Target
from tests.bench.workloads import Workload, chat, preflight

BEGIN = (
    "<!-- tail-bench: begin (python -m tests.bench.gateway --only tail replaces this section) -->"
)
END = "<!-- tail-bench: end -->"
REVERT_DIR = Path(__file__).parent / "revert"
SCRAPE_EVERY_S = 1.0

PLAIN, FLOOR, SHIPPED = "plain", "floor", "gateway"
NO_FREEZE, NO_HOUSEKEEPING = "gateway, no gc.freeze", "gateway, no housekeeping"
NO_CONTROLLER, SCRAPED = "gateway, controller stopped", "gateway, metrics read every 1 s"
# The reverted configurations: ARKS_BENCH_REVERT for its processes, what its log must then say.
REVERTS = {
    NO_FREEZE: ("gc-freeze", "gc.freeze skipped"),
    NO_HOUSEKEEPING: ("housekeeping", "housekeeping skipped"),
}
MEANING = {
    PLAIN: "Envoy and the engine alone",
    FLOOR: "a do-nothing ext_proc (the structure's own tail)",
    SHIPPED: "as shipped",
    NO_FREEZE: "start-up's objects not frozen: the collector's full passes walk them",
    NO_HOUSEKEEPING: "extproc's periodic work (every 0.5 s) off",
    NO_CONTROLLER: "its standalone controller stopped (no engine scrapes)",
    SCRAPED: f"its metrics rendered every {SCRAPE_EVERY_S:g} s (Prometheus: every 5-30 s)",
}


@contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def reverted_gateway(
    stack: ExitStack, work: Path, engine_port: int, token: str, conc: int, name: str
) -> Target:
    revert, said = REVERTS[name]
    path = os.pathsep.join(filter(None, [str(REVERT_DIR), os.environ.get("PYTHONPATH")]))
    slug = revert + "-reverted"
    with environ({"ARKS_BENCH_REVERT": revert, "PYTHONPATH": path}):
        target = stack.enter_context(targets.gateway(work, engine_port, token, conc, name=slug))
    log = work / slug / "logs" / "extproc.log"
    if said not in log.read_text(errors="replace"):
        raise RuntimeError(f"{name}: the revert did not take effect (nothing in {log})")
    return target


def _pids(target: Target) -> tuple[int, ...]:
    return (*target.python_pids, target.envoy_pid)


def _controller(target: Target) -> int:
    for pid in target.python_pids:
        if b"controller" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise RuntimeError(f"{target.name}: no controller process")


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        os.kill(pid, sig)


@contextmanager
def stopped(pids: Sequence[int]) -> Iterator[None]:
    _signal_all(pids, signal.SIGSTOP)
    try:
        yield
    finally:
        _signal_all(pids, signal.SIGCONT)


@contextmanager
def read_every(url: str, interval_s: float) -> Iterator[None]:
    done = threading.Event()

    def scrape() -> None:
        while not done.wait(interval_s):
            with urllib.request.urlopen(url, timeout=10) as answer:
                answer.read()

    thread = threading.Thread(target=scrape, name="bench-scraper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def run_section(*, quick: bool, command: str) -> str:
    from tests.bench.gateway import ENGINE_OUTPUT_TOKENS, Arm, Settings, measure

    settings = Settings.from_args(["--quick"] if quick else ["--duration", "24", "--rounds", "4"])
    wrk_bin = wrk.ensure_wrk()
    token = "sk-arks-bench-tail-" + uuid.uuid4().hex
    workloads = [chat(1), chat(32)]
    conc = settings.envoy_concurrency
    with tempfile.TemporaryDirectory(prefix="arks-bench-tail-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        sup = stack.enter_context(Supervisor(log_dir=work / "logs"))
        engine_port = targets.start_engine(sup, ENGINE_OUTPUT_TOKENS)
        configs = {
            PLAIN: targets.start_baseline(sup, work, engine_port, conc, floor=False),
            FLOOR: targets.start_baseline(sup, work, engine_port, conc, floor=True),
            SHIPPED: stack.enter_context(targets.gateway(work, engine_port, token, conc)),
        }
        for name in REVERTS:
            configs[name] = reverted_gateway(stack, work, engine_port, token, conc, name)
        shipped = configs[SHIPPED]
        metrics_url = shipped.metrics_url
        if metrics_url is None:
            raise RuntimeError("the gateway's target has no metrics URL")
        labels = [PLAIN, FLOOR, SHIPPED, NO_FREEZE, NO_HOUSEKEEPING, NO_CONTROLLER, SCRAPED]
        target_of = {**configs, NO_CONTROLLER: shipped, SCRAPED: shipped}

        @contextmanager
        def alone(arm: Arm) -> Iterator[None]:
            others = [pid for t in configs.values() if t is not arm.target for pid in _pids(t)]
            with ExitStack() as around:
                around.enter_context(stopped(others))
                if arm.label == NO_CONTROLLER:
                    around.enter_context(stopped([_controller(arm.target)]))
                if arm.label == SCRAPED:
                    around.enter_context(read_every(metrics_url, SCRAPE_EVERY_S))
                yield

        results: report.Results = {}
        for workload in workloads:
            for target in configs.values():
                preflight(target.url, workload, token, target.name)
            arms = [Arm(label, target_of[label], workload) for label in labels]
            results |= measure(wrk_bin, arms, work, token, settings, alone)
    return render(results, workloads, labels, command)


def render(
    results: report.Results, workloads: Sequence[Workload], labels: Sequence[str], command: str
) -> str:
    lines = [
        BEGIN,
        "## Tail latency: what each measure against stalls is worth",
        "",
        f"`{command}`. Every configuration measured alone: while one takes load, the others' "
        "processes are stopped (SIGSTOP), so their timers are not in its tail; one shared "
        "engine; interleaved rounds. Reverted configurations run the shipped code with one "
        "measure undone at start-up (`tests/bench/revert/sitecustomize.py`; the bench checks "
        "each revert took effect). p99.9 at c=1 rests on a few dozen requests: an order of "
        "magnitude, not to 0.1 ms.",
        "",
    ]
    for workload in workloads:
        plain = results[(workload.key, PLAIN)]
        rows = []
        for label in labels:
            m = results[(workload.key, label)]
            added = "—" if label == PLAIN else f"{m.p99 - plain.p99:+.2f}"
            rows.append(
                [
                    label,
                    MEANING[label],
                    f"{m.p50:.2f}",
                    f"{m.p99:.2f}",
                    f"{m.p999:.2f}",
                    added,
                    f"{m.load.rps:.0f}",
                    "—" if label == PLAIN else f"{m.python_us:.0f}",
                    f"{m.load.requests}",
                ]
            )
        lines += [
            f"### {workload.title}",
            "",
            report.markdown_table(
                [
                    "config",
                    "what differs",
                    "p50 ms",
                    "p99 ms",
                    "p99.9 ms",
                    "+p99 vs plain ms",
                    "req/s",
                    "Python CPU µs/req",
                    "requests",
                ],
                rows,
            ),
            "",
        ]
    lines.append(END)
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    report.replace_section(path, BEGIN, END, text)
