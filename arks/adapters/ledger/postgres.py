"""The usage ledger in PostgreSQL (psycopg 3, async): for clusters, several gateways writing.

Partitions: `usage_records` is range-partitioned by month on `time`, one partition
`usage_records_yYYYYmMM` per UTC month. `migrate()` creates the current and the next month's;
`write` creates a batch's missing ones first (a record replayed from a spill file months later
lands in its own month). Retention is `drop_before(month)`: whole partitions dropped, no
row-by-row delete, no vacuum debt.

Idempotency: a unique index on a partitioned table must include the partition key, so it
cannot stop one request id stored twice with two different times (two replicas' clocks, a
month boundary). `usage_request_ids` (not partitioned, primary key `request_id`) holds each
stored id once; a batch goes into it first with `ON CONFLICT DO NOTHING`, and only the ids it
returns are inserted into `usage_records`, in the same statement and transaction. Two writers
racing on one id: the second waits for the first's transaction, then skips it.

Throughput: a batch is COPYed (binary) into a session's temporary staging table, then one
`INSERT … SELECT` moves the new records across: two round trips per batch, whatever its size.

Availability: one connection, opened on first use and again on the call after it broke.
A lost or unreachable server, or a call slower than `timeout_s`, raises `LedgerUnavailable`
(the batch's transaction is then rolled back or never committed: nothing of it is stored,
or, if the commit itself was cut, all of it, which a retry finds already stored).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, date, datetime
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from arks.adapters.ledger import migrations, rows
from arks.ledger import LedgerUnavailable, QuotaTotals, ReportQuery, ReportRow, UsageRecord

T = TypeVar("T")
DROP_TIMEOUT_S = 600.0  # retention deletes a month of request ids: minutes, not a batch's seconds
COLUMNS = rows.COLUMNS
# COPY's binary types, in COLUMNS order.
COPY_TYPES = (
    "timestamptz",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "int4",
    "int8",
    "int8",
    "float8",
    "text",
    "text",
    "float8",
    "float8",
    "text",
    "timestamptz",
    "int8",
)
_COLS = sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS)
STAGING = sql.SQL(
    "CREATE TEMP TABLE IF NOT EXISTS usage_staging "
    "(LIKE usage_records INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
COPY = sql.SQL("COPY usage_staging ({}) FROM STDIN (FORMAT BINARY)").format(_COLS)
MOVE = sql.SQL(
    "WITH new AS ("
    " INSERT INTO usage_request_ids (request_id, time)"
    " SELECT request_id, time FROM usage_staging"
    " ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
    ") INSERT INTO usage_records ({cols})"
    " SELECT {staged} FROM usage_staging s JOIN new USING (request_id)"
).format(cols=_COLS, staged=sql.SQL(", ").join(sql.Identifier("s", c) for c in COLUMNS))
MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
    "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
)
PERIODS = {
    "day": "date_trunc('day', time, 'UTC')",
    "week": "date_trunc('week', time, 'UTC')",  # ISO weeks, from Monday
    "month": "date_trunc('month', time, 'UTC')",
    "none": "NULL::timestamptz",
}
PARTITIONS = (
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = 'usage_records'::regclass"
)
_PARTITION = re.compile(r"^usage_records_y(\d{4})m(\d{2})$")


def _lock_key(name: str) -> int:
    """A stable advisory-lock key (signed 64-bit) for one of the ledger's critical sections."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


# Advisory locks (transaction-scoped): schema changes, and partitions created or dropped.
MIGRATE_LOCK = _lock_key("arks.ledger.migrate")
PARTITION_LOCK = _lock_key("arks.ledger.partitions")


def partition_name(month: date) -> str:
    return f"usage_records_y{month.year:04d}m{month.month:02d}"


def partition_month(name: str) -> date | None:
    """The month a partition's name stands for; None for a table not named by the store."""
    match = _PARTITION.match(name)
    return date(int(match[1]), int(match[2]), 1) if match else None


def create_partition(month: date) -> sql.Composed:
    """The DDL for `month`'s partition: [first instant of the month, first of the next) UTC."""
    bound = "{:%Y-%m-%d} 00:00:00+00"
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} PARTITION OF usage_records FOR VALUES FROM ({}) TO ({})"
    ).format(
        sql.Identifier(partition_name(month)),
        sql.Literal(bound.format(month)),
        sql.Literal(bound.format(rows.next_month(month))),
    )


