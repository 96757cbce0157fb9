"""statsd_exporter's mapping rules, the subset envoyproxy/ratelimit's Prometheus sink is used with:
a statsd name (`ratelimit.service.rate_limit.rl.user.over_limit`) to a Prometheus name and
labels. Pure: the rules come in as text (PROMETHEUS_MAPPER_YAML's file, or `DEFAULT`).

What is read of statsd_exporter's format: `defaults.match_type`; per mapping `match`,
`match_type` (glob: `*` is any run of characters but a dot; regex: anchored at both ends), `name`,
`labels` (`$1` or `${1}` for a glob's stars or a regex's groups), `action: drop`,
`match_metric_type` (counter, gauge, observer), `scale` (a timer's factor). Glob rules are tried
first, in their order, then regex rules, in theirs (statsd_exporter's order). A name no rule
matches is exported under its escaped self (`ratelimit_service_rate_limit_rl_user_over_limit`),
as statsd_exporter does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

# What upstream's sink maps by default (its src/stats/prom/default_mapper.yaml, in our words): a
# limit's stats key `domain.key1[.key2...]` as the labels domain, key1 and key2; the call, error
# and config stats; response times from milliseconds to seconds.
_STATS = ("near_limit", "over_limit", "total_hits", "within_limit", "shadow_mode")
_PART = r"([^\.]*)"
DEFAULT = yaml.safe_dump(
    {
        "mappings": [
            *(
                {
                    "match": f"ratelimit.service.rate_limit.*.*.{stat}",
                    "name": f"ratelimit_service_rate_limit_{stat}",
                    "labels": {"domain": "$1", "key1": "$2"},
                }
                for stat in _STATS
            ),
            *(
                {
                    "match": rf"ratelimit\.service\.rate_limit\.{_PART}\.{_PART}\.{_PART}(\..*)?"
                    rf"\.{stat}",
                    "match_type": "regex",
                    "name": f"ratelimit_service_rate_limit_{stat}",
                    "labels": {"domain": "$1", "key1": "$2", "key2": "$3"},
                }
                for stat in _STATS
            ),
            {
                "match": "ratelimit.service.call.should_rate_limit.*",
                "name": "ratelimit_service_should_rate_limit_error",
                "match_metric_type": "counter",
                "labels": {"err_type": "$1"},
            },
            {
                "match": "ratelimit_server.*.total_requests",
                "name": "ratelimit_service_total_requests",
                "match_metric_type": "counter",
                "labels": {"grpc_method": "$1"},
            },
            {
                "match": "ratelimit_server.*.response_time",
                "name": "ratelimit_service_response_time_seconds",
                "scale": 0.001,
                "labels": {"grpc_method": "$1"},
            },
            *(
                {
                    "match": f"ratelimit.service.{stat}",
                    "name": f"ratelimit_service_{stat}",
                    "match_metric_type": "counter",
                }
                for stat in ("config_load_success", "config_load_error")
            ),
        ]
    },
    sort_keys=False,
)

COUNTER, GAUGE, OBSERVER = "counter", "gauge", "observer"


class MappingError(ValueError):
    """Mapping rules that cannot be read; the message names the rule."""


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    name: str
    labels: tuple[tuple[str, str], ...]
    drop: bool = False
    metric_type: str | None = None  # only events of this kind (None: any)
    scale: float = 1.0
    glob: bool = True


@dataclass(frozen=True)
class Mapped:
    name: str
    labels: tuple[tuple[str, str], ...]
    scale: float = 1.0


def parse(text: str, *, response_time_ms: bool = False) -> tuple[Rule, ...]:
    """The rules of a mapping file, globs first (each group in the file's order). With
    `response_time_ms` (upstream's PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS) no rule scales."""
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise MappingError(f"not YAML: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("mappings", []), list):
        raise MappingError("expected a mapping with a `mappings` list")
    defaults = document.get("defaults") or {}
    default_type = str(defaults.get("match_type", "glob")) if isinstance(defaults, dict) else "glob"
    rules = [
        _rule(i, raw, default_type, response_time_ms)
        for i, raw in enumerate(document.get("mappings", []))
    ]
    return tuple(r for r in rules if r.glob) + tuple(r for r in rules if not r.glob)


def _rule(index: int, raw: Any, default_type: str, response_time_ms: bool) -> Rule:
    where = f"mappings[{index}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("match"), str):
        raise MappingError(f"{where}: a mapping needs a `match` string")
    match_type = str(raw.get("match_type", default_type))
    if match_type not in ("glob", "regex"):
        raise MappingError(f"{where}: match_type {match_type!r}: glob or regex")
    drop = raw.get("action", "map") == "drop"
    name = raw.get("name", "")
    if not drop and not (isinstance(name, str) and name):
        raise MappingError(f"{where}: a mapping needs a `name`")
    labels = raw.get("labels") or {}
    if not isinstance(labels, dict):
        raise MappingError(f"{where}: `labels` is a mapping of label to value")
    metric_type = raw.get("match_metric_type")
    if metric_type not in (None, COUNTER, GAUGE, OBSERVER, "timer"):
        raise MappingError(f"{where}: match_metric_type {metric_type!r}")
    try:
        pattern = re.compile(
            _glob(raw["match"]) if match_type == "glob" else f"^(?:{raw['match']})$"
        )
    except re.error as err:
        raise MappingError(f"{where}: {err}") from None
    scale = 1.0 if response_time_ms else float(raw.get("scale", 1.0))
    return Rule(
        pattern,
        str(name),
        tuple((str(k), str(v)) for k, v in labels.items()),
        drop,
        OBSERVER if metric_type == "timer" else metric_type,
        scale,
        match_type == "glob",
    )


def _glob(match: str) -> str:
    return "^" + r"([^.]*)".join(re.escape(part) for part in match.split("*")) + "$"


_GROUP = re.compile(r"\$\{(\d+)\}|\$(\d+)")


def resolve(rules: tuple[Rule, ...], name: str, kind: str) -> Mapped | None:
    """What statsd_exporter makes of the event `name` of `kind` (counter, gauge, observer):
    the first rule's name and labels, None when that rule drops it, and the escaped name with
    no labels when no rule matches."""
    for rule in rules:
        if rule.metric_type is not None and rule.metric_type != kind:
            continue
        found = rule.pattern.match(name)
        if found is None:
            continue
        if rule.drop:
            return None
        groups = found.groups()

        def fill(template: str, groups: tuple[str | None, ...] = groups) -> str:
            def group(m: re.Match[str]) -> str:
                n = int(m.group(1) or m.group(2))
                return (groups[n - 1] or "") if 0 < n <= len(groups) else ""

            return _GROUP.sub(group, template)

        return Mapped(
            escape(fill(rule.name)), tuple((k, fill(v)) for k, v in rule.labels), rule.scale
        )
    return Mapped(escape(name), ())


_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def escape(name: str) -> str:
    """statsd_exporter's escaping of a name: every other character an underscore, and one
    before a leading digit."""
    escaped = _INVALID.sub("_", name)
    return f"_{escaped}" if escaped[:1].isdigit() else escaped
