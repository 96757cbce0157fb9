"""The building blocks the dashboards share: variables, label filters, PromQL fragments and
panels, written with Grafana Labs' SDK (grafana-foundation-sdk, Grafana 11.6 models).

Every panel queries the data source variable `$datasource`; every query filters by the
dashboard's variables (namespace, model, user) on the metrics that carry those labels, through
`Board.where(...)`, so a panel cannot forget one. The variables are multi-select with "All" =
`.*`, which also matches an empty label (a denial before routing has `model=""`).

A board on PostgreSQL (`Board(..., engine=POSTGRES)`, the billing dashboard over the usage
ledger) has a PostgreSQL data source variable, SQL variables (`SELECT DISTINCT` a column of
`source`, the table) and panels of raw SQL (`SqlTarget`), filtered by `Board.sql_where(...)`:
`"col" IN ($var)`. Its "All" is the column itself (Grafana inserts a custom "All" value
verbatim), so `"col" IN ("col")` keeps every row without listing every value, and an empty
table still gives valid SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from grafana_foundation_sdk.builders import bargauge, stat, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as models
from grafana_foundation_sdk.models import prometheus as prom_models

from arks.dashboards.sql import POSTGRES, SqlFormat, SqlQueryBuilder

PROMETHEUS = "prometheus"
DATASOURCE = models.DataSourceRef(type_val=PROMETHEUS, uid="${datasource}")
SQL_DATASOURCE = models.DataSourceRef(type_val=POSTGRES, uid="${datasource}")
# Grafana's own interval for rate(): at least four scrape intervals, so a rate always has two
# samples whatever the zoom (https://grafana.com/docs/grafana/latest/datasources/prometheus/).
RATE = "$__rate_interval"
WIDTH = 24  # Grafana's grid is 24 columns wide

# The label each variable filters; the variable has the label's name.
NAMESPACE = "namespace"
MODEL = "model"
USER = "user"


def rate(selector: str, window: str = RATE) -> str:
    return f"rate({selector}[{window}])"


def quantile(q: float, bucket_selector: str, by: Sequence[str] = ()) -> str:
    """The q-quantile of a histogram's `_bucket` selector, summed over everything but `by`."""
    keep = ", ".join(("le", *by))
    return f"histogram_quantile({q}, sum by ({keep}) ({rate(bucket_selector)}))"


def by(labels: Sequence[str], expr: str, op: str = "sum") -> str:
    return f"{op} by ({', '.join(labels)}) ({expr})" if labels else f"{op}({expr})"


def or_zero(expr: str) -> str:
    """An aggregation that is 0, not absent, when nothing matched (a sum over no series is
    empty, and an empty side empties a whole arithmetic expression)."""
    return f"({expr} or vector(0))"


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""
    instant: bool = False


def target(expr: str, legend: str = "") -> Target:
    return Target(expr, legend)


def instant(expr: str, legend: str = "") -> Target:
    """A query evaluated once at the range's end (tables, bar gauges, stats over `$__range`)."""
    return Target(expr, legend, instant=True)


@dataclass(frozen=True)
class SqlTarget:
    """A raw SQL query: `table` rows as they are, or a time series (a `time` column, string
    columns naming the series, numeric columns their values)."""

    sql: str
    table: bool = False


def sql(query: str) -> SqlTarget:
    return SqlTarget(query)


def sql_table(query: str) -> SqlTarget:
    return SqlTarget(query, table=True)


AnyTarget = Target | SqlTarget


def _on_sql(targets: Sequence[AnyTarget]) -> bool:
    """Whether a panel's targets are SQL (all of them) or PromQL (all of them): a panel has one
    data source."""
    kinds = {isinstance(t, SqlTarget) for t in targets}
    if len(kinds) != 1:
        raise ValueError("a panel's targets are all PromQL or all SQL")
    return kinds == {True}


def _datasource(targets: Sequence[AnyTarget]) -> models.DataSourceRef:
    return SQL_DATASOURCE if _on_sql(targets) else DATASOURCE


