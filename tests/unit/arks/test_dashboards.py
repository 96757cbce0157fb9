"""The Grafana dashboards (`python -m arks.dashboards`): committed as generated, loadable by the
SDK's own model without losing a key, installed by ConfigMaps the Grafana sidecar picks up, and
every panel query valid PromQL over metrics something exports, filtered by the variables. The
billing dashboard's SQL is left to the PromQL checks explicitly, by its panels' data source type
(`queries()` vs `sql_queries()`), and run against a real PostgreSQL in
tests/integration/test_billing_dashboard.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from arks.dashboards import (
    CONFIGMAPS,
    DEFAULTS,
    DIRECTORY,
    PanelQuery,
    dashboards,
    dumps,
    queries,
    sql_queries,
    sql_variables,
    substitute,
    targets,
    variable_queries,
)
from arks.dashboards.__main__ import DEFAULT_OUT, drift, main
from arks.dashboards.sql import POSTGRES
from tests.support.metric_names import known
from tests.support.promql import PromQLError, Selector, selectors

BOARDS = dashboards()
QUERIES = list(queries())
VARIABLES = {
    "arks-gateway": ("namespace", "model"),
    "arks-tenants": ("namespace", "model", "user"),
    "arks-engines": ("namespace", "model"),
    "arks-control-plane": ("namespace", "model"),
    "arks-billing": ("namespace", "user"),
}
# The data source type each dashboard's panels and variables query.
KIND = {uid: "prometheus" for uid in VARIABLES} | {"arks-billing": POSTGRES}
KNOWN = known()


def committed() -> dict[str, dict[str, Any]]:
    return {
        path.stem: json.loads(path.read_text())
        for path in sorted((DEFAULT_OUT / DIRECTORY).glob("*.json"))
    }


def round_trip(board: dict[str, Any]) -> dict[str, Any]:
    """The JSON as the SDK's model reads it and writes it back."""
    register_default_plugins()
    out: dict[str, Any] = json.loads(dumps(Dashboard.from_json(board)))
    return out


# --- generated, and checked for drift ---------------------------------------------------------


def test_committed_dashboards_are_what_the_python_generates() -> None:
    assert drift(DEFAULT_OUT) == [], "run `python -m arks.dashboards`"


def test_check_flag_fails_on_drift(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [CONFIGMAPS]}))
    assert main(["--out", str(tmp_path)]) == 0
    assert main(["--check", "--out", str(tmp_path)]) == 0
    victim = tmp_path / DIRECTORY / "arks-gateway.json"
    victim.write_text(victim.read_text().replace("$__rate_interval", "5m", 1))
    assert main(["--check", "--out", str(tmp_path)]) == 1
    assert main(["--out", str(tmp_path)]) == 0
    (tmp_path / DIRECTORY / "old.json").write_text("{}\n")
    assert any("stale" in p for p in drift(tmp_path))
    assert main(["--out", str(tmp_path)]) == 0  # removes the stale one
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": []}))
    assert any(CONFIGMAPS in p for p in drift(tmp_path))


# --- the SDK's model --------------------------------------------------------------------------


@pytest.mark.parametrize("uid", list(VARIABLES))
def test_each_dashboard_round_trips_through_the_sdk_unchanged(uid: str) -> None:
    board = committed()[uid]
    assert round_trip(board) == board


def test_a_misspelt_key_does_not_survive_the_round_trip() -> None:
    """What the round trip catches: the loader knows only the model's keys."""
    board = committed()["arks-gateway"]
    for spoil in (
        lambda b: b["panels"][1].__setitem__("titel", "x"),
        lambda b: b["panels"][1]["targets"][0].__setitem__("legendFromat", "x"),
        lambda b: b["templating"]["list"][1].__setitem__("includeALL", True),
        lambda b: b.__setitem__("refersh", "1m"),
    ):
        spoiled = json.loads(json.dumps(board))
        spoil(spoiled)
        assert round_trip(spoiled) != spoiled


