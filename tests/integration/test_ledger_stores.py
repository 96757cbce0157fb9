"""The usage ledger's stores against real databases: SQLite files and the shared PostgreSQL
server (a database of this session's own, a schema per test).

The same contract for both (`LedgerStore`): migrations applied once, request-id idempotency,
reports; then what only PostgreSQL has (partitions, retention, a server that goes away).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from arks.adapters.ledger import PostgresLedger, SqliteLedger, open_ledger
from arks.adapters.ledger.rows import period_start
from arks.adapters.ledger.sqlite import SYNC_S, statement_sizes
from arks.ledger import (
    Granularity,
    GroupBy,
    LedgerStore,
    LedgerUnavailable,
    QuotaTotals,
    ReportQuery,
    ReportRow,
    UsageRecord,
)
from tests.support.postgres import cut_proxy, new_schema, private_database, through
from tests.support.stall_proxy import stall_proxy

T0 = datetime(2024, 12, 30, 22, 0, tzinfo=UTC)  # a Monday, two hours before a new year


def record(request_id: str, time: datetime = T0, **fields: Any) -> UsageRecord:
    base = UsageRecord(
        request_id=request_id,
        time=time,
        namespace="team-a",
        user="alice",
        model="qwen",
        engine="10.0.0.1:8000",
        path="/v1/chat/completions",
        status=200,
        prompt_tokens=10,
        completion_tokens=5,
        cost=0.25,
        source="reported",
        estimate_reason=None,
        duration_s=0.5,
        ttft_s=0.05,
    )
    return dataclasses.replace(base, **fields)


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with private_database() as url:
        yield url


@pytest.fixture
def pg_url(database: str) -> str:
    return new_schema(database)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path, database: str) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger/usage.db"
    return new_schema(database)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[LedgerStore]:
    ledger = open_ledger(store_url)
    assert await ledger.migrate() == 1
    try:
        yield ledger
    finally:
        await ledger.close()


def everything(start: datetime = T0 - timedelta(days=400), **fields: Any) -> ReportQuery:
    return ReportQuery(start=start, end=T0 + timedelta(days=400), granularity="none", **fields)


async def total_requests(store: LedgerStore) -> int:
    return sum(row.requests for row in await store.report(everything(group_by=())))


# --- migrations ---------------------------------------------------------------------------


def applied_versions(url: str) -> list[tuple[int, str]]:
    query = "SELECT version, name FROM schema_migrations ORDER BY version"
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            return [tuple(row) for row in conn.execute(query)]  # type: ignore[misc]
    with psycopg.connect(url) as conn:
        return [tuple(row) for row in conn.execute(query)]  # type: ignore[misc]


async def test_migrations_are_applied_once_and_rerun_safely(store_url: str) -> None:
    first = open_ledger(store_url)
    assert await first.migrate() == 1
    assert await first.migrate() == 1
    await first.write([record("r1")])
    await first.close()
    again = open_ledger(store_url)  # a restarted process
    assert await again.migrate() == 1
    assert await total_requests(again) == 1, "re-migrating kept the records"
    await again.close()
    assert applied_versions(store_url) == [(1, "usage_records")]


async def test_two_processes_migrating_at_once_both_succeed(store_url: str) -> None:
    stores = [open_ledger(store_url) for _ in range(4)]  # each its own connection
    try:
        assert await asyncio.gather(*(s.migrate() for s in stores)) == [1, 1, 1, 1]
        assert await stores[0].write([record("r1")]) == 1
        assert await stores[3].write([record("r1")]) == 0
    finally:
        for s in stores:
            await s.close()
    assert applied_versions(store_url) == [(1, "usage_records")]


async def test_many_stores_opening_a_new_sqlite_file_at_once_all_open(tmp_path: Path) -> None:
    """Each connection switches a new file to write-ahead logging; SQLite refuses all but one
    of those racing at once without waiting (the migration test above failed 1 run in ~20)."""
    for attempt in range(10):
        stores = [SqliteLedger(tmp_path / f"race{attempt}" / "usage.db") for _ in range(8)]
        try:
            assert await asyncio.gather(*(s.migrate() for s in stores)) == [1] * 8
        finally:
            for s in stores:
                await s.close()


# --- idempotency --------------------------------------------------------------------------


async def test_a_request_id_twice_in_one_batch_is_stored_once(store: LedgerStore) -> None:
    first = record("dup", prompt_tokens=7)
    assert await store.write([first, record("other"), record("dup", prompt_tokens=999)]) == 2
    rows = await store.report(everything(group_by=()))
    assert [(r.requests, r.prompt_tokens) for r in rows] == [(2, 7 + 10)], "the first one kept"


async def test_a_request_id_again_in_a_later_batch_is_skipped(store: LedgerStore) -> None:
    assert await store.write([record("a"), record("b")]) == 2
    assert await store.write([record("b", completion_tokens=50), record("c")]) == 1
    assert await store.write([record("a"), record("c")]) == 0
    rows = await store.report(everything(group_by=()))
    assert [(r.requests, r.completion_tokens) for r in rows] == [(3, 15)]


async def test_a_request_id_with_a_time_in_another_month_is_skipped(store: LedgerStore) -> None:
    """Another replica's clock, or a month boundary: on PostgreSQL another partition."""
    assert await store.write([record("x", time=T0)]) == 1
    assert await store.write([record("x", time=T0 - timedelta(days=70))]) == 0
    assert await store.write([record("x", time=T0 + timedelta(days=40))]) == 0
    assert await total_requests(store) == 1