def _queries(targets: Sequence[AnyTarget]) -> list[prom.Dataquery | SqlQueryBuilder]:
    out: list[prom.Dataquery | SqlQueryBuilder] = []
    for index, t in enumerate(targets):
        ref = chr(ord("A") + index)
        if isinstance(t, SqlTarget):
            fmt = SqlFormat.TABLE if t.table else SqlFormat.TIME_SERIES
            out.append(SqlQueryBuilder(ref, t.sql, fmt))
            continue
        query = prom.Dataquery().expr(t.expr).ref_id(ref)
        if t.legend:
            query = query.legend_format(t.legend)
        if t.instant:
            query = query.instant().format(prom_models.PromQueryFormat.TABLE)
        out.append(query)
    return out


P = TypeVar("P", timeseries.Panel, stat.Panel, bargauge.Panel, table.Panel)


def _framed(
    panel: P,
    title: str,
    description: str,
    targets: Sequence[AnyTarget],
    unit: str,
    span: int,
    height: int,
) -> P:
    """What every panel kind has alike: its title and description, data source, unit, place,
    and its queries."""
    panel = (
        panel.title(title)
        .description(description)
        .datasource(_datasource(targets))
        .unit(unit)
        .span(span)
        .height(height)
    )
    for query in _queries(targets):
        panel = panel.with_target(query)
    return panel


def graph(
    title: str,
    description: str,
    targets: Sequence[AnyTarget],
    unit: str = "short",
    span: int = 12,
    stacked: bool = False,
) -> timeseries.Panel:
    panel = (
        _framed(timeseries.Panel(), title, description, targets, unit, span, 8)
        .fill_opacity(10)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["mean", "max", "lastNotNull"])
        )
    )
    if stacked:
        panel = panel.stacking(
            common_builders.StackingConfig().mode(common.StackingMode.NORMAL).group("A")
        )
    return panel


def single(
    title: str,
    description: str,
    targets: Sequence[AnyTarget],
    unit: str = "short",
    span: int = 6,
    steps: Sequence[tuple[float | None, str]] = ((None, "green"),),
) -> stat.Panel:
    """A stat: the last value of each series, coloured by `steps` (value from, colour)."""
    panel = (
        _framed(stat.Panel(), title, description, targets, unit, span, 5)
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .thresholds(_thresholds(steps))
    )
    return panel


def bars(
    title: str,
    description: str,
    targets: Sequence[AnyTarget],
    unit: str = "short",
    span: int = 12,
    steps: Sequence[tuple[float | None, str]] = ((None, "green"),),
    minimum: float | None = None,
    maximum: float | None = None,
) -> bargauge.Panel:
    """A horizontal bar per series (a ranking: top tenants, limits nearest to exhaustion)."""
    panel = (
        _framed(bargauge.Panel(), title, description, targets, unit, span, 8)
        .orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
        .reduce_options(_bar_values(targets))
        .thresholds(_thresholds(steps))
    )
    if minimum is not None:
        panel = panel.min(minimum)
    if maximum is not None:
        panel = panel.max(maximum)
    return panel


def listing(
    title: str, description: str, targets: Sequence[AnyTarget], unit: str = "short", span: int = 12
) -> table.Panel:
    """A table of instant results, one row per series and its labels."""
    panel = _framed(table.Panel(), title, description, targets, unit, span, 8).with_transformation(
        models.DataTransformerConfig(id_val="merge", options={})
    )
    return panel


def _bar_values(targets: Sequence[AnyTarget]) -> common_builders.ReduceDataOptions:
    """A bar per series (PromQL: its last value), or per row of a SQL table (`values`)."""
    if _on_sql(targets):
        return common_builders.ReduceDataOptions().values(True).calcs([])
    return common_builders.ReduceDataOptions().calcs(["lastNotNull"])


def _thresholds(steps: Sequence[tuple[float | None, str]]) -> builders.ThresholdsConfig:
    return (
        builders.ThresholdsConfig()
        .mode(models.ThresholdsMode.ABSOLUTE)
        .steps([models.Threshold(value=value, color=colour) for value, colour in steps])
    )


def _all() -> models.VariableOption:
    return models.VariableOption(text="All", value="$__all", selected=True)


