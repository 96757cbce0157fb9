"""Which Envoy stats exist at all: the inclusion list of Envoy's `stats_matcher`, pure data.

Envoy creates thousands of stats (per cluster, per worker, per codec); each is memory in Envoy and
a series in Prometheus. Only the families the dashboards and alerts read are created: upstream
requests, latency, codes, timeouts, retries, outlier ejections and membership per cluster;
downstream requests per connection manager; ext_proc and ext_authz (the gateway); the gRPC access
log (usage); rejected xDS updates; server liveness, uptime and memory. The same list goes into the
local bootstrap (arks/envoy_config.py) and, as EnvoyProxy `spec.telemetry.metrics.matches`, into
the Envoy Gateway install (manifests/gateway/gateway.yaml; a unit test holds them equal).

Patterns match Envoy's own stat names (dotted, before tag extraction: `cluster.<name>.upstream_rq_2xx`
becomes `envoy_cluster_upstream_rq_xx{envoy_response_code_class="2"}`). Cluster names hold dots
(a model may be called `llama-3.1-8b`), so cluster patterns do not assume `[^.]+` for them.

The same dots defeat Envoy's default tag extractor for `envoy.cluster_name` (the token pattern
`cluster.$.**`, the first dot-separated token): `cluster.endpoint/default/llama-3.1-8b.upstream_rq_total`
became `envoy_cluster_1_8b_upstream_rq_total{envoy_cluster_name="endpoint/default/llama-3"}`.
`CLUSTER_NAME_REGEX` replaces it (`allow_default_tag_overrides`, Envoy 1.39 on; without it a
custom tag of a default tag's name loses to the default, and with it the default is gone, so ours
must read every cluster stat): the name is the shortest prefix followed by an included cluster
stat (`_CLUSTER_STATS`, after an optional origin or zone scope), so it may hold dots. Envoy
compiles custom tag regexes with std::regex; ours keeps to what RE2 and Python's `re` share too
(no lookaround), and the unit tests run it through `re`. One ambiguity is Envoy's own naming: a
name ending in `.external`, `.internal` or `.canary` reads as the shorter name with an
`external.upstream_rq_*` stat; `httproute/<ns>/<route>/rule/<n>` (Envoy Gateway) never does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["exact", "prefix", "regex"]


@dataclass(frozen=True)
class StatsMatch:
    kind: Kind
    value: str


# The cluster stats that exist: what follows `cluster.<name>.` (one capture group).
_CLUSTER_STATS = (
    r"(upstream_rq_([0-9]xx|[0-9]{3}|completed|total|active|pending_active|pending_overflow"
    r"|time|timeout|per_try_timeout|retry|retry_success|retry_overflow|retry_limit_exceeded"
    r"|rx_reset|tx_reset|cancelled)"
    r"|upstream_cx_(active|total|connect_fail|connect_timeout|overflow|none_healthy)"
    r"|(external|internal)\.upstream_rq_([0-9]xx|completed|time)"
    r"|membership_(healthy|degraded|excluded|total|change)"
    r"|outlier_detection\.ejections_(active|enforced_total|overflow)"
    r"|update_(attempt|success|rejected|failure)"
    r"|ratelimit\.(ok|over_limit|error|failure_mode_allowed)"
    r"|circuit_breakers\.[a-z]+\.(cx|cx_pool|rq|rq_pending|rq_retry)_open)"
)
_CLUSTER = rf"^cluster\..+\.{_CLUSTER_STATS}$"
_HTTP = (
    r"^http\.[^.]+\."
    r"(downstream_rq_([0-9]xx|total|active|completed|time|timeout|rx_reset|tx_reset"
    r"|overload_close|too_large|header_timeout|idle_timeout|max_duration_reached)"
    r"|downstream_cx_(active|total|overload_disable_keepalive|protocol_error)"
    r"|ext_proc\..+|ext_authz\..+|rds\..+|lua\.errors|no_route|no_cluster)$"
)
_LISTENER = (
    r"^listener\..+\.(downstream_cx_(active|total|overflow|overload_reject)"
    r"|downstream_global_cx_overflow)$"
)
_SERVER = (
    r"^server\.(live|state|uptime|concurrency|total_connections|version|hot_restart_epoch"
    r"|memory_allocated|memory_heap_size|memory_physical_size)$"
)

INCLUSIONS: tuple[StatsMatch, ...] = (
    StatsMatch("prefix", "cluster_manager."),
    StatsMatch("prefix", "listener_manager."),
    StatsMatch("prefix", "control_plane."),
    StatsMatch("prefix", "access_logs."),
    StatsMatch("prefix", "overload."),
    StatsMatch("regex", _SERVER),
    StatsMatch("regex", _CLUSTER),
    StatsMatch("regex", _HTTP),
    StatsMatch("regex", _LISTENER),
)

_EG_TYPES: dict[Kind, str] = {"exact": "Exact", "prefix": "Prefix", "regex": "RegularExpression"}


def stats_matcher(inclusions: tuple[StatsMatch, ...] = INCLUSIONS) -> dict[str, Any]:
    """Envoy's bootstrap `stats_matcher` (config.metrics.v3.StatsMatcher)."""
    patterns: list[dict[str, Any]] = []
    for match in inclusions:
        if match.kind == "regex":
            patterns.append({"safe_regex": {"regex": match.value}})
        else:
            patterns.append({match.kind: match.value})
    return {"inclusion_list": {"patterns": patterns}}