# --- the ConfigMaps ---------------------------------------------------------------------------


def test_each_dashboard_has_a_configmap_for_the_grafana_sidecar() -> None:
    docs = [d for d in yaml.safe_load_all((DEFAULT_OUT / CONFIGMAPS).read_text()) if d]
    assert {d["kind"] for d in docs} == {"ConfigMap"}
    by_key = {key: text for d in docs for key, text in d["data"].items()}
    assert set(by_key) == {f"{uid}.json" for uid in VARIABLES}
    for doc in docs:
        # kube-prometheus-stack's grafana.sidecar.dashboards.label / labelValue defaults
        assert doc["metadata"]["labels"]["grafana_dashboard"] == "1"
    for uid in VARIABLES:
        assert by_key[f"{uid}.json"] == (DEFAULT_OUT / DIRECTORY / f"{uid}.json").read_text()


def test_each_configmap_fits_kubectl_apply() -> None:
    """Client-side `kubectl apply` copies an object into its last-applied annotation, at most
    256 KiB (262144 bytes) of annotations per object."""
    for doc in yaml.safe_load_all((DEFAULT_OUT / CONFIGMAPS).read_text()):
        if doc:
            assert len(json.dumps(doc)) < 262144 * 0.75, doc["metadata"]["name"]


def test_the_monitoring_kustomization_installs_the_configmaps() -> None:
    kustomization = yaml.safe_load((DEFAULT_OUT / "kustomization.yaml").read_text())
    assert CONFIGMAPS in kustomization["resources"]


# --- the dashboards ---------------------------------------------------------------------------


def test_stable_uids_and_titles() -> None:
    assert list(BOARDS) == list(VARIABLES)
    assert all(board["title"].startswith("Arks / ") for board in BOARDS.values())


@pytest.mark.parametrize("uid", list(VARIABLES))
def test_variables_are_datasource_then_multi_select_with_all(uid: str) -> None:
    variables = BOARDS[uid]["templating"]["list"]
    assert [v["name"] for v in variables] == ["datasource", *VARIABLES[uid]]
    assert variables[0]["type"] == "datasource" and variables[0]["query"] == KIND[uid]
    for variable in variables[1:]:
        assert variable["type"] == "query"
        assert variable["multi"] and variable["includeAll"]
        if KIND[uid] == "prometheus":
            assert variable["allValue"] == ".*"  # also matches an empty label (model="")
        else:  # SQL: "All" is `"col" IN ("col")`, true for every row (Grafana inserts it as is)
            assert variable["allValue"] == f'"{variable["name"]}"'
        assert variable["datasource"] == {"type": KIND[uid], "uid": "${datasource}"}


