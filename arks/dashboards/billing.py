"""Billing: what each tenant spent, from the usage ledger (one record per finished request).

Unlike the other dashboards this one reads PostgreSQL, not Prometheus: the ledger's
`usage_records` table (its columns are `arks.ledger.UsageRecord`'s fields; `"user"` is quoted,
a reserved word in PostgreSQL). A counter's `increase()` is an estimate that loses what a
restarted process had not been scraped for; the ledger holds every request once, so a
chargeback over any range is exact and matches `arks usage` for the same range.

The queries use the PostgreSQL data source's macros: `$__timeFilter(time)` keeps the
dashboard's range, `$__timeGroupAlias(time, $__interval, 0)` buckets by the panel's interval
(empty buckets filled with 0).
"""

from __future__ import annotations

from grafana_foundation_sdk.models.dashboard import Dashboard

from arks.dashboards.panels import (
    NAMESPACE,
    USER,
    Board,
    bars,
    graph,
    listing,
    single,
    sql,
    sql_table,
)
from arks.dashboards.sql import POSTGRES

UID = "arks-billing"
TABLE = "usage_records"
TOP = 10
TOKENS = "prompt_tokens + completion_tokens"
COST = "coalesce(sum(cost), 0)"  # unpriced records have no cost: they count 0
BUCKET = "$__timeGroupAlias(time, $__interval, 0)"


def estimated_share(total: str) -> str:
    """The estimated part of `total` (a per-row expression) over all of it, 0 when empty."""
    return (
        f"coalesce(sum({total}) FILTER (WHERE source = 'estimated')::double precision"
        f" / nullif(sum({total}), 0), 0)"
    )


def dashboard() -> Dashboard:
    b = Board(
        uid=UID,
        title="Arks / Billing",
        description="Cost and tokens per namespace, user and model from the usage ledger "
        "(PostgreSQL), for chargeback.",
        variables=(NAMESPACE, USER),
        source=TABLE,
        engine=POSTGRES,
    )
    where = f"FROM {TABLE} WHERE {b.sql_where(NAMESPACE, USER)}"

    b.row("Over the range")
    b.add(
        single(
            "Cost",
            "Sum of the priced records' cost, in the ArksQuota price table's currency.",
            [sql_table(f"SELECT {COST} AS cost {where}")],
        ),
        single(
            "Tokens",
            "Prompt and completion tokens of every finished request.",
            [sql_table(f"SELECT coalesce(sum({TOKENS}), 0) AS tokens {where}")],
        ),
        single(
            "Requests",
            "Finished requests recorded in the ledger.",
            [sql_table(f"SELECT count(*) AS requests {where}")],
        ),
        single(
            "Estimated share of tokens",
            "Tokens the gateway estimated because the engine reported no usage; orange from 5 %.",
            [sql_table(f"SELECT {estimated_share(TOKENS)} AS estimated {where}")],
            unit="percentunit",
            steps=((None, "green"), (0.05, "orange")),
        ),
    )

    b.row("Over time")
    b.add(
        graph(
            "Cost by namespace",
            "Cost per interval, in the price table's currency.",
            [
                sql(
                    f"SELECT {BUCKET}, namespace AS metric, {COST} AS cost {where}"
                    " GROUP BY 1, 2 ORDER BY 1"
                )
            ],
            stacked=True,
        ),
        graph(
            "Tokens by namespace",
            "Prompt and completion tokens per interval.",
            [
                sql(
                    f"SELECT {BUCKET}, namespace AS metric, sum(prompt_tokens) AS prompt,"
                    f" sum(completion_tokens) AS completion {where} GROUP BY 1, 2 ORDER BY 1"
                )
            ],
            stacked=True,
        ),
    )

    b.row("Who and what")
    b.add(
        bars(
            f"Top {TOP} users by cost",
            "Cost over the range per ArksToken (namespace/user).",
            [
                sql_table(
                    f"SELECT namespace || '/' || \"user\" AS tenant, {COST} AS cost {where}"
                    f" GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {TOP}"
                )
            ],
            span=8,
        ),
        bars(
            "Tokens per model",
            "Prompt and completion tokens over the range per model.",
            [
                sql_table(
                    f"SELECT model, coalesce(sum({TOKENS}), 0) AS tokens {where}"
                    " GROUP BY 1 ORDER BY 2 DESC, 1"
                )
            ],
            span=8,
        ),
        bars(
            "Estimated share per namespace",
            "The part of each namespace's tokens that is an estimate, not engine-reported.",
            [
                sql_table(
                    f"SELECT namespace, {estimated_share(TOKENS)} AS estimated {where}"
                    " GROUP BY 1 ORDER BY 2 DESC, 1"
                )
            ],
            unit="percentunit",
            span=8,
            steps=((None, "green"), (0.05, "orange")),
            minimum=0,
            maximum=1,
        ),
    )

    b.row("Chargeback")
    b.add(
        listing(
            "Chargeback per namespace, user and model",
            "Totals over the range, the same figures as `arks usage --granularity none`.",
            [
                sql_table(
                    'SELECT namespace, "user", model, count(*) AS requests,'
                    " sum(prompt_tokens) AS prompt_tokens,"
                    " sum(completion_tokens) AS completion_tokens,"
                    f" sum({TOKENS}) AS total_tokens, {COST} AS cost,"
                    " count(*) FILTER (WHERE source = 'estimated') AS estimated_requests"
                    f" {where} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
                )
            ],
            span=24,
        ),
    )
    return b.build()
