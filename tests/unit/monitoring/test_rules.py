"""The alert and recording rules (arks/alert_rules.py): the generated files are fresh and agree,
each alert says who and what and links its runbook, and `promtool` (Debian's prometheus package,
2.42) checks the rule file and runs the unit tests in promtool/ — one file per group. A wrong
expectation must make promtool fail, or the passing runs would prove nothing."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from arks import alert_rules, monitoring
from tests.support.paths import REPO

PROMTOOL_TESTS = Path(__file__).parent / "promtool"
RULE_FILE = REPO / "manifests" / "monitoring" / monitoring.RULE_FILE


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is needed (apt-get install prometheus; .ci/run installs it)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)


def test_the_generated_files_are_fresh() -> None:
    assert monitoring.main(["--check"]) == 0, "run `python -m arks.monitoring`"


def _docs(name: str) -> list[dict[str, Any]]:
    text = (REPO / "manifests" / "monitoring" / name).read_text()
    return [d for d in yaml.safe_load_all(text) if d]


def test_the_plain_file_the_configmap_and_the_prometheus_rule_hold_the_same_groups() -> None:
    plain = yaml.safe_load(RULE_FILE.read_text())
    (rule,) = _docs("prometheusrule.yaml")
    (configmap,) = _docs("prometheus-rules-configmap.yaml")
    assert rule["spec"]["groups"] == plain["groups"] == alert_rules.rule_groups()
    assert yaml.safe_load(configmap["data"]["arks-rules.yaml"]) == plain


def test_promtool_accepts_the_rule_file() -> None:
    result = promtool("check", "rules", str(RULE_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {sum(len(g.rules) for g in alert_rules.GROUPS)} rules found" in result.stdout


@pytest.mark.parametrize("test_file", sorted(PROMTOOL_TESTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_promtool_unit_tests_pass(test_file: Path) -> None:
    result = promtool("test", "rules", str(test_file))  # rule_files: relative to the file
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_wrong_expectation_makes_promtool_fail(tmp_path: Path) -> None:
    source = yaml.safe_load((PROMTOOL_TESTS / "gateway.yaml").read_text())
    source["rule_files"] = [str(RULE_FILE)]
    (case,) = [t for t in source["tests"] if t["name"].startswith("the counter store")]
    (check,) = case["alert_rule_test"]
    check["exp_alerts"][0]["exp_labels"]["severity"] = "warning"  # it is critical
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(source))
    result = promtool("test", "rules", str(wrong))
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr
    assert "ArksCounterStoreFailingOpen" in result.stdout + result.stderr


def test_each_group_has_its_promtool_file() -> None:
    files = {p.stem.replace("_", "-") for p in PROMTOOL_TESTS.glob("*.yaml")}
    assert {f"arks-{name}" for name in files} == {g.name for g in alert_rules.GROUPS}


def test_every_alert_is_seen_firing_and_every_recording_rule_evaluated() -> None:
    fired: set[str] = set()
    evaluated = ""
    for path in PROMTOOL_TESTS.glob("*.yaml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check["exp_alerts"]:
                    fired.add(check["alertname"])
            evaluated += " ".join(c["expr"] for c in case.get("promql_expr_test", []))
    assert fired == {a.alert for a in alert_rules.alerts()}
    records = [r for g in alert_rules.GROUPS for r in g.rules if isinstance(r, alert_rules.Record)]
    for record in records:
        assert record.record in evaluated, record.record


def test_every_alert_has_a_severity_who_and_what_and_a_runbook() -> None:
    names = [a.alert for a in alert_rules.alerts()]
    assert len(names) == len(set(names))
    for group in alert_rules.rule_groups():
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert set(rule["annotations"]) == {"summary", "description", "runbook"}
            assert rule["annotations"]["runbook"] == (
                f"{alert_rules.RUNBOOK}#{rule['alert'].lower()}"
            )
            # Whatever the expression keeps as labels is named in the summary or description.
            kept = re.search(r"(?:sum|max) by \(([^)]*)\)", rule["expr"])
            text = rule["annotations"]["summary"] + rule["annotations"]["description"]
            for label in kept.group(1).split(", ") if kept else []:
                if label != "job":
                    assert f"$labels.{label}" in text, (rule["alert"], label)


def test_every_runbook_link_lands_on_a_readme_section_and_the_alert_table_is_complete() -> None:
    """A runbook link is the README's heading for the alert (GitHub's anchor: the heading in
    lower case), and the README's alert table lists every alert with its severity."""
    readme = (REPO / "README.md").read_text()
    headings = {h.lower() for h in re.findall(r"^#+ (\S+)\s*$", readme, flags=re.M)}
    rows = dict(re.findall(r"^\| \[(\w+)\]\(#\w+\) \| (\w+) \|", readme, flags=re.M))
    for alert in alert_rules.alerts():
        assert alert.alert.lower() in headings, alert.alert
        assert rows.get(alert.alert) == alert.severity, alert.alert
    assert set(rows) == {a.alert for a in alert_rules.alerts()}
