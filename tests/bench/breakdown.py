"""`make bench`'s breakdown section: where each microsecond of a gateway request goes.

    .venv/bin/python -m tests.bench.gateway --out docs/benchmarks.md --only breakdown

Three views, one run:
- **Envoy, filter by filter**: a ladder of Envoys in front of the same engine, each adding one
  of the gateway's filters (its own config, in its order) to the one before, all calling a
  Python server that answers as the gateway does from prebuilt messages (`floor_extproc
  --gateway-answer`); the last rung is the gateway itself. Each rung's Envoy CPU per request
  minus the rung before is what that filter costs.
- **Python, structure against our code**: the Python CPU per request of the floor, of the
  gateway-shaped server with the usage channel (the rung with every filter: the gateway's
  messages and access-log batches, no decision), and of the gateway. What the gateway costs
  beyond that rung is its own code.
- **Python, by part**: a py-spy profile of the gateway's extproc under the same load, samples
  grouped by what they are in (decode, decision, admission, encode, access-log entries,
  settlement, metrics, gRPC and the event loop), scaled to the measured CPU per request; and
  the same code timed in a tight loop without gRPC (`tests/bench/hotpath.py`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from arks.manifests import (
    CREDENTIALS_FILTER,
    EARLY_AUTH_FILTER,
    EXT_PROC_FILTER,
    FORM_FILTER,
    REQUEST_FILTER,
    USAGE_FILTER,
)
from launcher.procs import Supervisor
from tests.bench import hotpath, report, targets, wrk
from tests.bench.workloads import PATH, Workload, chat, preflight, stream

BEGIN = "<!-- breakdown-bench: begin (python -m tests.bench.gateway --only breakdown replaces this section) -->"
END = "<!-- breakdown-bench: end -->"
PROFILE_S = 10
PROFILE_RATE_HZ = 250


@dataclass(frozen=True)
class Rung:
    """An Envoy of the ladder: what it has of the gateway's (each rung adds to the one before)."""

    name: str
    label: str
    filters: tuple[str, ...]  # the gateway's HTTP filters, by name (its config, its order)
    access_log: bool = False  # the gateway's usage access log
    routes: bool = False  # the gateway's route table and engine cluster
    hcm: bool = False  # the gateway's connection manager settings and stats tags


_REQUEST_SIDE = (CREDENTIALS_FILTER, EARLY_AUTH_FILTER, REQUEST_FILTER, FORM_FILTER)
_ALL_FILTERS = (*_REQUEST_SIDE, EXT_PROC_FILTER, USAGE_FILTER)
LADDER = (
    Rung("rung-answer", "the gateway's ext_proc config and answer", (EXT_PROC_FILTER,)),
    Rung(
        "rung-json",
        "+ json_to_metadata (the body's model, stream, …)",
        (REQUEST_FILTER, EXT_PROC_FILTER),
    ),
    Rung(
        "rung-lua-request",
        "+ credentials Lua, early auth, form Lua (on the headers)",
        (*_REQUEST_SIDE, EXT_PROC_FILTER),
    ),
    Rung("rung-usage-lua", "+ usage.lua (the answer's usage)", _ALL_FILTERS),
    Rung("rung-access-log", "+ the usage access log (batched gRPC)", _ALL_FILTERS, True),
    Rung(
        "rung-routes",
        "+ the gateway's routes and engine cluster (header matches, retries, override_host, "
        "outlier detection)",
        _ALL_FILTERS,
        True,
        routes=True,
    ),
    Rung(
        "rung-hcm",
        "+ the gateway's connection manager and stats settings (local replies, request ids, "
        "timeouts, tags)",
        _ALL_FILTERS,
        True,
        routes=True,
        hcm=True,
    ),
)
# The last rung with the gateway's messages and nothing more (its Python: the structure's).
FULL_RUNG = "rung-access-log"
LABELS = {rung.name: rung.label for rung in LADDER}


# --------------------------------------------------------------------------- py-spy samples

