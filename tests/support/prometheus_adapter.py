"""prometheus-adapter's rule handling, as its Go code does it, for rules we cannot run it on.

The adapter (kubernetes-sigs/prometheus-adapter, a Go binary) cannot be built or run here, so
this mirrors the three steps of `pkg/naming` a Pods-metric request goes through, closely enough
to evaluate our rules against a real Prometheus:

- discovery: the series `seriesQuery` finds (`/api/v1/series`), kept when `name.matches`
  matches their name (`MetricNameForSeries`, an unanchored Go regexp search);
- naming: `name.as` expanded with the match's groups (`${1}`), `$0`/`$1` by default;
- querying: `metricsQuery` with `<<.Series>>` the series name, `<<.LabelMatchers>>`
  `namespace="ns",pod="p"` (several pods: `pod=~"p1|p2"`), `<<.GroupBy>>` `pod`
  (`metricsQuery.Build`: namespace first, then the resource's label).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.paths import REPO

VALUES = REPO / "manifests" / "autoscaling" / "prometheus-adapter-values.yaml"


@dataclass(frozen=True)
class Rule:
    series_query: str
    matches: str
    as_: str
    metrics_query: str
    resources: Mapping[str, Any]

    @property
    def name_regex(self) -> str:
        """The `__name__=~` regex of the series query (Prometheus anchors it)."""
        found = re.search(r'__name__=~"([^"]+)"', self.series_query)
        assert found, self.series_query
        return found.group(1)

    def selects(self, series_name: str) -> bool:
        return re.fullmatch(self.name_regex, series_name) is not None

    def api_name(self, series_name: str) -> str | None:
        """The custom metrics API name of `series_name`, or None when the rule skips it."""
        match = re.search(self.matches, series_name)
        if match is None:
            return None
        template = self.as_ or ("$0" if match.re.groups == 0 else "$1")
        return re.sub(
            r"\$\{(\d+)\}|\$(\d+)", lambda m: match.group(int(m.group(1) or m.group(2))), template
        )

    def query(self, series_name: str, namespace: str, pods: Sequence[str]) -> str:
        """The PromQL the adapter sends for the Pods metric of `pods` in `namespace`."""
        pod = f'pod="{pods[0]}"' if len(pods) == 1 else f'pod=~"{"|".join(pods)}"'
        return (
            self.metrics_query.replace("<<.Series>>", series_name)
            .replace("<<.LabelMatchers>>", f'namespace="{namespace}",{pod}')
            .replace("<<.GroupBy>>", "pod")
        )


def load_rules(path: Path = VALUES) -> list[Rule]:
    values = yaml.safe_load(path.read_text())
    return [
        Rule(
            series_query=r["seriesQuery"],
            matches=r["name"]["matches"],
            as_=r["name"].get("as", ""),
            metrics_query=r["metricsQuery"],
            resources=r["resources"],
        )
        for r in values["rules"]["custom"]
    ]


def resolve(discovered: Iterable[tuple[Rule, str]], api_name: str) -> tuple[Rule, str]:
    """The one (rule, series) among the discovered pairs that serves `api_name`; the adapter
    keeps one series per API name, so two would make it query either."""
    found = [(rule, name) for rule, name in discovered if rule.api_name(name) == api_name]
    assert len(found) == 1, f"{api_name}: served by {[(r.as_, n) for r, n in found]}"
    return found[0]