def datasource_variable(kind: str = PROMETHEUS) -> builders.DatasourceVariable:
    return builders.DatasourceVariable("datasource").label("Data source").type(kind)


def query_variable(
    name: str,
    label: str,
    query: str,
    datasource: models.DataSourceRef = DATASOURCE,
    all_value: str = ".*",
) -> builders.QueryVariable:
    """A multi-select variable of a label's values, "All" by default meaning any value."""
    return (
        builders.QueryVariable(name)
        .label(label)
        .datasource(datasource)
        .query(query)
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(all_value)
        .current(_all())
    )


def column(name: str) -> str:
    """A SQL identifier, quoted: `user` is a reserved word in PostgreSQL."""
    return f'"{name}"'


@dataclass
class Board:
    """One dashboard being written: its variables, and panels laid out row by row.

    `where(metric, *labels)` is the selector of `metric` filtered by the variables named by
    `labels`; a label the dashboard has no variable for is an error, so filters stay honest.
    On PostgreSQL (`engine=POSTGRES`), `sql_where(*labels)` is the SQL condition of the same.
    """

    uid: str
    title: str
    description: str
    variables: tuple[str, ...]  # of NAMESPACE, MODEL, USER, in the order shown
    source: str  # the metric (the table on PostgreSQL) whose values fill the variables
    engine: str = PROMETHEUS  # or POSTGRES
    _builder: builders.Dashboard = field(init=False)
    _next_id: int = field(init=False, default=1)

    def __post_init__(self) -> None:
        self._builder = (
            builders.Dashboard(self.title)
            .uid(self.uid)
            .description(self.description)
            .tags(["arks"])
            .time("now-1h", "now")
            .refresh("30s")
            .timezone("browser")
            .tooltip(models.DashboardCursorSync.CROSSHAIR)
            .readonly()
            .with_variable(datasource_variable(self.engine))
        )
        for index, name in enumerate(self.variables):
            # Each variable lists the values seen under the ones before it.
            self._builder = self._builder.with_variable(
                self._variable(name, self.variables[:index])
            )

    def _variable(self, name: str, before: tuple[str, ...]) -> builders.QueryVariable:
        label = {NAMESPACE: "Namespace", MODEL: "Model", USER: "User"}[name]
        if self.engine == PROMETHEUS:
            narrowed = self.where(self.source, *before)
            return query_variable(name, label, f"label_values({narrowed}, {name})")
        if self.engine != POSTGRES:
            raise ValueError(f"{self.uid}: unknown engine {self.engine!r}")
        return query_variable(
            name,
            label,
            f"SELECT DISTINCT {column(name)} FROM {self.source}"
            f" WHERE {self.sql_where(*before)} ORDER BY 1",
            datasource=SQL_DATASOURCE,
            all_value=column(name),
        )

    def sql_where(self, *labels: str) -> str:
        """`$__timeFilter(time) AND "label" IN ($label) AND ...`: the range and the variables."""
        unknown = set(labels) - set(self.variables)
        if unknown:
            raise ValueError(f"{self.uid}: no variable for {sorted(unknown)}")
        return " AND ".join(
            ["$__timeFilter(time)", *(f"{column(label)} IN (${label})" for label in labels)]
        )

    def where(self, metric: str, *labels: str, extra: str = "") -> str:
        """`metric{label=~"$label", ...}`, plus `extra` matchers (`code=~"5.."`)."""
        unknown = set(labels) - set(self.variables)
        if unknown:
            raise ValueError(f"{self.uid}: no variable for {sorted(unknown)}")
        matchers = [f'{label}=~"${label}"' for label in labels]
        if extra:
            matchers.append(extra)
        return f"{metric}{{{', '.join(matchers)}}}" if matchers else metric

    def row(self, title: str) -> None:
        self._builder = self._builder.with_row(builders.Row(title).id(self._take_id()))

    def add(self, *panels: timeseries.Panel | stat.Panel | bargauge.Panel | table.Panel) -> None:
        for panel in panels:
            self._builder = self._builder.with_panel(panel.id(self._take_id()))

    def build(self) -> models.Dashboard:
        return self._builder.build()

    def _take_id(self) -> int:
        taken = self._next_id
        self._next_id += 1
        return taken
