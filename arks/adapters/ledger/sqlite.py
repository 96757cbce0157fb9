"""The usage ledger in SQLite: the embedded default (`make run` writes `.arks/usage.db`).

One connection, used only from one dedicated thread (sqlite3 objects stay on the thread that
made them; one thread also serialises the store's calls, which SQLite would do anyway). WAL
mode: readers (`arks usage`) never block the writer, and a commit appends to the log instead
of rewriting pages. `synchronous=NORMAL` and a checkpoint within `SYNC_S` of a commit: a
committed batch survives a crash of the process at once (it is in the log, in the kernel's
page cache) and a crash of the machine (power cut, kernel panic) once synced, within a second
(the spill file's promise too). An fsync per batch (`synchronous=FULL`) cost the gateway
about 1 % more CPU per request in `make bench` for a window that the in-memory queue has
anyway. Batches go in with
`INSERT OR IGNORE` in one `BEGIN IMMEDIATE` transaction: the primary key `request_id` keeps
the first record of a request id.

Two processes on one file (two gateways, `arks usage` beside a gateway) take turns:
`busy_timeout` waits for the other's write lock; a wait longer than that is `LedgerUnavailable`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from arks.adapters.ledger import migrations, rows
from arks.ledger import LedgerUnavailable, QuotaTotals, ReportQuery, ReportRow, UsageRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
BUSY_TIMEOUT_S = 10.0
SYNC_S = 1.0  # the longest a committed batch waits for its fsync (the checkpoint's)
TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
COLUMNS = rows.COLUMNS
# The start of a record's period, as the same fixed-width text `time` is stored in.
PERIODS = {
    "day": "strftime('%Y-%m-%d 00:00:00.000000', time)",
    # ISO weeks: 'weekday 0' moves to the coming Sunday (or stays on one); 6 days back is Monday.
    "week": "strftime('%Y-%m-%d 00:00:00.000000', time, 'weekday 0', '-6 days')",
    "month": "strftime('%Y-%m-01 00:00:00.000000', time)",
    "none": "NULL",
}
MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
)


def time_text(moment: datetime) -> str:
    """A UTC time as stored: fixed width, so text order is time order."""
    # isoformat, cut before its "+00:00": TIME_FORMAT's text at half strftime's cost.
    return rows.utc(moment).isoformat(" ", "microseconds")[:26]


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)


def record_row(record: UsageRecord) -> tuple[Any, ...]:
    return rows.values(record, time_text)


def report_sql(query: ReportQuery) -> tuple[str, list[Any]]:
    """The grouped totals for `query` and their parameters."""
    if query.granularity not in PERIODS:
        raise ValueError(f"unknown granularity {query.granularity!r}")
    labels = [f"{c}" if c in query.group_by else "NULL" for c in rows.GROUP_COLUMNS]
    where = ["time >= ?", "time < ?"]
    params: list[Any] = [time_text(query.start), time_text(query.end)]
    for column, values in (
        ("namespace", query.namespaces),
        ("user", query.users),
        ("model", query.models),
    ):
        if values:
            where.append(f"{column} IN ({', '.join('?' for _ in values)})")
            params += values
    sql = (
        f"SELECT {PERIODS[query.granularity]}, {', '.join(labels)}, count(*), "
        "coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), total(cost), "
        "count(*) FILTER (WHERE source = 'estimated') "
        f"FROM usage_records WHERE {' AND '.join(where)} GROUP BY 1, 2, 3, 4"
    )
    return sql, params


class SqliteLedger:
    """`LedgerStore` on a SQLite file (created with its directory if missing)."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._sync: asyncio.Task[None] | None = None  # the checkpoint due for the last commits

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` on the store's thread, with its connection; SQLite's "cannot write now"
        errors (locked past the busy timeout, disk full or unreadable) as `LedgerUnavailable`."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, self._call, work)
        except sqlite3.OperationalError as err:
            raise LedgerUnavailable(f"SQLite ledger {self.path}: {err}") from err

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = self._open()
        return work(self._conn)

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; each write says BEGIN IMMEDIATE.
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout_s)
        try:
            _enter_wal(conn, time.monotonic() + self.busy_timeout_s)
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    async def migrate(self) -> int:
        return await self._run(_migrate)

    async def write(self, records: Sequence[UsageRecord]) -> int:
        batch = [record_row(r) for r in rows.first_of_each(records)]
        if not batch:
            return 0
        new = await self._run(lambda conn: _insert(conn, batch))
        if self._sync is None:
            self._sync = asyncio.get_running_loop().create_task(self._sync_soon())
        return new

    async def _sync_soon(self) -> None:
        """Checkpoint `SYNC_S` after a commit that is not synced yet: with `synchronous=NORMAL`
        SQLite syncs the log before a checkpoint copies it into the database file, and that file
        after. Commits after this point wait for the next one (the store's thread runs its
        calls in order, so the ones before are in the log this checkpoint syncs)."""
        await asyncio.sleep(SYNC_S)
        self._sync = None
        try:
            await self._run(_checkpoint)
        except LedgerUnavailable as err:  # e.g. the disk is full: the next commit tries again
            log.warning("SQLite ledger %s not synced: %s", self.path, err)

    async def report(self, query: ReportQuery) -> list[ReportRow]:
        sql, params = report_sql(query)
        found = await self._run(lambda conn: conn.execute(sql, params).fetchall())
        return rows.ordered(
            rows.report_row(
                query, None if r[0] is None else parse_time(r[0]), r[1:4], tuple(r[4:9])
            )
            for r in found
        )

    async def quota_totals(self, quota: str, start: datetime, end: datetime | None) -> QuotaTotals:
        sql = (
            "SELECT count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),"
            " coalesce(sum(cost_micros), 0) FROM usage_records"
            " WHERE quota = ? AND admitted_at >= ? AND time >= ?"
        )
        # A request ends after its admission: `time >= start` narrows the scan (and, on
        # PostgreSQL, the partitions read).
        params: list[Any] = [quota, time_text(start), time_text(start)]
        if end is not None:
            sql += " AND admitted_at < ?"
            params.append(time_text(end))
        found = await self._run(lambda conn: conn.execute(sql, params).fetchone())
        return QuotaTotals(*(int(v) for v in found))

    async def known(self, request_ids: Sequence[str]) -> set[str]:
        def find(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            ids = list(dict.fromkeys(request_ids))
            for at in range(0, len(ids), 500):  # SQLite's bound parameters: at most 999 or so
                chunk = ids[at : at + 500]
                marks = ", ".join("?" for _ in chunk)
                rows_ = conn.execute(
                    f"SELECT request_id FROM usage_records WHERE request_id IN ({marks})", chunk
                )
                found.update(r[0] for r in rows_)
            return found

        return await self._run(find) if request_ids else set()

    async def delete_before(self, moment: datetime) -> int:
        """Retention: delete the records older than `moment`; how many. (SQLite has no
        partitions; run `VACUUM` afterwards to give the space back to the file system.)"""
        cutoff = time_text(moment)
        return await self._run(
            lambda conn: (
                conn.execute("DELETE FROM usage_records WHERE time < ?", (cutoff,)).rowcount
            )
        )

    async def close(self) -> None:
        def shut(conn: sqlite3.Connection) -> None:
            conn.close()  # the last connection's close checkpoints and syncs the log

        if self._sync is not None:
            self._sync.cancel()
            self._sync = None
        if self._conn is not None:
            await self._run(shut)
            self._conn = None
        self._thread.shutdown(wait=True)


# Rows per INSERT statement: one statement of many rows is one step of SQLite's, so the writer's
# thread gives up and takes back the GIL once per statement, not once per row (executemany),
# which made the gateway's event loop wait at every row. A batch goes in as statements of
# power-of-two sizes up to this (137 rows: 128 + 8 + 1), so at most 8 distinct statements exist
# and each is compiled once (the connection's statement cache keeps them), where a statement
# per batch size compiled a new one for nearly every batch. 18 columns x 128 rows stays well
# under SQLite's 32,766 bound parameters (3.32 and newer).
ROWS_PER_STATEMENT = 128


def statement_sizes(rows_: int) -> list[int]:
    """How a batch of `rows_` rows is cut into statements (pure): as many of the largest as fit,
    then the binary digits of what is left."""
    sizes = [ROWS_PER_STATEMENT] * (rows_ // ROWS_PER_STATEMENT)
    left = rows_ % ROWS_PER_STATEMENT
    while left:
        size = 1 << (left.bit_length() - 1)
        sizes.append(size)
        left -= size
    return sizes


def _insert(conn: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> int:
    before = conn.total_changes
    conn.execute("BEGIN IMMEDIATE")
    try:
        at = 0
        for size in statement_sizes(len(batch)):
            rows_ = batch[at : at + size]
            conn.execute(_insert_many(size), [v for row in rows_ for v in row])
            at += size
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
            conn.execute("ROLLBACK")
        raise
    return conn.total_changes - before


@functools.lru_cache(maxsize=8)
def _insert_many(rows_: int) -> str:
    one = f"({', '.join('?' for _ in COLUMNS)})"
    return (
        f"INSERT OR IGNORE INTO usage_records ({', '.join(COLUMNS)}) "
        f"VALUES {', '.join(one for _ in range(rows_))}"
    )


def _checkpoint(conn: sqlite3.Connection) -> None:
    # PASSIVE: never waits for a reader (`arks usage`); it copies what no reader still needs.
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()


def _enter_wal(conn: sqlite3.Connection, deadline: float) -> None:
    """Switch the file to write-ahead logging, retried until `deadline`: connections opening a
    new file at once all read it, then each wants it alone to switch, and SQLite answers the
    losers "database is locked" at once (its busy handler is not called where waiting could
    deadlock), so the connection's busy timeout does not cover this."""
    pause = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _migrate(conn: sqlite3.Connection) -> int:
    """Apply the pending migrations in one IMMEDIATE transaction: a second process migrating at
    the same time waits for the write lock, then finds them applied."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(MIGRATIONS_TABLE)
        applied = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
        for migration in migrations.pending(migrations.load("sqlite"), applied):
            for statement in migrations.statements(migration.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time_text(datetime.now(UTC))),
            )
        (version,) = conn.execute(
            "SELECT coalesce(max(version), 0) FROM schema_migrations"
        ).fetchone()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
            conn.execute("ROLLBACK")
        raise
    return int(version)
