"""`make bench`: the gateway's cost against plain Envoy and the Python floor, in one run.

    .venv/bin/python -m tests.bench.gateway --out docs/benchmarks.md [--duration 8] [--quick] [--only gateway|ratelimit|traffic|estimates|policy|latency|ledger|ledger-cpu|breakdown|tail|workers]

One simulated engine serves four configurations (see `targets.py`): plain Envoy, Envoy with a
do-nothing Python ext_proc (the floor), the floor plus the usage channel (the gateway's batched
access log into a do-nothing receiver: the second floor), and the full gateway. Each workload
runs against all four, interleaved (plain, floor, floor-usage, gateway, then in reverse, ...) so
that the noise of a shared 2-core machine lands on all of them alike. Only ratios between them
mean anything.
Then the rate-limit service's part (`tests/bench/ratelimit.py`), the traffic control plane's
part (`tests/bench/traffic.py`), the usage estimates' (`tests/bench/estimates.py`), the
cluster policy's (`tests/bench/policy.py`), the latency histograms' (`tests/bench/latency.py`)
the usage ledger's stores' (`tests/bench/ledger.py`), the gateway's CPU with the ledger on
against off (`tests/bench/ledger_cpu.py`), where the gateway's time goes
(`tests/bench/breakdown.py`), the tail latency with and without each measure against stalls
(`tests/bench/tail.py`) and one extproc process against two (`tests/bench/workers.py`) add
their own sections;
`--only ratelimit|traffic|estimates|policy|latency|ledger|ledger-cpu|breakdown|tail|workers` runs just that part
and replaces just its section of `--out`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from launcher.procs import Supervisor
from launcher.stack import envoy_binary
from tests.bench import (
    breakdown,
    estimates,
    latency,
    ledger,
    ledger_cpu,
    policy,
    ratelimit,
    report,
    tail,
    targets,
    traffic,
    workers,
    wrk,
)
from tests.bench.report import Measurement, Results
from tests.bench.targets import CpuSample, Target
from tests.bench.workloads import PATH, STREAM_CHUNKS, Workload, all_workloads, preflight

ENGINE_OUTPUT_TOKENS = 16
# After wrk stops, before reading CPU: lets the gateway's access log (100 ms batches) arrive.
SETTLE_S = 0.3


class BenchError(RuntimeError):
    """The run cannot produce trustworthy figures; the message says which workload and config."""


@dataclass(frozen=True)
class Settings:
    out: Path | None
    duration_s: float
    rounds: int
    warmup_s: float
    envoy_concurrency: int
    stream_c32: bool
    rate_matched: bool
    quick: bool
    only: str = "all"

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> Settings:
        parser = argparse.ArgumentParser(
            prog="python -m tests.bench.gateway", description=__doc__.splitlines()[0]
        )
        parser.add_argument(
            "--out", type=Path, help="write the markdown report here (e.g. docs/benchmarks.md)"
        )
        parser.add_argument(
            "--duration", type=float, default=8.0, help="measured seconds per workload and config"
        )
        parser.add_argument(
            "--rounds", type=int, default=2, help="interleaved segments the duration is split into"
        )
        parser.add_argument(
            "--warmup", type=float, default=1.0, help="seconds of load per config before measuring"
        )
        parser.add_argument(
            "--envoy-concurrency", type=int, default=1, help="Envoy worker threads, all configs"
        )
        parser.add_argument(
            "--no-stream-c32",
            action="store_true",
            help="skip the streamed workloads at concurrency 32",
        )
        parser.add_argument(
            "--no-rate-matched",
            action="store_true",
            help="skip re-measuring the floor at the gateway's request rate for streamed answers",
        )
        parser.add_argument(
            "--quick", action="store_true", help="smoke run: 1 s per measurement, one round"
        )
        parser.add_argument(
            "--only",
            choices=(
                "all",
                "gateway",
                "ratelimit",
                "traffic",
                "estimates",
                "policy",
                "latency",
                "ledger",
                "ledger-cpu",
                "breakdown",
                "tail",
                "workers",
            ),
            default="all",
            help="run only one part: the gateway's, the rate limit's (tests/bench/ratelimit.py), "
            "the traffic control plane's (traffic.py), the usage estimates' (estimates.py), the "
            "cluster policy's (policy.py), the latency histograms' (latency.py) or the usage "
            "ledger's stores' (ledger.py), the gateway's CPU with the ledger on and off "
            "(ledger_cpu.py), where the gateway's time goes (breakdown.py), the tail latency "
            "with and without each measure against stalls (tail.py) or one extproc process "
            "against two (workers.py)",
        )
        args = parser.parse_args(argv)
        if args.quick:
            args.duration, args.rounds, args.warmup = 1.0, 1, 1.0
        if args.rounds < 1 or args.duration < args.rounds:
            parser.error("--duration must give each of --rounds at least one second")
        return cls(
            out=args.out,
            duration_s=args.duration,
            rounds=args.rounds,
            warmup_s=args.warmup,
            envoy_concurrency=args.envoy_concurrency,
            stream_c32=not args.no_stream_c32,
            rate_matched=not args.no_rate_matched,
            quick=args.quick,
            only=args.only,
        )


@dataclass(frozen=True)
class Arm:
    """One line of a workload's table: a label, where the load goes, and the exact load."""

    label: str
    target: Target
    workload: Workload
    delay_ms: float = 0.0


