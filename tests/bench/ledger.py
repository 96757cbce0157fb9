"""`make bench`'s usage-ledger section: how many records a second each store takes in batches.

    .venv/bin/python -m tests.bench.ledger [--quick]
    .venv/bin/python -m tests.bench.gateway --out docs/benchmarks.md --only ledger [--quick]

Each store (SQLite in a temporary directory; PostgreSQL in a database of the bench's own on the
local server, dropped after) is migrated, then written `RECORDS` new records in batches of 100
and of 1000, one batch after the other as the gateway's writer hands them over, each batch one
transaction. Then the last batch size again with every record already stored (a spill file
replayed): what idempotency costs. Wall-clock records per second, the database included (it
runs on the same 2 cores). The issue's budget: ≥ 20,000 records/s on PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from arks.adapters.ledger import PostgresLedger, SqliteLedger
from arks.ledger import LedgerStore, UsageRecord
from tests.bench import report
from tests.support.postgres import private_database

BEGIN = "<!-- ledger-bench: begin (python -m tests.bench.gateway --only ledger replaces this section) -->"
END = "<!-- ledger-bench: end -->"
BATCH_SIZES = (100, 1000)
BUDGET_RECORDS_S = 20_000  # issue 13: PostgreSQL insert throughput


@dataclass(frozen=True)
class Figure:
    store: str
    batch: int
    kind: str  # "new" or "replayed"
    records: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.records / self.seconds


def records(prefix: str, count: int, start: datetime) -> list[UsageRecord]:
    """`count` realistic records one millisecond apart, in a few tenants, users and models."""
    return [
        UsageRecord(
            request_id=f"{prefix}-{i:08d}-5b0c1f0e-8d7a-4c2b-9f1e",
            time=start + timedelta(milliseconds=i),
            namespace=f"team-{i % 7}",
            user=f"user-{i % 53}",
            model=("qwen-7b", "llama-70b", "mistral")[i % 3],
            engine=f"10.0.{i % 4}.7:8000",
            path="/v1/chat/completions",
            status=200,
            prompt_tokens=100 + i % 900,
            completion_tokens=20 + i % 300,
            cost=(100 + i % 900) * 2e-6 + (20 + i % 300) * 6e-6,
            source="reported" if i % 10 else "estimated",
            estimate_reason=None if i % 10 else "no_usage",
            duration_s=0.8,
            ttft_s=0.05,
        )
        for i in range(count)
    ]


async def _write_all(
    store: LedgerStore, batch: Sequence[UsageRecord], size: int
) -> tuple[int, float]:
    started = time.perf_counter()
    written = 0
    for i in range(0, len(batch), size):
        written += await store.write(batch[i : i + size])
    return written, time.perf_counter() - started


async def measure(name: str, store: LedgerStore, count: int) -> list[Figure]:
    await store.migrate()
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    await store.write(records(f"{name}-warm", 1000, start))  # connection, partitions, caches
    figures = []
    for size in BATCH_SIZES:
        batch = records(f"{name}-{size}", count, start)
        written, seconds = await _write_all(store, batch, size)
        if written != count:
            raise RuntimeError(f"{name}: {written} of {count} new records stored")
        figures.append(Figure(name, size, "new", count, seconds))
    written, seconds = await _write_all(store, batch, BATCH_SIZES[-1])
    if written != 0:
        raise RuntimeError(f"{name}: {written} replayed records stored again")
    figures.append(Figure(name, BATCH_SIZES[-1], "replayed", count, seconds))
    await store.close()
    return figures


async def _run(count: int) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="arks-ledger-bench-") as tmp:
        figures = await measure("sqlite", SqliteLedger(Path(tmp) / "usage.db"), count)
    with private_database() as url:
        figures += await measure("postgresql", PostgresLedger(url), count)
    return figures


def run_section(*, quick: bool, command: str) -> str:
    count = 20_000 if quick else 100_000
    figures = asyncio.run(_run(count))
    for f in figures:
        print(
            f"{f.store:<10} batch {f.batch:>5} {f.kind:<8} {f.rate:>10,.0f} records/s", flush=True
        )
    pg = next(f for f in figures if f.store == "postgresql" and f.kind == "new" and f.batch == 1000)
    if pg.rate < BUDGET_RECORDS_S:
        raise RuntimeError(
            f"PostgreSQL took {pg.rate:,.0f} records/s in batches of 1000: "
            f"the budget is ≥ {BUDGET_RECORDS_S:,}"
        )
    rows = "\n".join(
        f"| {f.store} | {f.batch} | {f.kind} | {f.records:,} | {f.seconds:.2f} | {f.rate:,.0f} |"
        for f in figures
    )
    return "\n".join(
        [
            BEGIN,
            "## Usage ledger: insert throughput",
            "",
            f"`{command}`: {count:,} records per line, written in batches one after the other "
            "(one transaction each), wall clock with the database on the same machine. "
            "*replayed*: the same records again, all already stored (skipped by request id). "
            f"Budget (issue 13): ≥ {BUDGET_RECORDS_S:,} records/s on PostgreSQL "
            f"(batches of 1000: **{pg.rate:,.0f}**).",
            "",
            "| store | batch | records | count | seconds | records/s |",
            "| --- | --- | --- | --- | --- | --- |",
            rows,
            END,
        ]
    )


def write_section(path: Path, text: str) -> None:
    report.replace_section(path, BEGIN, END, text)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.ledger", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="20,000 records per line, not 100,000")
    parser.add_argument("--out", type=Path, help="replace the ledger section of this markdown file")
    args = parser.parse_args(argv)
    try:
        section = run_section(
            quick=args.quick,
            command="python -m tests.bench.ledger" + (" --quick" if args.quick else ""),
        )
    except RuntimeError as err:
        raise SystemExit(f"bench FAILED (ledger): {err}") from err
    if args.out is not None:
        write_section(args.out, section)
        print(f"wrote the ledger section of {args.out}")


if __name__ == "__main__":
    main()