# The part of extproc a sample is in, by the frames on its stack (the first rule that matches).
# Frames read "function (path:line)"; prometheus_client's and protobuf's Python are counted apart
# wherever they are called from.
PARTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("metrics (prometheus_client)", re.compile(r"\(prometheus_client/")),
    ("protobuf's Python (json_format)", re.compile(r"\(google/protobuf/")),
    ("decode the request message", re.compile(r"^request_info \(extproc/codec\.py")),
    (
        "decision (auth, model, route; kept decisions)",
        re.compile(r"^(decide_(headers|body) \(extproc/gateway\.py|DecisionCache\.decide )"),
    ),
    ("admission (limits, budgets, picking)", re.compile(r"^RequestProcessor\._pick_and_admit ")),
    ("admitted: in flight", re.compile(r"^admitted \(extproc/settlement\.py")),
    ("encode the answer", re.compile(r"^RequestProcessor\._encode ")),
    ("access-log entry to Finished", re.compile(r"^finished \(extproc/codec\.py")),
    ("settlement (usage, budgets, in flight)", re.compile(r"^finished \(extproc/settlement\.py")),
)
OTHER = "other Python of ours (servicer glue, housekeeping)"
MACHINERY = "gRPC and the event loop (their C, and asyncio's Python)"
_OURS = re.compile(r"\((extproc|arks)/")
# Ours on every stack, not work: the process's entry point (below the event loop), and the
# servicers' loops waiting on gRPC's iterator (a sample there is in gRPC's C).
_NOT_WORK = re.compile(
    r"^(main \(extproc/server\.py|<module> \(extproc/__main__\.py"
    r"|ExternalProcessor\.Process |AccessLogReceiver\.StreamAccessLogs )"
)


def part_of(frames: Sequence[str]) -> str:
    for part, pattern in PARTS:
        if any(pattern.search(frame) for frame in frames):
            return part
    ours = [f for f in frames if _OURS.search(f) and not _NOT_WORK.search(f)]
    return OTHER if ours else MACHINERY


# A thread waiting, though py-spy saw it running: the metrics endpoint's server in select().
_IDLE = re.compile(r"serve_forever \(socketserver\.py|select \(selectors\.py")