def measure(
    wrk_bin: str,
    arms: Sequence[Arm],
    work: Path,
    token: str,
    settings: Settings,
    alone: Callable[[Arm], AbstractContextManager[object]] | None = None,
) -> Results:
    """Each arm's load in turn, in interleaved rounds. `alone(arm)`, when given, is entered around
    each run of an arm's load (e.g. to pause the other configurations' processes)."""
    scripts = {}
    solo = alone or (lambda _arm: nullcontext())
    for arm in arms:
        script = scripts[arm.label] = work / f"{arm.workload.key}-{arm.label}.lua"
        body, headers = arm.workload.body_bytes(), arm.workload.request_headers(token)
        script.write_text(wrk.lua_script("POST", body, headers))
        with solo(arm):
            wrk.run(
                wrk_bin, arm.target.url + PATH, script, arm.workload.connections, settings.warmup_s
            )
    loads = {arm.label: wrk.Result() for arm in arms}
    cpu = {arm.label: CpuSample(0.0, 0.0) for arm in arms}
    segment_s = settings.duration_s / settings.rounds
    for round_ in range(settings.rounds):
        for arm in arms if round_ % 2 == 0 else list(reversed(arms)):
            with solo(arm):
                before = CpuSample.take(arm.target)
                url = arm.target.url + PATH
                loads[arm.label].merge(
                    wrk.run(wrk_bin, url, scripts[arm.label], arm.workload.connections, segment_s)
                )
                time.sleep(SETTLE_S)
                cpu[arm.label] = cpu[arm.label] + (CpuSample.take(arm.target) - before)
    for arm in arms:
        load = loads[arm.label]
        if load.error_count or load.requests == 0:
            raise BenchError(
                f"{arm.workload.key} via {arm.label}: {load.requests} requests, errors {dict(load.errors)} "
                "(status = non-2xx/3xx answers); see the logs under the run's temporary directory"
            )
    return {
        (arms[0].workload.key, a.label): Measurement(loads[a.label], cpu[a.label], a.delay_ms)
        for a in arms
    }


def rate_matched_floor(workload: Workload, floor: Target, results: Results) -> Arm | None:
    """The floor again, its answers delayed by the engine so they take as long as the gateway's.

    A Python process that idles between requests pays more CPU per request (cold caches,
    thread wake-ups): at concurrency 1 a slower configuration looks costlier per request even
    when it does the same work. Matching the request rate separates the two.
    """
    gateway, plain_floor = (
        results.get((workload.key, "gateway")),
        results.get((workload.key, "floor")),
    )
    if gateway is None or plain_floor is None:
        return None
    extra = round(gateway.p50 - plain_floor.p50, 2)
    if extra < 0.2:
        return None
    delayed = replace(workload, headers=(*workload.headers, ("x-sim-ttft-ms", f"{extra:g}")))
    return Arm(report.FLOOR_MATCHED, floor, delayed, extra)