def envoy_gateway_matches(inclusions: tuple[StatsMatch, ...] = INCLUSIONS) -> list[dict[str, str]]:
    """EnvoyProxy `spec.telemetry.metrics.matches` (Envoy Gateway renders them into the same
    inclusion list of its bootstrap: exact, prefix, safe_regex)."""
    return [{"type": _EG_TYPES[m.kind], "value": m.value} for m in inclusions]


# Envoy's built-in tag name for the cluster of a `cluster.<name>.*` stat (Prometheus label
# `envoy_cluster_name`), and our extractor for it: group 1 is cut from the stat name, group 2 is
# the value (config.metrics.v3.TagSpecifier.regex).
CLUSTER_NAME_TAG = "envoy.cluster_name"
# Envoy also counts a cluster's requests by origin and zone (`external.`, `internal.`, `canary.`,
# `zone.<from>.<to>.`), which the inclusion list lets through with its `.+`: read as a scope
# before the stat, not as part of the name.
_CLUSTER_SCOPE = r"(?:(?:external|internal|canary)\.|zone\.[^.]+\.[^.]+\.)?"
CLUSTER_NAME_REGEX = rf"^cluster\.((.+?)\.){_CLUSTER_SCOPE}{_CLUSTER_STATS}$"


def stats_tags() -> list[dict[str, Any]]:
    """Envoy's `stats_config.stats_tags`: the cluster-name extractor that keeps dots."""
    return [{"tag_name": CLUSTER_NAME_TAG, "regex": CLUSTER_NAME_REGEX}]


def stats_config(inclusions: tuple[StatsMatch, ...] = INCLUSIONS) -> dict[str, Any]:
    """The local bootstrap's `stats_config` (config.metrics.v3.StatsConfig): which stats exist and
    how their cluster names are read; the other default tags stay (`use_all_default_tags`)."""
    return {
        "stats_matcher": stats_matcher(inclusions),
        "stats_tags": stats_tags(),
        "allow_default_tag_overrides": True,
    }


def envoy_gateway_bootstrap() -> dict[str, Any]:
    """EnvoyProxy `spec.bootstrap`: the same extractor added to the bootstrap Envoy Gateway renders.

    JSONPatch rather than Merge: Envoy Gateway merges by parsing both documents into its Go
    protos with unknown fields allowed and dropped, so a field newer than its go-control-plane
    would vanish unseen; a JSON patch is applied to the rendered YAML as text. Envoy Gateway's
    bootstrap always holds `stats_config.stats_tags` (its own zone and circuit-breaker tags), so
    ours is appended after them."""
    return {
        "type": "JSONPatch",
        "jsonPatches": [
            {"op": "add", "path": "/stats_config/allow_default_tag_overrides", "value": True},
            *(
                {"op": "add", "path": "/stats_config/stats_tags/-", "value": tag}
                for tag in stats_tags()
            ),
        ],
    }
