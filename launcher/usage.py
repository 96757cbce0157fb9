"""`arks usage`: totals from the usage ledger, for chargeback.

Tokens and cost by namespace, user and model (any subset), per day, ISO week, month or over the
whole range, from either store (`--ledger sqlite:///.arks/usage.db`, the file `arks up` writes,
or `postgresql://…`), as an aligned table with a totals row, CSV or JSON. The range is
`--since <= time < --until` (UTC); the default is this month so far.

The figures are the store's own `report` (arks.ledger.ReportQuery): the same query the quota
rebuild and the Billing dashboard's chargeback table add up, so all of them agree.

Parsing and formatting are pure functions; only `main` opens the ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

from arks.ledger import Granularity, GroupBy, ReportQuery, ReportRow

DEFAULT_LEDGER = "sqlite:///{state_dir}/usage.db"  # where `arks up` writes it
FORMATS = ("table", "csv", "json")
GROUPS: tuple[GroupBy, ...] = get_args(GroupBy)
GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)
COST_DECIMALS = 6
_RELATIVE = re.compile(r"(\d+)([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# The figures of a row, after its period and labels, in the order shown.
FIGURES = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
    "estimated_requests",
)


class UsageError(Exception):
    """A bad argument or an unusable ledger: one line to the user, exit status 2."""


# --- arguments ----------------------------------------------------------------------------------


def parse_time(text: str, now: datetime) -> datetime:
    """An instant (UTC, aware) from `2025-05-01` (its midnight), an ISO datetime (no offset:
    UTC), `now`, or an age relative to `now`: `30m`, `12h`, `7d`, `2w`."""
    text = text.strip()
    if text == "now":
        return now
    relative = _RELATIVE.fullmatch(text)
    if relative:
        amount, unit = relative.groups()
        return now - timedelta(**{_UNITS[unit]: int(amount)})
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{text!r} is not a date (2025-05-01), a datetime (2025-05-01T12:00:00Z), "
            "now, or an age (30m, 12h, 7d, 2w)"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def month_start(now: datetime) -> datetime:
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def parse_group_by(text: str) -> tuple[GroupBy, ...]:
    """`namespace,user,model` or any subset in any order; `none` (or empty) for no grouping."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise UsageError(f"--by: {', '.join(unknown)}: not one of {', '.join(GROUPS)} (or none)")
    if len(set(names)) != len(names):
        raise UsageError(f"--by: {text!r} names a column twice")
    return tuple(n for n in names if n in GROUPS)


def build_query(args: argparse.Namespace, now: datetime) -> ReportQuery:
    start = parse_time(args.since, now) if args.since else month_start(now)
    end = parse_time(args.until, now) if args.until else now
    if start >= end:
        raise UsageError(f"the range is empty: --since {start:%F %T}Z is not before {end:%F %T}Z")
    return ReportQuery(
        start=start,
        end=end,
        group_by=parse_group_by(args.by),
        granularity=args.granularity,
        namespaces=tuple(args.namespace),
        users=tuple(args.user),
        models=tuple(args.model),
    )


def ledger_url(args: argparse.Namespace) -> str:
    return str(args.ledger).replace("{state_dir}", str(args.state_dir))


def check_sqlite_exists(url: str) -> None:
    """A report must not create an empty SQLite file where the ledger was expected (a typo, or
    `arks up` never ran here): that is an error, not an empty report."""
    from arks.adapters.ledger import sqlite_path

    try:
        path = sqlite_path(url)
    except ValueError as err:
        raise UsageError(f"--ledger: {err}") from None
    if path is not None and not Path(path).is_file():
        raise UsageError(f"no ledger at {path} (`arks up` writes one in its --state-dir)")


# --- output -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """The report as columns and rows of plain values (str, int, float), shared by the formats."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


def period_text(period: datetime | None, granularity: Granularity) -> str:
    if period is None:
        return ""
    return f"{period:%Y-%m}" if granularity == "month" else f"{period:%Y-%m-%d}"


def tabulate(rows: Sequence[ReportRow], query: ReportQuery) -> Table:
    """Columns: the period (named by the granularity: day, week, month) unless `none`, the
    grouped labels in the order asked, then the figures; rows ordered by those columns."""
    timed = query.granularity != "none"
    columns = ((query.granularity,) if timed else ()) + query.group_by + FIGURES
    never = datetime.min.replace(tzinfo=UTC)
    out = []
    for r in sorted(
        rows, key=lambda r: (r.period or never, *(getattr(r, n) or "" for n in query.group_by))
    ):
        labels = tuple(getattr(r, name) or "" for name in query.group_by)
        figures = (
            r.requests,
            r.prompt_tokens,
            r.completion_tokens,
            r.prompt_tokens + r.completion_tokens,
            round(r.cost, COST_DECIMALS),
            r.estimated_requests,
        )
        period = (period_text(r.period, query.granularity),) if timed else ()
        out.append(period + labels + figures)
    return Table(columns, tuple(out))