def run(settings: Settings) -> tuple[Results, list[Workload]]:
    wrk_bin = wrk.ensure_wrk()
    token = "sk-arks-bench-" + secrets.token_hex(16)
    workloads = all_workloads(stream_c32=settings.stream_c32)
    results: Results = {}
    with tempfile.TemporaryDirectory(prefix="arks-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        sup = stack.enter_context(Supervisor(log_dir=work / "logs"))
        engine_port = targets.start_engine(sup, ENGINE_OUTPUT_TOKENS)
        plain = targets.start_baseline(
            sup, work, engine_port, settings.envoy_concurrency, floor=False
        )
        floor = targets.start_baseline(
            sup, work, engine_port, settings.envoy_concurrency, floor=True
        )
        floor_usage = targets.start_baseline(
            sup, work, engine_port, settings.envoy_concurrency, floor=True, usage_channel=True
        )
        gateway = stack.enter_context(
            targets.gateway(work, engine_port, token, settings.envoy_concurrency)
        )
        configs = [plain, floor, floor_usage, gateway]
        for workload in workloads:
            for target in configs:
                preflight(target.url, workload, token, target.name)
            print(f"measuring {workload.title} ...", file=sys.stderr, flush=True)
            results |= measure(
                wrk_bin, [Arm(t.name, t, workload) for t in configs], work, token, settings
            )
            if workload.streamed and workload.connections == 1 and settings.rate_matched:
                matched = rate_matched_floor(workload, floor, results)
                if matched is not None:
                    results |= measure(wrk_bin, [matched], work, token, settings)
            print(f"\n{workload.title}", flush=True)
            print(
                report.text_table(report.HEADER, report.workload_rows(workload, results)) + "\n",
                flush=True,
            )
    return results, workloads


# --------------------------------------------------------------------------- the report


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _envoy_version() -> str:
    try:
        out = subprocess.run(
            [envoy_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    build = out.split("version:", 1)[-1].split()  # <commit>/<version>/<state>/<mode>/<ssl>
    parts = build[0].split("/") if build else []
    return parts[1] if len(parts) > 1 else "unknown"


def _command(argv: Sequence[str]) -> str:
    return shlex.join([".venv/bin/python", "-m", "tests.bench.gateway", *argv])


HOW_TO_READ = f"""\
## How to read this

- **plain** is Envoy with only the router in front of the simulated engine: no Python on the
  path, the physical limit of this design. **floor** adds an `ext_proc` filter calling a
  do-nothing Python server (`tests/bench/floor_extproc.py`) that answers the request-headers
  message and nothing else: no Python gateway can be cheaper. **floor-usage** (the second floor)
  adds the usage channel: the gateway's batched gRPC access log (same filter, same flush
  settings) into a receiver that reads nothing, and an ext_proc answer carrying constant
  metadata of the gateway's shape, so its entries are as large as the gateway's. The gateway
  against it shows what its own code costs beyond the structure. **gateway** is the full local stack
  (`launcher.stack.LocalStack`: the gateway's filter chain, extproc with auth, routing, quota and
  usage via the gRPC access log).
- The machine is shared and noisy, so absolute figures drift from run to run; the budgets are
  ratios between configurations measured in this same run, interleaved.
- **Python CPU µs/req** is the user + system CPU of the configuration's Python services (the floor
  server; the gateway's extproc, including its access-log receiver), not the engine nor Envoy,
  over the measurement, divided by the requests completed. It is read from each process's CPU
  clock: the total `/proc/<pid>/stat` gives in fields 14+15, at ns rather than 10 ms resolution.
  **Envoy CPU µs/req** is the same for Envoy, for context: the gateway's Envoy also runs
  `json_to_metadata`, the Lua filters (credentials, form, usage) and the access log.
- **+p50 / +p99 vs plain** is the latency the configuration adds over plain Envoy. The p50 budget
  is the gateway's added p50 ÷ the floor's (≤ 1.5); the p99 budget is absolute (≤ 2 ms).
  **p99.9 ms** shows the stalls p99 hides (at concurrency 1, a few requests of a run: read it
  as an order of magnitude, not to 0.1 ms).
- Python CPU per request is not a constant: a process that idles between requests pays more
  per request (cold caches, gRPC's poller thread waking the event loop), so at concurrency 1 a
  configuration whose answers take longer looks costlier per request for the same work. The
  rate-matched floor (streamed, concurrency 1) delays the floor's answers in the engine by the
  gateway's extra p50 so both run at the same request rate: compare the gateway with that too.
- Streamed answers are {STREAM_CHUNKS} SSE events, written by the engine in one burst (no
  per-token delay); their latency is the whole answer. The gateway's Envoy reads the answer's
  usage in Lua (`envoy/usage.lua`: one step per data frame, the last few KiB kept, never a step
  per event), so Python sees no chunk and its work does not grow with the answer. Without
  `stream_options.include_usage` (what the official `openai` client sends) the same Lua adds it
  to the request body and cuts the usage-only event from the answer: no extra gRPC message.
- Latencies come from wrk (1,000 quantiles per run, merged across rounds); a run fails if any request
  got a non-2xx answer or a socket error.
"""


def render_markdown(
    results: Results, workloads: Sequence[Workload], settings: Settings, argv: Sequence[str]
) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!-- Generated by `make bench` (python -m tests.bench.gateway); do not edit: each run overwrites it. -->",
        "# Gateway benchmarks",
        "",
        f"- Date: {now}",
        f"- Machine: {os.cpu_count()} CPUs ({_cpu_model()}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, Envoy {_envoy_version()}",
        f"- Command: `{_command(argv)}`",
        f"- Settings: {settings.duration_s:g} s measured per workload and config, in {settings.rounds} interleaved "
        f"round(s); {settings.warmup_s:g} s warm-up per workload and config; Envoy `--concurrency "
        f"{settings.envoy_concurrency} --disable-hot-restart` for all configs; load from `wrk` (1 thread, "
        f"keep-alive); one simulated engine (`launcher.sim`, {ENGINE_OUTPUT_TOKENS} output tokens, no delays; "
        f"streamed: {STREAM_CHUNKS} chunks) on loopback. Python CPU counted: the floor's "
        f"`tests.bench.floor_extproc`; the gateway's Python children of `LocalStack` (`extproc` and the standalone controller, whose scraping costs ~3 µs per request at c=32)."
        + (" **Quick smoke run: figures are not meaningful.**" if settings.quick else ""),
        "",
        "## Budgets (DESIGN §6)",
        "",
        report.markdown_table(report.BUDGET_HEADER, [b.cells() for b in report.budgets(results)]),
        "",
        'Python CPU of a streamed answer ÷ a non-streamed one ("flat in answer length" is ≈ 1):',
        "",
        report.markdown_table(
            ["config", f"{STREAM_CHUNKS} chunks ÷ {ENGINE_OUTPUT_TOKENS} tokens"],
            [[label, f"{value:.2f}x"] for label, value in report.flatness(results)],
        ),
        "",
    ]
    if matched := report.rate_matched(results):
        parts += [
            "Streamed answers at concurrency 1, with the floor also measured at the gateway's request rate "
            "(its answers delayed by the engine by the gateway's extra p50), so that both Python processes "
            "idle alike between requests:",
            "",
            report.markdown_table(report.RATE_MATCHED_HEADER, matched),
            "",
        ]
    for workload in workloads:
        parts += [
            f"## {workload.title}",
            "",
            report.markdown_table(report.HEADER, report.workload_rows(workload, results)),
            "",
        ]
    parts.append(HOW_TO_READ)
    return "\n".join(parts)


# The parts after the gateway's, each writing its own section of --out (in this order).
PARTS = (
    ("ratelimit", ratelimit),
    ("traffic", traffic),
    ("estimates", estimates),
    ("policy", policy),
    ("latency", latency),
    ("ledger", ledger),
    ("ledger-cpu", ledger_cpu),
    ("breakdown", breakdown),
    ("tail", tail),
    ("workers", workers),
)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = Settings.from_args(argv)
    started = time.monotonic()
    if settings.only in ("all", "gateway"):
        _gateway_part(settings, argv, started)
    for part, module in PARTS:
        if settings.only not in ("all", part):
            continue
        try:
            section = module.run_section(quick=settings.quick, command=_command(argv))
        except RuntimeError as err:
            sys.exit(f"bench FAILED ({part} part): {err}")
        if settings.out is not None:
            module.write_section(settings.out, section)
            print(f"wrote the {part} section of {settings.out}")


def _gateway_part(settings: Settings, argv: Sequence[str], started: float) -> None:
    try:
        results, workloads = run(settings)
    except (BenchError, wrk.WrkError, RuntimeError) as err:
        sys.exit(f"bench FAILED: {err}")
    rows = [b.cells() for b in report.budgets(results)]
    print(
        report.text_table(
            report.BUDGET_HEADER, [[c.replace("**", "") for c in row] for row in rows]
        )
    )
    print(f"\n(bench took {time.monotonic() - started:.0f} s)")
    if settings.out is not None:
        settings.out.parent.mkdir(parents=True, exist_ok=True)
        text = render_markdown(results, workloads, settings, argv)
        if settings.only == "gateway":  # keep the other parts' sections
            for _, module in PARTS:
                if kept := report.existing_section(settings.out, module.BEGIN, module.END):
                    text += "\n" + kept + "\n"
        settings.out.write_text(text)
        print(f"wrote {settings.out}")


if __name__ == "__main__":
    main()
