"""`arks usage` as a user runs it (the installed `arks` command), over a real SQLite file and a
real PostgreSQL database holding the same records, written through the real stores.

Every format parses back to the same rows and totals, those equal the totals computed in Python
from the records themselves, and both stores print the very same report. A bad URL, a missing
file and an unreachable server each end with exit status 2 and one line, no traceback."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from arks.adapters.ledger.rows import period_start
from launcher.procs import free_port
from launcher.usage import FIGURES
from tests.support import ledger_records as lr
from tests.support.postgres import private_database

RECORDS = lr.records()
SINCE, UNTIL = lr.START.isoformat(), (lr.START + timedelta(days=lr.DAYS)).isoformat()
# (--by, --granularity): every grouping column and every granularity at least once.
SHAPES = [
    ("namespace,user,model", "none"),
    ("namespace", "day"),
    ("model,user", "week"),
    ("none", "month"),
]
COST_ROUNDING = 5e-7  # the report prints six decimals


def arks_usage(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", "usage", *argv],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    sqlite = f"sqlite:///{tmp_path_factory.mktemp('usage') / 'usage.db'}"
    lr.store(sqlite, RECORDS)
    with private_database() as postgres:
        lr.store(postgres, RECORDS)
        yield {"sqlite": sqlite, "postgresql": postgres}


def report(url: str, fmt: str, *argv: str) -> str:
    done = arks_usage("--ledger", url, "--since", SINCE, "--until", UNTIL, "--format", fmt, *argv)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def parse_table(text: str) -> tuple[list[dict[str, str]], list[str]]:
    """Rows (as text) and the totals' figures of the table format."""
    lines = text.splitlines()
    assert lines[0].startswith("Usage from ")
    header, rule, *body, rule_again, total = lines[1:]
    assert rule == rule_again and set(rule.replace(" ", "")) == {"-"}
    columns = header.split()
    rows = [dict(zip(columns, line.split(), strict=True)) for line in body]
    return rows, total.split()[-len(FIGURES) :]


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def as_text(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{k: f"{v:.6f}" if k == "cost" else str(v) for k, v in r.items()} for r in rows]


def expected(by: str, granularity: str) -> dict[Any, lr.Totals]:
    """The report's groups, from the records: (period, labels...) -> totals."""
    columns = [] if by == "none" else by.split(",")

    def key(r: Any) -> tuple[str, ...]:
        start = period_start(granularity, r.time)
        period = () if start is None else (f"{start:%Y-%m}" if granularity == "month"
                                           else f"{start:%Y-%m-%d}",)  # fmt: skip
        return period + tuple(getattr(r, c) for c in columns)

    return lr.totals_by(RECORDS, key)


@pytest.mark.parametrize(("by", "granularity"), SHAPES)
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_every_format_gives_the_records_totals(
    ledgers: dict[str, str], store: str, by: str, granularity: str
) -> None:
    argv = ("--by", by, "--granularity", granularity)
    table_rows, table_total = parse_table(report(ledgers[store], "table", *argv))
    csv_rows = parse_csv(report(ledgers[store], "csv", *argv))
    json_rows = json.loads(report(ledgers[store], "json", *argv))
    assert table_rows == csv_rows == as_text(json_rows)

    want = expected(by, granularity)
    labels = [c for c in csv_rows[0] if c not in FIGURES]
    assert len(labels) == (granularity != "none") + (0 if by == "none" else len(by.split(",")))
    assert [tuple(r[c] for c in labels) for r in json_rows] == sorted(want)
    for row in json_rows:
        t = want[tuple(row[c] for c in labels)]
        assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (
            t.requests, t.prompt_tokens, t.completion_tokens,
        )  # fmt: skip
        assert (row["total_tokens"], row["estimated_requests"]) == (
            t.total_tokens, t.estimated_requests,
        )  # fmt: skip
        assert abs(row["cost"] - t.cost) <= COST_ROUNDING
        assert row["cost"] == round(row["cost"], 6)

    everything = lr.total(RECORDS)
    requests, prompt, completion, tokens, cost, estimated = table_total
    assert (int(requests), int(prompt), int(completion), int(tokens), int(estimated)) == (
        everything.requests, everything.prompt_tokens, everything.completion_tokens,
        everything.total_tokens, everything.estimated_requests,
    )  # fmt: skip
    assert len(cost.partition(".")[2]) == 6
    assert abs(float(cost) - everything.cost) <= COST_ROUNDING * len(json_rows)


@pytest.mark.parametrize(("by", "granularity"), SHAPES)
def test_both_stores_print_the_same_report(
    ledgers: dict[str, str], by: str, granularity: str
) -> None:
    argv = ("--by", by, "--granularity", granularity)
    for fmt in ("csv", "json"):
        assert report(ledgers["sqlite"], fmt, *argv) == report(ledgers["postgresql"], fmt, *argv)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_filters_and_the_range(ledgers: dict[str, str], store: str) -> None:
    since = lr.START + timedelta(days=2, hours=5)
    until = lr.START + timedelta(days=6)
    done = arks_usage(
        "--ledger", ledgers[store], "--since", since.isoformat(), "--until", until.isoformat(),
        "--namespace", "team-a", "--namespace", "team-b", "--user", "alice", "--user", "carol",
        "--model", "model-b", "--by", "user", "--format", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    picked = [
        r for r in RECORDS
        if since <= r.time < until and r.user in ("alice", "carol") and r.model == "model-b"
    ]  # fmt: skip
    want = lr.totals_by(picked, lambda r: r.user)
    rows = json.loads(done.stdout)
    assert [r["user"] for r in rows] == ["alice", "carol"]
    for row in rows:
        assert row["total_tokens"] == want[row["user"]].total_tokens
        assert abs(row["cost"] - want[row["user"]].cost) <= COST_ROUNDING


def test_the_default_ledger_is_the_one_arks_up_writes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    lr.store(f"sqlite:///{state / 'usage.db'}", RECORDS[:10])
    done = arks_usage("--state-dir", str(state), "--since", SINCE, "--until", UNTIL,
                      "--by", "none", "--format", "json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["requests"] == 10
    empty = arks_usage("--state-dir", str(state), "--since", "2020-01-01", "--until", "2020-02-01")
    assert empty.returncode == 0 and empty.stdout.splitlines()[-1].split()[0] == "total"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("--ledger", "mysql://db/usage"), "--ledger"),
        (("--ledger", "sqlite:relative.db"), "sqlite:///"),
        (("--ledger", "sqlite:////nowhere/usage.db"), "no ledger at /nowhere/usage.db"),
        (("--ledger", f"postgresql://postgres@127.0.0.1:{free_port()}/x"), "cannot read"),
        (("--since", "last tuesday"), "last tuesday"),
        (("--by", "tenant"), "tenant"),
    ],
)
def test_bad_arguments_and_unreachable_ledgers_exit_2_in_one_line(
    tmp_path: Path, argv: tuple[str, ...], says: str
) -> None:
    started = datetime.now()
    done = arks_usage("--state-dir", str(tmp_path), *argv)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("arks usage: ") and says in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert datetime.now() - started < timedelta(seconds=30)
    assert not (tmp_path / "usage.db").exists()  # a report never creates a ledger


def test_a_missing_default_ledger_says_where_it_looked(tmp_path: Path) -> None:
    done = arks_usage("--state-dir", str(tmp_path))
    assert done.returncode == 2
    assert f"no ledger at {tmp_path}/usage.db" in done.stderr
    assert not (tmp_path / "usage.db").exists()