@pytest.mark.parametrize("size", [1, 127, 128, 129, 383, 500])
async def test_every_record_of_a_batch_of_any_size_is_stored(store: LedgerStore, size: int) -> None:
    """SQLite cuts a batch into statements of power-of-two sizes (128 + 64 + ... + 1)."""
    batch = [record(f"r{i}", prompt_tokens=i) for i in range(size)]
    assert await store.write(batch) == size
    rows = await store.report(everything(group_by=()))
    assert [(r.requests, r.prompt_tokens) for r in rows] == [(size, size * (size - 1) // 2)]


def test_a_batch_is_cut_into_at_most_eight_statement_sizes() -> None:
    assert statement_sizes(0) == []
    assert statement_sizes(137) == [128, 8, 1]
    assert statement_sizes(500) == [128, 128, 128, 64, 32, 16, 4]
    sizes = {s for n in range(1, 1001) for s in statement_sizes(n)}
    assert sizes == {1, 2, 4, 8, 16, 32, 64, 128}
    assert all(sum(statement_sizes(n)) == n for n in range(1001))


async def test_an_empty_batch_writes_nothing(store: LedgerStore) -> None:
    assert await store.write([]) == 0
    assert await total_requests(store) == 0


async def test_a_naive_time_is_refused(store: LedgerStore) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.write([record("n", time=datetime(2025, 1, 1))])


# --- the stored row -----------------------------------------------------------------------


def stored_rows(url: str) -> list[dict[str, Any]]:
    query = "SELECT * FROM usage_records ORDER BY request_id"
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            cur = conn.execute(query)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur]
    with psycopg.connect(url) as pg:
        pg_cur = pg.execute(query)
        assert pg_cur.description is not None
        pg_names = [d.name for d in pg_cur.description]
        return [dict(zip(pg_names, row, strict=True)) for row in pg_cur]


async def test_every_field_is_a_column_of_its_name(store: LedgerStore, store_url: str) -> None:
    estimated = record(
        "e",
        cost=None,
        source="estimated",
        estimate_reason="no_usage",
        duration_s=None,
        ttft_s=None,
        status=0,
        engine="",
    )
    reported = dataclasses.replace(
        record("r", time=T0 + timedelta(microseconds=123456)),
        quota="team-a/monthly",
        admitted_at=T0 - timedelta(seconds=3, microseconds=7),
        cost_micros=1234,
    )
    await store.write([estimated, reported])
    found = stored_rows(store_url)
    fields = [f.name for f in dataclasses.fields(UsageRecord)]
    assert all(sorted(row) == sorted(fields) for row in found)
    for row, want in zip(found, (estimated, reported), strict=True):
        for name in fields:
            got = row[name]
            if name in ("time", "admitted_at") and got is not None:
                got = (
                    datetime.fromisoformat(got).replace(tzinfo=UTC) if isinstance(got, str) else got
                )
            assert got == getattr(want, name), name


# --- reports ------------------------------------------------------------------------------

KNOWN = [
    # Monday 2024-12-30 (ISO week 1 of 2025 starts that day), the last day of December (in
    # the same week), and the next Monday, in January.
    record("k1", T0, prompt_tokens=100, completion_tokens=10, cost=1.5),
    record(
        "k2", T0 + timedelta(hours=1), user="bob", prompt_tokens=1, completion_tokens=2, cost=None
    ),
    record("k3", T0 + timedelta(hours=3), source="estimated", estimate_reason="no_usage"),
    record("k4", T0 + timedelta(days=7), model="llama", cost=2.0),
    record("k5", T0 + timedelta(days=7), namespace="team-b", cost=0.125),
    record("k6", T0 - timedelta(microseconds=1)),  # before the range
]
START = T0


def row(
    period: datetime | None, ns: str | None, user: str | None, model: str | None, *totals: Any
) -> ReportRow:
    requests, prompt, completion, cost, estimated = totals
    return ReportRow(period, ns, user, model, requests, prompt, completion, cost, estimated)


async def test_report_totals_by_day(store: LedgerStore) -> None:
    await store.write(KNOWN)
    query = ReportQuery(START, T0 + timedelta(days=8), granularity="day")
    dec30, dec31, jan6 = (
        datetime(2024, 12, 30, tzinfo=UTC),
        datetime(2024, 12, 31, tzinfo=UTC),
        datetime(2025, 1, 6, tzinfo=UTC),
    )
    assert await store.report(query) == [
        row(dec30, "team-a", "alice", "qwen", 1, 100, 10, 1.5, 0),
        row(dec30, "team-a", "bob", "qwen", 1, 1, 2, 0.0, 0),
        row(dec31, "team-a", "alice", "qwen", 1, 10, 5, 0.25, 1),
        row(jan6, "team-a", "alice", "llama", 1, 10, 5, 2.0, 0),
        row(jan6, "team-b", "alice", "qwen", 1, 10, 5, 0.125, 0),
    ]


async def test_report_totals_by_week_month_and_none(store: LedgerStore) -> None:
    await store.write(KNOWN)
    end = T0 + timedelta(days=8)
    by_week = await store.report(
        ReportQuery(START, end, group_by=("namespace",), granularity="week")
    )
    assert by_week == [
        row(datetime(2024, 12, 30, tzinfo=UTC), "team-a", None, None, 3, 111, 17, 1.75, 1),
        row(datetime(2025, 1, 6, tzinfo=UTC), "team-a", None, None, 1, 10, 5, 2.0, 0),
        row(datetime(2025, 1, 6, tzinfo=UTC), "team-b", None, None, 1, 10, 5, 0.125, 0),
    ]
    by_month = await store.report(ReportQuery(START, end, group_by=(), granularity="month"))
    assert by_month == [
        row(datetime(2024, 12, 1, tzinfo=UTC), None, None, None, 3, 111, 17, 1.75, 1),
        row(datetime(2025, 1, 1, tzinfo=UTC), None, None, None, 2, 20, 10, 2.125, 0),
    ]
    by_model = await store.report(ReportQuery(START, end, group_by=("model",), granularity="none"))
    assert by_model == [
        row(None, None, None, "llama", 1, 10, 5, 2.0, 0),
        row(None, None, None, "qwen", 4, 121, 22, 1.875, 1),
    ]


async def test_report_filters_and_half_open_range(store: LedgerStore) -> None:
    await store.write(KNOWN)
    query = ReportQuery(
        START, T0 + timedelta(days=7), group_by=("user",), granularity="none", users=("bob",)
    )
    assert await store.report(query) == [row(None, None, "bob", None, 1, 1, 2, 0.0, 0)]
    query = ReportQuery(
        START - timedelta(days=1),
        T0 + timedelta(days=7),
        group_by=(),
        granularity="none",
        namespaces=("team-a", "team-b"),
        models=("qwen",),
    )  # end excludes the two records at exactly T0 + 7 days; start includes k6
    assert await store.report(query) == [row(None, None, None, None, 4, 121, 22, 2.0, 1)]
    assert await store.report(dataclasses.replace(query, namespaces=("nobody",))) == []


def random_records(seed: int, count: int) -> list[UsageRecord]:
    rng = random.Random(seed)
    start = datetime(2024, 11, 20, tzinfo=UTC)
    found = []
    for i in range(count):
        estimated = rng.random() < 0.2
        found.append(
            record(
                f"rand-{i}",
                start
                + timedelta(
                    seconds=rng.randrange(0, 80 * 86400), microseconds=rng.randrange(10**6)
                ),
                namespace=rng.choice(["team-a", "team-b", "Team-C", "équipe"]),
                user=rng.choice(["alice", "bob", "Zed", "_svc"]),
                model=rng.choice(["qwen", "llama", "Qwen-72B"]),
                prompt_tokens=rng.randrange(0, 5000),
                completion_tokens=rng.randrange(0, 2000),
                cost=None if rng.random() < 0.1 else rng.randrange(0, 10**6) / 3.0e5,
                source="estimated" if estimated else "reported",
                estimate_reason="no_usage" if estimated else None,
            )
        )
    return found


GROUPINGS: list[tuple[GroupBy, ...]] = [
    (),
    ("namespace",),
    ("user", "model"),
    ("namespace", "user", "model"),
]
GRANULARITIES: list[Granularity] = ["day", "week", "month", "none"]


async def test_both_stores_report_the_same_numbers(tmp_path: Path, pg_url: str) -> None:
    records = random_records(13, 3000)
    sqlite_store, pg_store = SqliteLedger(tmp_path / "usage.db"), PostgresLedger(pg_url)
    try:
        for ledger in (sqlite_store, pg_store):
            await ledger.migrate()
            for i in range(0, len(records), 500):
                await ledger.write(records[i : i + 500])
        queries = [
            ReportQuery(
                datetime(2024, 12, 1, 7, tzinfo=UTC),
                datetime(2025, 1, 20, tzinfo=UTC),
                group_by=group_by,
                granularity=granularity,
            )
            for group_by in GROUPINGS
            for granularity in GRANULARITIES
        ] + [
            ReportQuery(
                datetime(2024, 1, 1, tzinfo=UTC),
                datetime(2026, 1, 1, tzinfo=UTC),
                granularity="week",
                namespaces=("équipe", "team-b"),
                users=("Zed", "alice"),
            )
        ]
        for query in queries:
            from_sqlite, from_pg = await sqlite_store.report(query), await pg_store.report(query)
            assert from_sqlite == from_pg, query
            assert from_sqlite, query
        total = await sqlite_store.report(
            ReportQuery(
                datetime(2000, 1, 1, tzinfo=UTC),
                datetime(2100, 1, 1, tzinfo=UTC),
                group_by=(),
                granularity="none",
            )
        )
        assert total[0].requests == len(records)
        assert total[0].prompt_tokens == sum(r.prompt_tokens for r in records)
    finally:
        await sqlite_store.close()
        await pg_store.close()


async def test_periods_match_the_reference(store: LedgerStore) -> None:
    """Each record alone in its group: its period is `period_start` of its time."""
    records = [
        record(
            f"p{i}",
            datetime(2023, 1, 1, tzinfo=UTC) + timedelta(hours=37 * i, microseconds=i),
            user=f"u{i}",
        )
        for i in range(400)
    ]
    await store.write(records)
    for granularity in GRANULARITIES:
        query = ReportQuery(
            datetime(2022, 1, 1, tzinfo=UTC),
            datetime(2025, 1, 1, tzinfo=UTC),
            group_by=("user",),
            granularity=granularity,
        )
        got = {(r.user, r.period) for r in await store.report(query)}
        assert got == {(r.user, period_start(granularity, r.time)) for r in records}, granularity


# --- SQLite only --------------------------------------------------------------------------


async def test_sqlite_locked_past_the_busy_timeout_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    ledger = SqliteLedger(path, busy_timeout_s=0.2)
    await ledger.migrate()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(LedgerUnavailable, match="locked"):
            await ledger.write([record("a")])
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await ledger.write([record("a")]) == 1
    await ledger.close()


def rows_in_the_database_file_alone(path: Path, copy: Path) -> int:
    """The records a machine crash would leave: the database file as synced, without its log
    (a copy of the file alone; -1 before the table itself reached it)."""
    shutil.copyfile(path, copy)
    with contextlib.closing(sqlite3.connect(copy)) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM usage_records").fetchone()[0])
        except sqlite3.OperationalError:
            return -1


async def test_sqlite_commits_reach_the_synced_database_file_within_a_second(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usage.db"
    ledger = SqliteLedger(path)
    await ledger.migrate()
    await ledger.write([record("a"), record("b")])
    assert rows_in_the_database_file_alone(path, tmp_path / "now.db") < 2, "only in the log yet"
    await asyncio.sleep(SYNC_S + 0.5)
    assert rows_in_the_database_file_alone(path, tmp_path / "later.db") == 2
    await ledger.write([record("c")])  # a later commit gets its own checkpoint
    await asyncio.sleep(SYNC_S + 0.5)
    assert rows_in_the_database_file_alone(path, tmp_path / "last.db") == 3
    await ledger.close()


async def test_sqlite_uses_wal_and_retention_deletes(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "usage.db")
    await ledger.migrate()
    await ledger.write([record("old", T0 - timedelta(days=40)), record("new", T0)])
    assert await ledger.delete_before(T0 - timedelta(days=1)) == 1
    assert await total_requests(ledger) == 1
    await ledger.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "usage.db")) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# --- PostgreSQL only ----------------------------------------------------------------------