@pytest.mark.parametrize("uid", list(VARIABLES))
def test_panels_have_unique_ids_and_query_the_datasource_variable(uid: str) -> None:
    panels = BOARDS[uid]["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": KIND[uid], "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_queries_lists_every_target() -> None:
    """Every target is a PromQL query (`queries()`) or a SQL one (`sql_queries()`), by its
    panel's data source type, never neither: the PromQL checks skip SQL explicitly."""
    total = sum(len(p.get("targets", [])) for b in BOARDS.values() for p in b["panels"])
    sqls = list(sql_queries())
    assert len(QUERIES) + len(sqls) == total and len(QUERIES) > 80 and len(sqls) >= 10
    assert {q.dashboard for q in sqls} == {uid for uid, kind in KIND.items() if kind == POSTGRES}
    assert not {q.dashboard for q in QUERIES} & {q.dashboard for q in sqls}
    assert all("expr" not in t and "rawSql" in t for kind, _, _, t in targets() if kind == POSTGRES)
    assert len(list(sql_variables())) == 2  # namespace, user
    strange = {"billing": {**BOARDS["arks-billing"]}}
    strange["billing"]["panels"] = [
        {**p, "datasource": {"type": "loki", "uid": "x"}} for p in BOARDS["arks-billing"]["panels"]
    ]
    with pytest.raises(ValueError, match="loki"):
        list(queries(strange))  # an unknown data source type is refused, not skipped
    assert QUERIES[0] == PanelQuery(
        "arks-gateway",
        "Requests per second by status",
        "A",
        'sum by (code) (rate(arks_requests_total{namespace=~"$namespace", model=~"$model"}'
        "[$__rate_interval]))",
        False,
    )


def test_substitute_fills_grafanas_variables() -> None:
    assert substitute('rate(x{a=~"$namespace"}[$__rate_interval])') == 'rate(x{a=~".*"}[1m])'
    assert substitute("${user}", {"user": "alice"}) == "alice"
    with pytest.raises(KeyError):
        substitute("$unknown")


# --- the queries ------------------------------------------------------------------------------


def _variable_selectors() -> list[Selector]:
    out = []
    for query in variable_queries():
        match = re.fullmatch(r"label_values\((.*), (\w+)\)", query)
        assert match, query
        out.extend(selectors(match.group(1)))
    return out


def test_every_query_is_valid_promql_to_promtool() -> None:
    """Prometheus's own parser (promtool, Debian's prometheus package; .ci/run installs it)
    over every query with Grafana's variables filled in, as recording rules."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is needed (apt-get install prometheus; .ci/run installs it)"
    exprs = [substitute(q.expr) for q in QUERIES]
    exprs += [substitute(s) for s in (q.split("label_values(", 1)[1].rsplit(", ", 1)[0]
                                      for q in variable_queries())]  # fmt: skip

    def check(expressions: list[str]) -> subprocess.CompletedProcess[str]:
        rules = [{"record": f"q{i}", "expr": e} for i, e in enumerate(expressions)]
        return subprocess.run(
            [promtool, "check", "rules", "/dev/stdin"],
            input=yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    ok = check(exprs)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in ok.stdout
    broken = check([*exprs, "sum by (model (rate(x[1m]))"])
    assert broken.returncode != 0  # the check has teeth


def test_every_query_has_balanced_brackets_and_valid_matchers() -> None:
    for query in QUERIES:
        assert selectors(query.expr), query
    for bad in ("sum(rate(x[1m])", 'x{a="b"', 'x{a~"b"}', "x{a=b}", 'sum(x{a="b"}))'):
        with pytest.raises(PromQLError):
            selectors(bad)


def test_every_metric_a_query_reads_is_exported_by_something() -> None:
    unknown = {
        (q.dashboard, q.panel, s.metric)
        for q in QUERIES
        for s in selectors(q.expr)
        if s.metric not in KNOWN
    }
    unknown |= {("variables", "", s.metric) for s in _variable_selectors() if s.metric not in KNOWN}
    assert not unknown


def test_every_selector_names_a_metric() -> None:
    for query in QUERIES:
        assert all(s.metric for s in selectors(query.expr)), query


def _label(metric: str, variable: str) -> str:
    """The label a variable filters on `metric`: engines name the model `model_name`."""
    return "model_name" if variable == "model" and ":" in metric else variable


def test_every_query_filters_by_the_dashboards_variables_where_the_metric_has_the_label() -> None:
    missing = []
    for query in QUERIES:
        for selector in selectors(query.expr):
            for variable in VARIABLES[query.dashboard]:
                label = _label(selector.metric, variable)
                if (
                    label in KNOWN[selector.metric]
                    and (label, "=~", f"${variable}") not in selector.matchers
                ):
                    missing.append((query.dashboard, query.panel, selector.metric, label))
    assert not missing


def test_filters_use_only_labels_the_metric_has() -> None:
    for query in QUERIES:
        for selector in selectors(query.expr):
            for label, _op, _value in selector.matchers:
                assert label in KNOWN[selector.metric], (query.panel, selector.metric, label)


def test_the_defaults_cover_every_variable_the_queries_use() -> None:
    used = {name for q in QUERIES for name in re.findall(r"\$\{?(\w+)", q.expr)}
    assert used <= set(DEFAULTS)