def record_row(record: UsageRecord) -> tuple[Any, ...]:
    return rows.values(record, rows.utc)


def report_sql(query: ReportQuery) -> tuple[sql.Composed, list[Any]]:
    """The grouped totals for `query` and their parameters."""
    if query.granularity not in PERIODS:
        raise ValueError(f"unknown granularity {query.granularity!r}")
    labels = [
        sql.Identifier(c) if c in query.group_by else sql.SQL("NULL::text")
        for c in rows.GROUP_COLUMNS
    ]
    where: list[sql.Composable] = [sql.SQL("time >= %s"), sql.SQL("time < %s")]
    params: list[Any] = [rows.utc(query.start), rows.utc(query.end)]
    for column, values in (
        ("namespace", query.namespaces),
        ("user", query.users),
        ("model", query.models),
    ):
        if values:
            where.append(sql.SQL("{} = ANY(%s)").format(sql.Identifier(column)))
            params.append(list(values))
    query_sql = sql.SQL(
        "SELECT {period}, {labels}, count(*), coalesce(sum(prompt_tokens), 0)::bigint, "
        "coalesce(sum(completion_tokens), 0)::bigint, coalesce(sum(cost), 0)::float8, "
        "count(*) FILTER (WHERE source = 'estimated') "
        "FROM usage_records WHERE {where} GROUP BY 1, 2, 3, 4"
    ).format(
        period=sql.SQL(PERIODS[query.granularity]),
        labels=sql.SQL(", ").join(labels),
        where=sql.SQL(" AND ").join(where),
    )
    return query_sql, params


async def _within(conn: psycopg.AsyncConnection[Any], call: Awaitable[T], timeout_s: float) -> T:
    """`call` on `conn`, or TimeoutError after `timeout_s` with the connection closed under it.
    Not a plain cancellation: psycopg answers one by asking the server to cancel the query and
    waiting for it, up to 10 s more, and a server that stopped answering answers neither."""
    task = asyncio.ensure_future(call)
    try:
        await asyncio.wait({task}, timeout=timeout_s)
    finally:
        if not task.done():  # timed out, or our caller was cancelled
            conn.pgconn.finish()  # psycopg sees no query in progress: nothing to cancel
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        raise TimeoutError
    return task.result()


def _is_missing_partition(err: psycopg.Error) -> bool:
    return err.sqlstate == "23514" and "no partition" in str(err)


