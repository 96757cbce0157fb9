"""The ledger stores' pure decisions: batches, months, partitions, periods, rows, URLs,
migration files."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from arks.adapters.ledger import migrations, rows, sqlite_path
from arks.adapters.ledger.postgres import create_partition, partition_month, partition_name
from arks.ledger import ReportQuery, ReportRow, UsageRecord


def record(request_id: str, time: datetime, prompt: int = 1) -> UsageRecord:
    return UsageRecord(
        request_id,
        time,
        "ns",
        "u",
        "m",
        "",
        "/v1/completions",
        200,
        prompt,
        0,
        None,
        "reported",
        None,
        None,
        None,
    )


T = datetime(2025, 3, 9, 12, tzinfo=UTC)


def test_first_of_each_keeps_the_first_record_of_a_request_id_in_order() -> None:
    batch = [record("a", T, 1), record("b", T), record("a", T, 2), record("c", T), record("b", T)]
    assert [(r.request_id, r.prompt_tokens) for r in rows.first_of_each(batch)] == [
        ("a", 1),
        ("b", 1),
        ("c", 1),
    ]


def test_utc_converts_and_refuses_naive_times() -> None:
    east = datetime(2025, 1, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    assert rows.utc(east) == datetime(2024, 12, 31, 23, tzinfo=UTC)
    assert rows.utc(east).tzinfo is UTC
    with pytest.raises(ValueError, match="timezone-aware"):
        rows.utc(datetime(2025, 1, 1))


def test_months_are_utc_months_and_december_rolls_over() -> None:
    east = datetime(2025, 1, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    assert rows.month_of(east) == date(2024, 12, 1)
    assert rows.next_month(date(2024, 12, 1)) == date(2025, 1, 1)
    assert rows.next_month(date(2025, 1, 1)) == date(2025, 2, 1)
    assert rows.months_of([record("a", T), record("b", east), record("c", T)]) == {
        date(2025, 3, 1),
        date(2024, 12, 1),
    }


@pytest.mark.parametrize(
    ("granularity", "expected"),
    [
        ("day", datetime(2025, 3, 9, tzinfo=UTC)),
        ("week", datetime(2025, 3, 3, tzinfo=UTC)),  # 9 March 2025 is a Sunday
        ("month", datetime(2025, 3, 1, tzinfo=UTC)),
        ("none", None),
    ],
)
def test_period_start(granularity: str, expected: datetime | None) -> None:
    assert rows.period_start(granularity, T) == expected


def test_a_monday_starts_its_own_week() -> None:
    monday = datetime(2024, 12, 30, 0, 0, tzinfo=UTC)
    assert rows.period_start("week", monday) == monday
    assert rows.period_start("week", monday - timedelta(microseconds=1)) == datetime(
        2024, 12, 23, tzinfo=UTC
    )
    with pytest.raises(ValueError, match="granularity"):
        rows.period_start("year", monday)


def test_report_row_blanks_the_labels_not_grouped_and_rounds_the_cost() -> None:
    query = ReportQuery(T, T, group_by=("model",), granularity="none")
    got = rows.report_row(query, None, ("ns", "u", "m"), (3, 30, 4, 0.1 + 0.2, 1))
    assert got == ReportRow(None, None, None, "m", 3, 30, 4, 0.3, 1)
    unpriced = rows.report_row(query, T, ("ns", "u", "m"), (1, 0, 0, None, 0))
    assert unpriced.cost == 0.0 and unpriced.period == T


def test_rows_are_ordered_by_period_then_labels_by_code_point() -> None:
    def make(period: datetime | None, ns: str) -> ReportRow:
        return ReportRow(period, ns, None, None, 1, 0, 0, 0.0, 0)

    later = T + timedelta(days=1)
    got = rows.ordered([make(later, "a"), make(T, "b"), make(T, "B"), make(T, "_")])
    assert [(r.period, r.namespace) for r in got] == [(T, "B"), (T, "_"), (T, "b"), (later, "a")]


def test_partition_names_round_trip() -> None:
    assert partition_name(date(2019, 5, 1)) == "usage_records_y2019m05"
    assert partition_month("usage_records_y2019m05") == date(2019, 5, 1)
    assert partition_month("usage_records_default") is None
    assert partition_month("usage_request_ids") is None


def test_a_partition_spans_its_utc_month() -> None:
    ddl = create_partition(date(2024, 12, 1)).as_string(None)
    assert ddl == (
        'CREATE TABLE IF NOT EXISTS "usage_records_y2024m12" PARTITION OF usage_records '
        "FOR VALUES FROM ('2024-12-01 00:00:00+00') TO ('2025-01-01 00:00:00+00')"
    )


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///.arks/usage.db", ".arks/usage.db"),
        ("sqlite:////var/lib/arks/usage.db", "/var/lib/arks/usage.db"),
        ("/var/lib/arks/usage.db", "/var/lib/arks/usage.db"),
        ("usage.db", "usage.db"),
        ("postgresql://db/arks", None),
    ],
)
def test_sqlite_urls(url: str, path: str | None) -> None:
    assert sqlite_path(url) == path


def test_a_sqlite_url_without_three_slashes_is_refused() -> None:
    with pytest.raises(ValueError, match="sqlite:///path"):
        sqlite_path("sqlite://usage.db")


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_shipped_migrations_load_in_order(dialect: migrations.Dialect) -> None:
    found = migrations.load(dialect)
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert found[0].name == "usage_records"


def test_migration_files_must_be_numbered_without_gaps(tmp_path: Path) -> None:
    (tmp_path / "sqlite").mkdir()
    (tmp_path / "sqlite" / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "sqlite" / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="not 1, 2, 3"):
        migrations.load("sqlite", tmp_path)
    (tmp_path / "sqlite" / "0003_c.sql").rename(tmp_path / "sqlite" / "3_c.sql")
    with pytest.raises(ValueError, match="NNNN_name"):
        migrations.load("sqlite", tmp_path)


def test_pending_migrations_are_the_ones_not_applied() -> None:
    found = [migrations.Migration(v, f"m{v}", "") for v in (1, 2, 3)]
    assert [m.version for m in migrations.pending(found, [1, 3])] == [2]
    assert migrations.pending(found, [1, 2, 3]) == []


def test_sqlite_scripts_split_into_statements() -> None:
    script = (
        "-- a comment\nCREATE TABLE t (a TEXT DEFAULT ';');\n\nCREATE INDEX i ON t (a);\n-- end\n"
    )
    assert migrations.statements(script) == [
        "-- a comment\nCREATE TABLE t (a TEXT DEFAULT ';');",
        "CREATE INDEX i ON t (a);",
    ]
    with pytest.raises(ValueError, match="incomplete"):
        migrations.statements("CREATE TABLE t (a TEXT)")
