"""`make bench`'s usage-ledger section: the gateway's Python CPU per request with the ledger on
(SQLite, the `arks up` default; PostgreSQL on 127.0.0.1:5432) against the same gateway with it
off, under the same load, interleaved (budget: at most 1.05x).

    .venv/bin/python -m tests.bench.gateway --out docs/benchmarks.md --only ledger-cpu

Needs PostgreSQL on 127.0.0.1:5432 (trust auth); a database of its own is created and dropped.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg

from launcher.procs import Supervisor
from tests.bench import report, targets, wrk
from tests.bench.workloads import chat, preflight, stream

BEGIN = "<!-- ledger-cpu-bench: begin (python -m tests.bench.gateway --only ledger-cpu replaces this section) -->"
END = "<!-- ledger-cpu-bench: end -->"
BUDGET = 1.05
PG = "postgresql://postgres@127.0.0.1:5432"


@contextmanager
def pg_database() -> Iterator[str]:
    name = f"arks_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{PG}/{name}"
    finally:
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run_section(*, quick: bool, command: str) -> str:
    from tests.bench.gateway import ENGINE_OUTPUT_TOKENS, Arm, Settings, measure

    settings = Settings.from_args(["--quick"] if quick else ["--duration", "60", "--rounds", "6"])
    wrk_bin = wrk.ensure_wrk()
    token = "sk-arks-bench-ledger-" + uuid.uuid4().hex
    workloads = [chat(32), stream(32, client_asks_usage=False)]
    lines = [
        BEGIN,
        "## Usage ledger: gateway Python CPU per request, ledger on ÷ off",
        "",
        f"`{command}`; the same gateway three times (ledger off, on SQLite, on PostgreSQL), "
        "one simulated engine, interleaved rounds. Python CPU: extproc and the controller "
        f"(their /proc CPU time over the requests served). Budget: at most {BUDGET}x. "
        "SQLite's own work (B-tree inserts, the log) runs in the gateway's process, on the "
        "writer's thread; PostgreSQL's runs in the database server, not counted here.",
        "",
        "| workload | off µs/req | SQLite µs/req | PostgreSQL µs/req | SQLite ÷ off | PostgreSQL ÷ off |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="arks-bench-ledger-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        url = stack.enter_context(pg_database())
        sup = stack.enter_context(Supervisor(log_dir=work / "logs"))
        engine_port = targets.start_engine(sup, ENGINE_OUTPUT_TOKENS)
        conc = settings.envoy_concurrency
        configs = [
            stack.enter_context(targets.gateway(work, engine_port, token, conc, None, "off")),
            stack.enter_context(
                targets.gateway(
                    work, engine_port, token, conc, f"sqlite:///{work}/usage.db", "sqlite"
                )
            ),
            stack.enter_context(targets.gateway(work, engine_port, token, conc, url, "postgresql")),
        ]
        for workload in workloads:
            for target in configs:
                preflight(target.url, workload, token, target.name)
            results = measure(
                wrk_bin, [Arm(t.name, t, workload) for t in configs], work, token, settings
            )
            off, sqlite, pg = (results[(workload.key, t.name)].python_us for t in configs)
            row = (
                f"| {workload.title} | {off:.0f} | {sqlite:.0f} | {pg:.0f} | "
                f"{sqlite / off:.3f} | {pg / off:.3f} |"
            )
            print(row, flush=True)
            lines.append(row)
    lines += ["", END]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    report.replace_section(path, BEGIN, END, text)
