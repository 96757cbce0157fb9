"""The query model of Grafana's PostgreSQL data source, which the SDK (11.6) does not ship.

Grafana's SQL data sources share one query shape (`SQLQuery` in grafana/packages/grafana-sql/
src/types.ts): `refId`, `rawSql`, `format` ("time_series" or "table"), `editorMode` ("code" or
"builder"), `rawQuery`, and optionally `datasource`. Only these keys are modelled, so a misspelt
key does not survive the SDK's round trip, as for the Prometheus queries. `register()` tells the
SDK's loader to decode targets of panels on a `grafana-postgresql-datasource` with this model
(the loader picks a target's model by its panel's data source type).

Variables are written into the SQL by Grafana before it runs: a multi-value or "All" variable
becomes its values quoted and comma-joined (`'a','b'`, hence `col IN ($var)`), and a custom
"All" value is inserted verbatim; the data source then expands its macros (`$__timeFilter`,
`$__timeGroupAlias`, ...) server-side.
"""

from __future__ import annotations

import enum
import typing

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard

# The plugin id of Grafana's built-in PostgreSQL data source (older Grafanas called it "postgres").
POSTGRES = "grafana-postgresql-datasource"


class SqlFormat(enum.StrEnum):
    TIME_SERIES = "time_series"
    TABLE = "table"


class SqlQuery(cogvariants.Dataquery):
    """One target of a panel on a SQL data source, in raw SQL ("code") mode."""

    def __init__(
        self,
        ref_id: str = "",
        raw_sql: str = "",
        format_val: SqlFormat | None = None,
        editor_mode: str | None = None,
        raw_query: bool | None = None,
        datasource: dashboard.DataSourceRef | None = None,
    ) -> None:
        self.ref_id = ref_id
        self.raw_sql = raw_sql
        self.format_val = format_val
        self.editor_mode = editor_mode
        self.raw_query = raw_query
        self.datasource = datasource

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {"refId": self.ref_id, "rawSql": self.raw_sql}
        if self.format_val is not None:
            payload["format"] = self.format_val
        if self.editor_mode is not None:
            payload["editorMode"] = self.editor_mode
        if self.raw_query is not None:
            payload["rawQuery"] = self.raw_query
        if self.datasource is not None:
            payload["datasource"] = self.datasource
        return payload

    @classmethod
    def from_json(cls, data: dict[str, typing.Any]) -> typing.Self:
        return cls(
            ref_id=data.get("refId", ""),
            raw_sql=data.get("rawSql", ""),
            format_val=SqlFormat(data["format"]) if "format" in data else None,
            editor_mode=data.get("editorMode"),
            raw_query=data.get("rawQuery"),
            datasource=(
                dashboard.DataSourceRef.from_json(data["datasource"])
                if "datasource" in data
                else None
            ),
        )


class SqlQueryBuilder(cogbuilder.Builder[cogvariants.Dataquery]):
    def __init__(self, ref_id: str, raw_sql: str, fmt: SqlFormat) -> None:
        self._internal = SqlQuery(
            ref_id=ref_id, raw_sql=raw_sql, format_val=fmt, editor_mode="code", raw_query=True
        )

    def build(self) -> SqlQuery:
        return self._internal


def register() -> None:
    """Decode the targets of PostgreSQL panels with `SqlQuery` (idempotent)."""
    cogruntime.register_dataquery_variant(
        cogruntime.DataqueryConfig(identifier=POSTGRES, from_json_hook=SqlQuery.from_json)
    )