class PostgresLedger:
    """`LedgerStore` on a PostgreSQL database (libpq URL), in the URL's default schema."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        connect_timeout_s: int = 5,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._now = now
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._staging = False
        self._lock = asyncio.Lock()
        self._months: set[date] = set()  # months whose partition this store saw exist

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        await self._drop()
        extra: dict[str, Any] = {}
        if "connect_timeout" not in conninfo_to_dict(self.url):
            extra["connect_timeout"] = self._connect_timeout_s
        self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, **extra)
        self._staging = False
        return self._conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _run(
        self,
        work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
        timeout_s: float | None = None,
    ) -> T:
        """`work` on the connection (opened if needed), one call at a time; a lost or
        unreachable server or a call past `timeout_s` as `LedgerUnavailable`, the connection
        dropped so that the next call opens a fresh one."""
        limit = timeout_s or self.timeout_s
        async with self._lock:
            try:
                async with asyncio.timeout(limit):
                    conn = await self._connection()
                return await _within(conn, work(conn), limit)
            except (psycopg.OperationalError, TimeoutError) as err:
                await self._drop()
                what = "timed out" if isinstance(err, TimeoutError) else str(err).strip()
                raise LedgerUnavailable(f"PostgreSQL ledger: {what}") from err

    async def migrate(self) -> int:
        """Apply the pending migrations under an advisory lock (a second process migrating at
        the same time waits, then finds them applied); then this and next month's partitions."""
        version = await self._run(self._migrate)
        this_month = rows.month_of(self._now())
        await self._ensure_partitions({this_month, rows.next_month(this_month)})
        return version

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> int:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            await conn.execute(MIGRATIONS_TABLE)
            cur = await conn.execute("SELECT version FROM schema_migrations")
            applied = [v for (v,) in await cur.fetchall()]
            for migration in migrations.pending(migrations.load("postgresql"), applied):
                await conn.execute(migration.sql.encode())  # no parameters: several statements
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def _ensure_partitions(self, months: Iterable[date]) -> None:
        missing = sorted(set(months) - self._months)
        if not missing:
            return

        async def create(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
                for month in missing:
                    await conn.execute(create_partition(month))

        await self._run(create)
        self._months.update(missing)

    async def write(self, records: Sequence[UsageRecord]) -> int:
        batch = [record_row(r) for r in rows.first_of_each(records)]
        if not batch:
            return 0
        months = rows.months_of(records)
        await self._ensure_partitions(months)
        try:
            return await self._run(lambda conn: self._insert(conn, batch))
        except psycopg.errors.CheckViolation as err:
            if not _is_missing_partition(err):
                raise
            # Another process dropped a partition this store saw (retention): create it again.
            self._months.difference_update(months)
            await self._ensure_partitions(months)
            return await self._run(lambda conn: self._insert(conn, batch))

    async def _insert(
        self, conn: psycopg.AsyncConnection[Any], batch: list[tuple[Any, ...]]
    ) -> int:
        if not self._staging:
            await conn.execute(STAGING)
            self._staging = True
        async with conn.transaction():
            cur = conn.cursor()
            async with cur.copy(COPY) as copy:
                copy.set_types(COPY_TYPES)
                for row in batch:
                    await copy.write_row(row)
            await cur.execute(MOVE)
            return cur.rowcount

    async def report(self, query: ReportQuery) -> list[ReportRow]:
        query_sql, params = report_sql(query)

        async def fetch(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            cur = await conn.execute(query_sql, params)
            return await cur.fetchall()

        found = await self._run(fetch)
        return rows.ordered(rows.report_row(query, r[0], r[1:4], tuple(r[4:9])) for r in found)

    async def quota_totals(self, quota: str, start: datetime, end: datetime | None) -> QuotaTotals:
        query = (
            "SELECT count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),"
            " coalesce(sum(cost_micros), 0) FROM usage_records"
            " WHERE quota = %s AND admitted_at >= %s AND time >= %s"
            + ("" if end is None else " AND admitted_at < %s")
        )
        params: list[Any] = [quota, rows.utc(start), rows.utc(start)] + (
            [] if end is None else [rows.utc(end)]
        )

        async def fetch(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, ...]:
            cur = await conn.execute(query, params)
            found = await cur.fetchone()
            assert found is not None  # an aggregate always answers one row
            return tuple(found)

        found = await self._run(fetch)
        return QuotaTotals(*(int(v) for v in found))

    async def known(self, request_ids: Sequence[str]) -> set[str]:
        if not request_ids:
            return set()

        async def find(conn: psycopg.AsyncConnection[Any]) -> set[str]:
            cur = await conn.execute(
                "SELECT request_id FROM usage_request_ids WHERE request_id = ANY(%s)",
                [list(request_ids)],
            )
            return {row[0] for row in await cur.fetchall()}

        return await self._run(find)

    async def partitions(self) -> list[date]:
        """The months that have a partition, in order."""

        async def fetch(conn: psycopg.AsyncConnection[Any]) -> list[date]:
            cur = await conn.execute(PARTITIONS)
            names = [name for (name,) in await cur.fetchall()]
            return sorted(m for m in map(partition_month, names) if m is not None)

        return await self._run(fetch)

    async def drop_before(self, month: date) -> list[date]:
        """Retention: drop the partitions of the months before `month` (whole tables: instant,
        no vacuum) and forget their request ids; the months dropped. A record of a dropped
        month written again later is stored again, in a re-created partition."""

        async def drop(conn: psycopg.AsyncConnection[Any]) -> list[date]:
            dropped = []
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
                cur = await conn.execute(PARTITIONS)
                for (name,) in await cur.fetchall():
                    old = partition_month(name)
                    if old is None or old >= month:
                        continue
                    await conn.execute(
                        sql.SQL(
                            "DELETE FROM usage_request_ids r USING {} p "
                            "WHERE r.request_id = p.request_id"
                        ).format(sql.Identifier(name))
                    )
                    await conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
                    dropped.append(old)
            return sorted(dropped)

        dropped = await self._run(drop, timeout_s=max(self.timeout_s, DROP_TIMEOUT_S))
        self._months.difference_update(dropped)
        return dropped

    async def close(self) -> None:
        async with self._lock:
            await self._drop()
