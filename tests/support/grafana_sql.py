"""Grafana's variables and PostgreSQL macros expanded the way Grafana does before a panel's SQL
runs, so tests can run the billing dashboard's queries on a real PostgreSQL.

Variables (Grafana's template service, then the SQL data sources' `interpolateVariable`, in
grafana/public/app/features/templating/template_srv.ts and the PostgreSQL data source): a
multi-value or include-All variable's values are single-quoted, a quote doubled, and joined
with commas (`'a','b'`); a custom "All" value is inserted verbatim. `quoted()` and the
variable's `allValue` give the two.

Macros (grafana/pkg/tsdb/grafana-postgresql-datasource/macros.go; `$__interval` is replaced
first, by the SQL engine):

    $__interval                           -> the panel's interval, as `<seconds>s`
    $__timeFilter(col)                    -> col BETWEEN '<from>' AND '<to>' (RFC 3339, UTC)
    $__timeFrom() / $__timeTo()           -> '<from>' / '<to>'
    $__timeGroup(col, interval[, fill])   -> floor(extract(epoch from col)/<s>)*<s>
    $__timeGroupAlias(col, interval[, f]) -> the same, AS "time"

The fill argument only tells Grafana to add the missing buckets to the result afterwards, so it
changes no SQL and is ignored here. Any other macro is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

_MACRO = re.compile(r"\$(__\w+)\(([^)]*)\)")  # macros.go's sExpr: no `)` inside the arguments
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_INTERVAL = re.compile(r"'?(\d+)(ms|s|m|h|d|w)'?")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def quoted(values: Sequence[str]) -> str:
    """A multi-value variable's selection as Grafana writes it into SQL."""
    return ",".join("'" + v.replace("'", "''") + "'" for v in values)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _seconds(interval: str) -> float:
    match = _INTERVAL.fullmatch(interval.strip())
    if not match:
        raise ValueError(f"not an interval: {interval!r}")
    return int(match.group(1)) * _SECONDS[match.group(2)]


def _number(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else str(seconds)


def expand(
    sql: str,
    start: datetime,
    end: datetime,
    interval: timedelta,
    variables: Mapping[str, str],
) -> str:
    """`sql` as the PostgreSQL server receives it: `variables` (name -> the text Grafana puts in
    its place) substituted first, as Grafana's frontend does, then `$__interval` and the
    macros, as its backend does."""

    def variable(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name.startswith("__"):
            return m.group(0)  # Grafana's own: `$__interval`, and the macros, come after
        return variables[name]  # KeyError: a variable the test did not set

    sql = _VARIABLE.sub(variable, sql)
    sql = sql.replace("$__interval", f"{_number(interval.total_seconds())}s")

    def macro(m: re.Match[str]) -> str:
        name, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{_rfc3339(start)}' AND '{_rfc3339(end)}'"
        if name == "__timeFrom":
            return f"'{_rfc3339(start)}'"
        if name == "__timeTo":
            return f"'{_rfc3339(end)}'"
        if name in ("__timeGroup", "__timeGroupAlias"):
            if len(args) < 2:
                raise ValueError(f"${name} needs a column and an interval: {m.group(0)}")
            s = _number(_seconds(args[1]))
            group = f"floor(extract(epoch from {args[0]})/{s})*{s}"
            return f'{group} AS "time"' if name == "__timeGroupAlias" else group
        raise ValueError(f"unknown macro ${name}")

    expanded = _MACRO.sub(macro, sql)
    if "$" in expanded:
        raise ValueError(f"left unexpanded: {expanded}")
    return expanded