async def pg_store(url: str, now: Callable[[], datetime] = lambda: T0) -> PostgresLedger:
    ledger = PostgresLedger(url, now=now, timeout_s=5.0)
    await ledger.migrate()
    return ledger


async def test_migrate_creates_this_and_next_months_partitions(pg_url: str) -> None:
    ledger = await pg_store(pg_url)
    assert await ledger.partitions() == [date(2024, 12, 1), date(2025, 1, 1)]
    await ledger.close()


async def test_a_record_of_an_old_month_gets_its_partition(pg_url: str) -> None:
    ledger = await pg_store(pg_url)
    old = [
        record("old-1", datetime(2019, 5, 31, 23, 59, 59, 999999, tzinfo=UTC)),
        record("old-2", datetime(2021, 2, 1, tzinfo=UTC)),
    ]
    assert await ledger.write(old) == 2
    assert await ledger.partitions() == [
        date(2019, 5, 1),
        date(2021, 2, 1),
        date(2024, 12, 1),
        date(2025, 1, 1),
    ]
    # Another store (another gateway) that has not seen them writes into them too.
    other = await pg_store(pg_url)
    assert await other.write([record("old-3", datetime(2019, 5, 1, tzinfo=UTC)), old[0]]) == 1
    query = ReportQuery(
        datetime(2019, 1, 1, tzinfo=UTC),
        datetime(2022, 1, 1, tzinfo=UTC),
        group_by=(),
        granularity="month",
    )
    assert [(r.period, r.requests) for r in await ledger.report(query)] == [
        (datetime(2019, 5, 1, tzinfo=UTC), 2),
        (datetime(2021, 2, 1, tzinfo=UTC), 1),
    ]
    await ledger.close()
    await other.close()