def parts_of_profile(raw: str) -> Counter[str]:
    """py-spy's raw (collapsed) output: `frame;frame;... count` per line."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit() and not _IDLE.search(stack):
            counts[part_of(stack.split(";"))] += int(count)
    return counts


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise RuntimeError("py-spy is missing: `make bench` installs it (the [test] extra)")
    return found


def profile(pid: int, seconds: float, out: Path) -> Counter[str]:
    subprocess.run(
        [
            py_spy(),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            str(PROFILE_RATE_HZ),
            "--format",
            "raw",
            "--nonblocking",  # pausing it, py-spy counts idle threads as busy
            "--output",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=seconds + 60,
    )
    return parts_of_profile(out.read_text())


# --------------------------------------------------------------------------- the run


def run_section(*, quick: bool, command: str) -> str:
    from tests.bench.gateway import ENGINE_OUTPUT_TOKENS, Arm, Settings, measure

    settings = Settings.from_args(["--quick"] if quick else ["--duration", "12", "--rounds", "3"])
    wrk_bin = wrk.ensure_wrk()
    token = "sk-arks-bench-breakdown-" + uuid.uuid4().hex
    workloads = [chat(32), stream(32, client_asks_usage=True)]
    conc = settings.envoy_concurrency
    with tempfile.TemporaryDirectory(prefix="arks-bench-breakdown-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        sup = stack.enter_context(Supervisor(log_dir=work / "logs"))
        engine_port = targets.start_engine(sup, ENGINE_OUTPUT_TOKENS)
        floor = targets.start_baseline(sup, work, engine_port, conc, floor=True)
        shaped = targets.start_server(sup, "shaped-extproc", "--gateway-answer")
        rungs = [
            targets.start_ladder_step(
                sup,
                work,
                rung.name,
                engine_port,
                shaped,
                rung.filters,
                rung.access_log,
                conc,
                gateway_routes=rung.routes,
                gateway_hcm=rung.hcm,
            )
            for rung in LADDER
        ]
        gateway = stack.enter_context(targets.gateway(work, engine_port, token, conc))
        configs = [floor, *rungs, gateway]
        results: report.Results = {}
        for workload in workloads:
            for target in configs:
                preflight(target.url, workload, token, target.name)
            print(f"breakdown: measuring {workload.title} ...", file=sys.stderr, flush=True)
            results |= measure(
                wrk_bin, [Arm(t.name, t, workload) for t in configs], work, token, settings
            )
        parts = _profile_gateway(wrk_bin, gateway, chat(32), token, work, quick)
    stages = hotpath.measure(2000 if quick else 10000)
    return render(results, workloads, [t.name for t in configs], parts, stages, command)


def _profile_gateway(
    wrk_bin: str, gateway: targets.Target, workload: Workload, token: str, work: Path, quick: bool
) -> Counter[str]:
    script = work / "profile.lua"
    script.write_text(
        wrk.lua_script("POST", workload.body_bytes(), workload.request_headers(token))
    )
    seconds = 3 if quick else PROFILE_S
    extproc = gateway.python_pids[0]  # LocalStack starts extproc before the controller
    out = work / "extproc.pyspy"
    with subprocess.Popen(
        [
            wrk_bin,
            "-t1",
            f"-c{workload.connections}",
            f"-d{seconds + 4}s",
            "-s",
            str(script),
            gateway.url + PATH,
        ],
        stdout=subprocess.DEVNULL,
    ) as load:
        try:
            parts = profile(extproc, seconds, out)
        finally:
            load.wait(timeout=seconds + 30)
    return parts


def render(
    results: report.Results,
    workloads: Sequence[Workload],
    names: Sequence[str],
    parts: Counter[str],
    stages: Sequence[hotpath.Stage],
    command: str,
) -> str:
    floor_name, *rung_names, gateway_name = names
    lines = [
        BEGIN,
        "## Where the time goes (breakdown)",
        "",
        f"`{command}`. One engine, the same load (wrk, 1 thread) on every configuration, "
        "interleaved rounds; CPU from /proc per process.",
        "",
        "### Envoy, filter by filter",
        "",
        "Each rung adds one of the gateway's filters to the rung before (the gateway's own config "
        "of it, in its order), all calling a Python server that answers as the gateway does "
        "from prebuilt messages (`tests/bench/floor_extproc.py --gateway-answer`); the last is "
        "the gateway itself (its routes and clusters by xDS, its own extproc). At c=32 Envoy's "
        "CPU per request falls as its request rate rises (more work per wake-up): the gateway, "
        "at about half the rungs' rate, pays some of its last step for that, not for a filter.",
        "",
    ]
    header = [
        "rung",
        *(f"{w.short}: Envoy µs/req" for w in workloads),
        *("added" for _ in workloads),
    ]
    rows = []
    previous: list[float] | None = None
    for name in [floor_name, *rung_names, gateway_name]:
        label = {
            floor_name: "floor (ext_proc, headers only, empty answer)",
            gateway_name: "the gateway",
            **LABELS,
        }[name]
        envoy = [results[(w.key, name)].envoy_us for w in workloads]
        added = (
            ["—"] * len(workloads)
            if previous is None
            else [f"{e - p:+.0f}" for e, p in zip(envoy, previous, strict=True)]
        )
        rows.append([label, *(f"{e:.0f}" for e in envoy), *added])
        previous = envoy
    lines += [report.markdown_table(header, rows), ""]

    chat_key = workloads[0].key
    floor_us = results[(chat_key, floor_name)].python_us
    shaped_us = results[(chat_key, FULL_RUNG)].python_us
    gateway_us = results[(chat_key, gateway_name)].python_us
    lines += [
        f"### Python, structure against our code ({workloads[0].short})",
        "",
        report.markdown_table(
            ["configuration", "Python CPU µs/req", "÷ floor"],
            [
                ["floor: one ext_proc message, empty answer", f"{floor_us:.0f}", "1.00x"],
                [
                    "the gateway's messages and its access-log batches, no decision (the access-log rung)",
                    f"{shaped_us:.0f}",
                    f"{shaped_us / floor_us:.2f}x",
                ],
                ["the gateway", f"{gateway_us:.0f}", f"{gateway_us / floor_us:.2f}x"],
                [
                    "the gateway's own code (gateway minus the access-log rung)",
                    f"{gateway_us - shaped_us:.0f}",
                    f"{(gateway_us - shaped_us) / floor_us:.2f}x",
                ],
            ],
        ),
        "",
    ]
    total = sum(parts.values())
    if total:
        lines += [
            f"### Python, by part ({workloads[0].short}, py-spy)",
            "",
            f"py-spy (`record --nonblocking --rate {PROFILE_RATE_HZ}`, {PROFILE_S} s) on the "
            "gateway's extproc under the same load; each part's share of the samples, and that "
            f"share of the gateway's {gateway_us:.0f} µs/req measured above (py-spy's own "
            "reading of the process is not in that figure). Samples whose stack holds none of "
            "our frames are gRPC's and the event loop's: their poller thread, uvloop, the "
            "servicer's `async for` (its C).",
            "",
            report.markdown_table(
                ["part", "samples", "µs/req"],
                [
                    [part, f"{count / total:.1%}", f"{count / total * gateway_us:.0f}"]
                    for part, count in parts.most_common()
                ],
            ),
            "",
        ]
    lines += [
        "### Our per-request code in a tight loop (no gRPC)",
        "",
        "`.venv/bin/python -m tests.bench.hotpath`: the servicers' code on messages shaped as "
        "Envoy sends them (rpm, tpm, concurrency and a quota, counters in memory), the least of "
        "3 rounds. Served, the same code costs more per request: it runs between Envoy, the "
        "engine and gRPC, with cold caches (compare the own-code figure above).",
        "",
        report.markdown_table(
            ["stage", "µs/req"], [[s.name, f"{s.us_per_request:.1f}"] for s in stages]
        ),
        "",
        END,
    ]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    report.replace_section(path, BEGIN, END, text)
