"""`arks usage`'s pure parts: the range and grouping arguments, and the three output formats."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime

import pytest

from arks.ledger import ReportQuery, ReportRow
from launcher.cli import build_parser
from launcher.usage import (
    UsageError,
    build_query,
    parse_group_by,
    parse_time,
    render,
    tabulate,
    totals,
)

NOW = datetime(2026, 3, 17, 15, 30, 45, tzinfo=UTC)


def args(*argv: str) -> object:
    return build_parser().parse_args(["usage", *argv])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-01", datetime(2026, 3, 1, tzinfo=UTC)),
        ("2026-03-01T12:00:00", datetime(2026, 3, 1, 12, tzinfo=UTC)),  # no offset: UTC
        ("2026-03-01T12:00:00Z", datetime(2026, 3, 1, 12, tzinfo=UTC)),
        ("2026-03-01T14:00:00+02:00", datetime(2026, 3, 1, 12, tzinfo=UTC)),
        ("now", NOW),
        ("30m", datetime(2026, 3, 17, 15, 0, 45, tzinfo=UTC)),
        ("12h", datetime(2026, 3, 17, 3, 30, 45, tzinfo=UTC)),
        ("7d", datetime(2026, 3, 10, 15, 30, 45, tzinfo=UTC)),
        ("2w", datetime(2026, 3, 3, 15, 30, 45, tzinfo=UTC)),
    ],
)
def test_times(text: str, expected: datetime) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "7", "7y", "2026-13-01", "-3d", ""])
def test_bad_times_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_time(text, NOW)


def test_the_default_range_is_this_month_so_far() -> None:
    query = build_query(args(), NOW)
    assert (query.start, query.end) == (datetime(2026, 3, 1, tzinfo=UTC), NOW)
    assert query.group_by == ("namespace", "user", "model")
    assert query.granularity == "none"
    assert (query.namespaces, query.users, query.models) == ((), (), ())


def test_filters_repeat_and_the_range_must_not_be_empty() -> None:
    query = build_query(
        args("--since", "7d", "--until", "1d", "--namespace", "a", "--namespace", "b",
             "--user", "u", "--model", "m", "--by", "model,namespace", "--granularity", "week"),
        NOW,
    )  # fmt: skip
    assert query.namespaces == ("a", "b") and query.users == ("u",) and query.models == ("m",)
    assert query.group_by == ("model", "namespace") and query.granularity == "week"
    with pytest.raises(UsageError, match="empty"):
        build_query(args("--since", "1d", "--until", "2d"), NOW)


def test_group_by() -> None:
    assert parse_group_by("namespace,user,model") == ("namespace", "user", "model")
    assert parse_group_by("user") == ("user",)
    assert parse_group_by("none") == () == parse_group_by("")
    with pytest.raises(UsageError, match="tenant"):
        parse_group_by("namespace,tenant")
    with pytest.raises(UsageError, match="twice"):
        parse_group_by("user,user")


def _row(day: int, ns: str, model: str, requests: int, cost: float) -> ReportRow:
    return ReportRow(
        period=datetime(2026, 3, day, tzinfo=UTC),
        namespace=ns,
        user=None,
        model=model,
        requests=requests,
        prompt_tokens=requests * 10,
        completion_tokens=requests * 3,
        cost=cost,
        estimated_requests=1,
    )


QUERY = ReportQuery(NOW, NOW, group_by=("model", "namespace"), granularity="day")
ROWS = [_row(1, "team-a", "m1", 2, 0.1234567891), _row(2, "team-b", "m2", 5, 2.0)]


def test_the_table_is_aligned_with_a_totals_row() -> None:
    text = render(tabulate(ROWS, QUERY), "table")
    lines = text.splitlines()
    assert lines[0].split() == [
        "day", "model", "namespace", "requests", "prompt_tokens", "completion_tokens",
        "total_tokens", "cost", "estimated_requests",
    ]  # fmt: skip
    assert set(lines[1].replace(" ", "")) == {"-"} and lines[1] == lines[-2]
    assert lines[2].split() == ["2026-03-01", "m1", "team-a", "2", "20", "6", "26",
                                "0.123457", "1"]  # fmt: skip
    assert lines[-1].split() == ["total", "7", "70", "21", "91", "2.123457", "2"]
    # figures right-aligned: every line ends at the same column
    assert len({len(line) for line in lines}) == 1


def test_csv_and_json_carry_the_same_rows() -> None:
    table = tabulate(ROWS, QUERY)
    parsed_csv = list(csv.DictReader(io.StringIO(render(table, "csv"))))
    parsed_json = json.loads(render(table, "json"))
    assert [r["namespace"] for r in parsed_csv] == ["team-a", "team-b"]
    assert parsed_json[0] == {
        "day": "2026-03-01", "model": "m1", "namespace": "team-a", "requests": 2,
        "prompt_tokens": 20, "completion_tokens": 6, "total_tokens": 26, "cost": 0.123457,
        "estimated_requests": 1,
    }  # fmt: skip
    for c, j in zip(parsed_csv, parsed_json, strict=True):
        assert {k: str(v) for k, v in j.items() if k != "cost"} == {
            k: v for k, v in c.items() if k != "cost"
        }
        assert float(c["cost"]) == j["cost"]


def test_periods_by_granularity_and_no_grouping() -> None:
    month = ReportQuery(NOW, NOW, group_by=(), granularity="month")
    rows = [
        ReportRow(datetime(2026, 3, 1, tzinfo=UTC), None, None, None, 1, 1, 1, 0.5, 0),
    ]
    table = tabulate(rows, month)
    assert table.columns[0] == "month" and table.rows[0][0] == "2026-03"
    assert totals(table) == ("total", 1, 1, 1, 2, 0.5, 0)
    flat = tabulate(
        [ReportRow(None, None, None, None, 1, 1, 1, 0.5, 0)], ReportQuery(NOW, NOW, (), "none")
    )
    assert totals(flat) == (1, 1, 1, 2, 0.5, 0)
    assert render(tabulate([], QUERY), "json").strip() == "[]"
    assert render(tabulate([], QUERY), "csv").count("\n") == 1  # the header alone