async def test_drop_before_drops_whole_months(pg_url: str) -> None:
    ledger = await pg_store(pg_url)
    other = await pg_store(pg_url)  # another gateway, which saw the partitions exist
    months = [datetime(2024, m, 15, tzinfo=UTC) for m in (9, 10, 11)]
    assert await ledger.write([record(f"m{t.month}", t) for t in months]) == 3
    assert await other.write([record("m9", months[0])]) == 0
    assert await ledger.drop_before(date(2024, 11, 1)) == [date(2024, 9, 1), date(2024, 10, 1)]
    assert await ledger.partitions() == [date(2024, 11, 1), date(2024, 12, 1), date(2025, 1, 1)]
    assert await total_requests(ledger) == 1
    # Its request ids went with it: a dropped month's record written again is stored again,
    # also by the store that still believed the partition was there.
    assert await other.write([record("m9", months[0])]) == 1
    assert await ledger.drop_before(date(2024, 11, 1)) == [date(2024, 9, 1)]
    await ledger.close()
    await other.close()


async def test_unavailable_while_the_server_is_away_then_reconnects(pg_url: str) -> None:
    with cut_proxy() as proxy:
        ledger = await pg_store(through(proxy, pg_url))
        assert await ledger.write([record("before")]) == 1
        proxy.cut()  # the server goes away: the open connection is closed under the store
        with pytest.raises(LedgerUnavailable):
            await ledger.write([record("during")])
        with pytest.raises(LedgerUnavailable):  # and a new connection is refused
            await ledger.report(everything())
        with pytest.raises(LedgerUnavailable):
            await ledger.write([record("during")])
        proxy.restore()
        assert await ledger.write([record("during"), record("before")]) == 1
        assert await total_requests(ledger) == 2
        await ledger.close()