def totals(table: Table) -> tuple[Any, ...]:
    """The totals row: figures summed, the first label column saying `total`."""
    first_figure = len(table.columns) - len(FIGURES)
    sums = [sum(row[i] for row in table.rows) for i in range(first_figure, len(table.columns))]
    sums[FIGURES.index("cost")] = round(sums[FIGURES.index("cost")], COST_DECIMALS)
    labels = ["total", *([""] * (first_figure - 1))] if first_figure else []
    return (*labels, *sums)


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.{COST_DECIMALS}f}"
    return str(value)


def render_table(table: Table) -> str:
    """Aligned columns (labels left, figures right), a rule, the rows, a rule and the totals."""
    body = [tuple(cell(v) for v in row) for row in table.rows]
    total = tuple(cell(v) for v in totals(table))
    widths = [
        max(len(c), *(len(r[i]) for r in [*body, total])) for i, c in enumerate(table.columns)
    ]
    numeric = [i >= len(table.columns) - len(FIGURES) for i in range(len(table.columns))]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(table.columns), rule, *(line(r) for r in body), rule, line(total)]
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows(tuple(cell(v) for v in row) for row in table.rows)
    return out.getvalue()


def render_json(table: Table) -> str:
    return json.dumps([dict(zip(table.columns, row, strict=True)) for row in table.rows], indent=1)


def render(table: Table, fmt: str) -> str:
    return {"table": render_table, "csv": render_csv, "json": render_json}[fmt](table)


def caption(query: ReportQuery, where: str) -> str:
    return f"Usage from {query.start:%F %T}Z to {query.end:%F %T}Z (ledger {where})\n"


# --- the command --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ledger",
        metavar="URL",
        default=DEFAULT_LEDGER,
        help="sqlite:///path/usage.db, a path, or postgresql://user@host/db "
        "(default: the one `arks up` writes, sqlite:///<state-dir>/usage.db)",
    )
    parser.add_argument(
        "--state-dir", type=Path, default=Path(".arks"), help="`arks up`'s --state-dir"
    )
    parser.add_argument(
        "--since",
        metavar="WHEN",
        help="start (inclusive): 2025-05-01, 2025-05-01T12:00:00Z, or an age: 30m, 12h, 7d, 2w "
        "(default: the start of this month, UTC)",
    )
    parser.add_argument(
        "--until", metavar="WHEN", help="end (exclusive), same forms (default: now)"
    )
    parser.add_argument(
        "--by",
        default=",".join(GROUPS),
        metavar="COLUMNS",
        help="group by these, comma-separated: namespace,user,model (any subset; none: totals)",
    )
    parser.add_argument(
        "--granularity", choices=GRANULARITIES, default="none", help="periods (default: none)"
    )
    for name in ("namespace", "user", "model"):
        parser.add_argument(
            f"--{name}", action="append", default=[], help=f"only this {name} (repeatable)"
        )
    parser.add_argument("--format", choices=FORMATS, default="table")


async def fetch(url: str, query: ReportQuery) -> tuple[list[ReportRow], str]:
    from arks.adapters.ledger import open_ledger, where

    try:
        store = open_ledger(url)
    except ValueError as err:
        raise UsageError(f"--ledger: {err}") from None
    try:
        return await store.report(query), where(url)
    finally:
        await store.close()


def run(args: argparse.Namespace, now: datetime | None = None) -> int:
    now = datetime.now(UTC) if now is None else now
    try:
        query = build_query(args, now)
        url = ledger_url(args)
        check_sqlite_exists(url)
        rows, where = asyncio.run(fetch(url, query))
    except UsageError as err:
        print(f"arks usage: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the database's own reason, in one line, beats a traceback here
        reason = " ".join(str(err).split())  # libpq's reasons span lines: one line here
        print(f"arks usage: cannot read the ledger: {reason}", file=sys.stderr)
        return 2
    table = tabulate(rows, query)
    if args.format == "table":
        sys.stdout.write(caption(query, where))
    sys.stdout.write(render(table, args.format))
    if args.format == "json":
        sys.stdout.write("\n")
    return 0
