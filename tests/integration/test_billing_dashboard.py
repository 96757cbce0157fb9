"""Every SQL query of the Billing dashboard (panels and variables) on a real PostgreSQL holding
the usage ledger, written through the real PostgreSQL store and its migrations.

Grafana's variables and macros are expanded by tests/support/grafana_sql.py as Grafana would.
Each panel's answer is compared with totals computed in Python from the records themselves,
with the variables at "All" and with one namespace and user selected; and every query must run,
not fail, on an empty ledger (where "All" has no values to list)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from arks.adapters.ledger import open_ledger
from arks.dashboards import SqlPanelQuery, sql_queries, sql_variables
from arks.ledger import ReportQuery, UsageRecord
from tests.support import ledger_records as lr
from tests.support.grafana_sql import expand, quoted
from tests.support.postgres import private_database

QUERIES = list(sql_queries())
VARIABLES = {v["name"]: v for v in sql_variables()}
RECORDS = lr.records()
RANGE = (lr.START, lr.START + timedelta(days=lr.DAYS))
INTERVAL = timedelta(hours=6)
ALL = {name: str(v["allValue"]) for name, v in VARIABLES.items()}
PICKED = ("team-a", "alice")


def run(url: str, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql.encode())
        assert cur.description is not None
        return [c.name for c in cur.description], cur.fetchall()


def answer(url: str, query: SqlPanelQuery, variables: Mapping[str, str]) -> list[dict[str, Any]]:
    columns, rows = run(url, expand(query.sql, *RANGE, INTERVAL, variables))
    return [dict(zip(columns, row, strict=True)) for row in rows]


@pytest.fixture(scope="module")
def empty_ledger() -> Iterator[str]:
    with private_database() as url:
        ledger = open_ledger(url)

        async def migrate() -> None:
            await ledger.migrate()
            await ledger.close()

        asyncio.run(migrate())
        yield url


@pytest.fixture(scope="module")
def ledger() -> Iterator[str]:
    with private_database() as url:
        lr.store(url, RECORDS)
        yield url


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


# What each panel must show, from the records it covers: (rows, records) -> None.
Check = Callable[[list[dict[str, Any]], list[UsageRecord]], None]


def _single(column: str, expected: Callable[[lr.Totals], float]) -> Check:
    def check(rows: list[dict[str, Any]], records: list[UsageRecord]) -> None:
        assert len(rows) == 1
        assert close(float(rows[0][column]), expected(lr.total(records)))

    return check


def _share(t: lr.Totals) -> float:
    return t.estimated_tokens / t.total_tokens if t.total_tokens else 0.0


def _over_time(columns: Mapping[str, Callable[[lr.Totals], float]]) -> Check:
    """A time series per namespace (`metric`): buckets on the interval, summing to the totals."""

    def check(rows: list[dict[str, Any]], records: list[UsageRecord]) -> None:
        step = INTERVAL.total_seconds()
        assert all(float(r["time"]) % step == 0 for r in rows)
        assert [float(r["time"]) for r in rows] == sorted(float(r["time"]) for r in rows)
        per_ns = lr.totals_by(records, lambda r: r.namespace)
        assert {r["metric"] for r in rows} == set(per_ns)
        for ns, totals in per_ns.items():
            for column, expected in columns.items():
                got = sum(float(r[column]) for r in rows if r["metric"] == ns)
                assert close(got, expected(totals)), (ns, column)

    return check


def _ranking(label: str, key: Callable[[UsageRecord], str], column: str,
             expected: Callable[[lr.Totals], float], top: int | None = None) -> Check:  # fmt: skip
    """One row per `key` with its figure, highest first."""

    def check(rows: list[dict[str, Any]], records: list[UsageRecord]) -> None:
        want = {k: expected(t) for k, t in lr.totals_by(records, key).items()}
        values = [float(r[column]) for r in rows]
        assert values == sorted(values, reverse=True)
        assert len(rows) == min(len(want), top or len(want))
        for r in rows:
            assert close(float(r[column]), want[r[label]]), r

    return check


def _chargeback(rows: list[dict[str, Any]], records: list[UsageRecord]) -> None:
    want = lr.totals_by(records, lambda r: (r.namespace, r.user, r.model))
    assert [(r["namespace"], r["user"], r["model"]) for r in rows] == sorted(want)
    for r in rows:
        t = want[(r["namespace"], r["user"], r["model"])]
        assert (r["requests"], r["prompt_tokens"], r["completion_tokens"]) == (
            t.requests, t.prompt_tokens, t.completion_tokens,
        )  # fmt: skip
        assert (r["total_tokens"], r["estimated_requests"]) == (
            t.total_tokens,
            t.estimated_requests,
        )
        assert close(r["cost"], t.cost)


CHECKS: dict[str, Check] = {
    "Cost": _single("cost", lambda t: t.cost),
    "Tokens": _single("tokens", lambda t: t.total_tokens),
    "Requests": _single("requests", lambda t: t.requests),
    "Estimated share of tokens": _single("estimated", _share),
    "Cost by namespace": _over_time({"cost": lambda t: t.cost}),
    "Tokens by namespace": _over_time(
        {"prompt": lambda t: t.prompt_tokens, "completion": lambda t: t.completion_tokens}
    ),
    "Top 10 users by cost": _ranking(
        "tenant", lambda r: f"{r.namespace}/{r.user}", "cost", lambda t: t.cost, top=10
    ),
    "Tokens per model": _ranking("model", lambda r: r.model, "tokens", lambda t: t.total_tokens),
    "Estimated share per namespace": _ranking(
        "namespace", lambda r: r.namespace, "estimated", _share
    ),
    "Chargeback per namespace, user and model": _chargeback,
}


def test_every_billing_panel_has_a_check() -> None:
    assert {q.panel for q in QUERIES} == set(CHECKS)
    assert set(VARIABLES) == {"namespace", "user"}


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.panel)
def test_each_panel_on_all_tenants(ledger: str, query: SqlPanelQuery) -> None:
    rows = answer(ledger, query, ALL)
    assert rows, query.panel
    CHECKS[query.panel](rows, RECORDS)


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.panel)
def test_each_panel_on_one_tenant(ledger: str, query: SqlPanelQuery) -> None:
    namespace, user = PICKED
    rows = answer(ledger, query, {"namespace": quoted([namespace]), "user": quoted([user])})
    mine = [r for r in RECORDS if (r.namespace, r.user) == PICKED]
    assert rows and len(mine) < len(RECORDS)
    CHECKS[query.panel](rows, mine)


def test_several_values_of_a_variable(ledger: str) -> None:
    chargeback = next(q for q in QUERIES if q.panel.startswith("Chargeback"))
    users = ["alice", "carol"]
    rows = answer(ledger, chargeback, {"namespace": ALL["namespace"], "user": quoted(users)})
    _chargeback(rows, [r for r in RECORDS if r.user in users])


def test_the_time_range_narrows_every_panel(ledger: str) -> None:
    start, end = lr.START + timedelta(days=2), lr.START + timedelta(days=3)
    inside = [r for r in RECORDS if start <= r.time <= end]  # BETWEEN: both ends included
    assert 0 < len(inside) < len(RECORDS)
    for query in QUERIES:
        columns, rows = run(ledger, expand(query.sql, start, end, INTERVAL, ALL))
        CHECKS[query.panel]([dict(zip(columns, r, strict=True)) for r in rows], inside)


def test_the_chargeback_table_equals_the_ledgers_own_report(ledger: str) -> None:
    """The same figures as `arks usage --granularity none` (the store's `report`)."""
    chargeback = next(q for q in QUERIES if q.panel.startswith("Chargeback"))
    start, end = RANGE
    rows = answer(ledger, chargeback, ALL)

    async def report() -> list[Any]:
        store = open_ledger(ledger)
        try:
            # BETWEEN includes the end; the report excludes it: one microsecond further.
            query = ReportQuery(start, end + timedelta(microseconds=1), granularity="none")
            return await store.report(query)
        finally:
            await store.close()

    reported = asyncio.run(report())
    assert len(reported) == len(rows)
    for r, want in zip(rows, reported, strict=True):
        assert (r["namespace"], r["user"], r["model"]) == (want.namespace, want.user, want.model)
        assert (r["requests"], r["prompt_tokens"], r["completion_tokens"]) == (
            want.requests, want.prompt_tokens, want.completion_tokens,
        )  # fmt: skip
        assert r["estimated_requests"] == want.estimated_requests
        assert close(r["cost"], want.cost)


def test_the_variables_list_the_ledgers_values(ledger: str) -> None:
    def values(name: str, variables: Mapping[str, str]) -> list[str]:
        _, rows = run(ledger, expand(VARIABLES[name]["query"], *RANGE, INTERVAL, variables))
        return [v for (v,) in rows]

    assert values("namespace", {}) == sorted({ns for ns, _ in lr.TENANTS})
    assert values("user", {"namespace": ALL["namespace"]}) == sorted(u for _, u in lr.TENANTS)
    assert values("user", {"namespace": quoted(["team-b"])}) == ["carol", "dave"]


def test_every_query_runs_on_an_empty_ledger(empty_ledger: str) -> None:
    """ "All" on an empty ledger lists no value: its custom value keeps the SQL valid."""
    for query in QUERIES:
        rows = answer(empty_ledger, query, ALL)
        if query.table and not query.sql.rstrip().endswith(("ORDER BY 1, 2, 3", "LIMIT 10")):
            assert all(v in (0, 0.0, None) or isinstance(v, str) for r in rows for v in r.values())
    for name, variable in VARIABLES.items():
        _, rows = run(empty_ledger, expand(variable["query"], *RANGE, INTERVAL, ALL))
        assert rows == [], name


def test_the_expander_writes_what_grafana_writes() -> None:
    """Against the outputs of Grafana's macros.go for the same arguments."""
    start = datetime(2026, 3, 1, tzinfo=UTC)
    end = datetime(2026, 3, 2, 12, 30, tzinfo=UTC)
    assert (
        expand("WHERE $__timeFilter(time)", start, end, INTERVAL, {})
        == "WHERE time BETWEEN '2026-03-01T00:00:00Z' AND '2026-03-02T12:30:00Z'"
    )
    assert (
        expand("SELECT $__timeGroupAlias(time, $__interval, 0)", start, end, INTERVAL, {})
        == 'SELECT floor(extract(epoch from time)/21600)*21600 AS "time"'
    )
    assert (
        expand("$__timeGroup(time, '5m')", start, end, INTERVAL, {})
        == "floor(extract(epoch from time)/300)*300"
    )
    assert expand("x IN ($v)", start, end, INTERVAL, {"v": quoted(["a", "o'k"])}) == (
        "x IN ('a','o''k')"
    )
    with pytest.raises(ValueError, match="unknown macro"):
        expand("$__unixEpochFilter(t)", start, end, INTERVAL, {})
    with pytest.raises(KeyError):
        expand("x IN ($nobody)", start, end, INTERVAL, {})