async def test_an_unreachable_server_is_unavailable(pg_url: str) -> None:
    with cut_proxy() as proxy:
        proxy.cut()
        ledger = PostgresLedger(through(proxy, pg_url), timeout_s=5.0)
        with pytest.raises(LedgerUnavailable):
            await ledger.migrate()
        proxy.restore()
        assert await ledger.migrate() == 1
        await ledger.close()


async def test_a_server_that_stops_answering_is_unavailable_after_the_timeout(pg_url: str) -> None:
    """A hung server (a network partition): the call gives up at `timeout_s`, closing the
    connection, rather than waiting on psycopg's cancel request, which a hung server ignores."""
    with stall_proxy("http://127.0.0.1:5432") as proxy:
        ledger = PostgresLedger(
            pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}", 1), timeout_s=1.0
        )
        await ledger.migrate()
        proxy.stalled = True
        with pytest.raises(LedgerUnavailable, match="timed out"):
            await asyncio.wait_for(ledger.write([record("hung")]), timeout=8.0)
        proxy.stalled = False
        assert await ledger.write([record("hung")]) == 1, "the timed-out batch was not stored"
        await ledger.close()


async def test_quota_totals_sum_what_was_admitted_in_the_period(store: LedgerStore) -> None:
    """A quota's budgets are rebuilt from the records charged to it and admitted in the period:
    by admission time (a request admitted before midnight that ended after it belongs to the
    day it was admitted), not other quotas' records nor unquoted ones."""
    day = datetime(2024, 12, 30, tzinfo=UTC)
    charged = {
        "in-1": dict(admitted_at=day + timedelta(hours=1), prompt_tokens=10, cost_micros=7),
        "in-late": dict(
            admitted_at=day + timedelta(hours=23, minutes=59, seconds=59),
            time=day + timedelta(days=1, minutes=1),  # ended the next day
            completion_tokens=30,
            cost_micros=5,
        ),
        "before": dict(admitted_at=day - timedelta(seconds=1), time=day + timedelta(seconds=2)),
        "next-day": dict(admitted_at=day + timedelta(days=1)),
    }
    records = [
        record(rid, quota="team-a/daily", **{"time": day + timedelta(hours=2), **fields})
        for rid, fields in charged.items()
    ]
    records += [
        record("other", quota="team-a/other", admitted_at=day + timedelta(hours=1)),
        record("unquoted", admitted_at=day + timedelta(hours=1)),
    ]
    await store.write(records)
    got = await store.quota_totals("team-a/daily", day, day + timedelta(days=1))
    assert got == QuotaTotals(requests=2, prompt_tokens=20, completion_tokens=35, cost_micros=12)
    since = await store.quota_totals("team-a/daily", day, None)
    assert since.requests == 3
    assert await store.quota_totals("team-b/none", day, None) == QuotaTotals()
