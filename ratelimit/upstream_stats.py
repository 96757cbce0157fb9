"""envoyproxy/ratelimit's Prometheus series, read off ours at scrape time.

Upstream, with USE_PROMETHEUS=true, turns its statsd stats into Prometheus series through
statsd_exporter and its default mapping (`src/stats/prom/default_mapper.yaml`): a limit's stats
key `domain.key1_value1.key2_value2...` becomes the labels `domain`, `key1` and, with a third
part or more, `key2` (deeper parts dropped, their counts summed) of
`ratelimit_service_rate_limit_{total_hits,over_limit,near_limit,within_limit,shadow_mode}`.
Alerts, dashboards and Envoy Gateway's own end-to-end tests query those names. This collector
serves them from our `arks_ratelimit_*` families when asked (`--upstream-stat-names`), so
nothing is counted twice on the decision path.

Differences, deliberate: upstream's counters carry no `_total` suffix, which prometheus_client
writes for every counter, so these are untyped (a query reads them the same); an Envoy override
is keyed `override` (upstream: its descriptor's values); the call-time histogram has our
buckets.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.metrics_core import HistogramMetricFamily, Metric, UnknownMetricFamily
from prometheus_client.utils import floatToGoString

PREFIX = "ratelimit_service_"
GRPC_METHOD = "ShouldRateLimit"

# Our per-limit family -> upstream's stat name.
PER_LIMIT = (
    ("arks_ratelimit_hits", "total_hits"),
    ("arks_ratelimit_over_limit", "over_limit"),
    ("arks_ratelimit_near_limit", "near_limit"),
    ("arks_ratelimit_within_limit", "within_limit"),
    ("arks_ratelimit_shadow_mode", "shadow_mode"),
)
# Our counter without labels -> upstream's name (statsd `ratelimit.service.<stat>`).
PLAIN = (
    ("arks_ratelimit_config_reloads", "config_load_success"),
    ("arks_ratelimit_config_errors", "config_load_error"),
)
CALL_ERRORS = "arks_ratelimit_call_errors"  # label `type` -> upstream's `err_type`
CALL_SECONDS = "arks_ratelimit_call_seconds"  # by domain -> one histogram per gRPC method


def key_labels(domain: str, key: str) -> tuple[tuple[str, str], ...]:
    """The default mapping's labels for a stats key: its domain, then key1 and key2."""
    parts = key.split(".")
    if len(parts) > 1 and parts[0] == domain:
        parts = parts[1:]
    labels = [("domain", domain), ("key1", parts[0])]
    if len(parts) > 1:
        labels.append(("key2", parts[1]))
    return tuple(labels)


class UpstreamStats:
    """A collector of upstream's series, computed from `source`'s families on every scrape."""

    def __init__(self, source: Iterable[Any]) -> None:
        self.source = tuple(source)  # collectors (our counters, the call histogram)

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: every name is computed at scrape time

    def collect(self) -> Iterator[Metric]:
        families = {
            family.name: family for collector in self.source for family in collector.collect()
        }
        for ours, stat in PER_LIMIT:
            sums: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
            for sample in _counted(families.get(ours)):
                labels = sample.labels
                sums[key_labels(labels["domain"], labels["key"])] += sample.value
            yield _untyped(
                f"{PREFIX}rate_limit_{stat}",
                f"envoyproxy/ratelimit's {stat} of a limit (from {ours})",
                sums,
            )
        errors: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
        for sample in _counted(families.get(CALL_ERRORS)):
            errors[(("err_type", sample.labels["type"]),)] += sample.value
        yield _untyped(
            f"{PREFIX}should_rate_limit_error", f"Failed calls by type (from {CALL_ERRORS})", errors
        )
        for ours, stat in PLAIN:
            total = sum(sample.value for sample in _counted(families.get(ours)))
            yield _untyped(
                f"{PREFIX}{stat}", f"envoyproxy/ratelimit's {stat} (from {ours})", {(): total}
            )
        yield from _calls(families.get(CALL_SECONDS))


def _counted(family: Metric | None) -> Iterator[Any]:
    """A counter family's running totals (not its `_created` timestamps)."""
    if family is not None:
        yield from (s for s in family.samples if s.name.endswith("_total"))


def _untyped(name: str, doc: str, sums: dict[tuple[tuple[str, str], ...], float]) -> Metric:
    labels = sorted({label for key in sums for label, _ in key})
    family = UnknownMetricFamily(name, doc, labels=labels)
    for key, value in sorted(sums.items()):
        family.add_sample(name, dict(key), value)
    return family


def _calls(family: Metric | None) -> Iterator[Metric]:
    """Every domain's call times as one histogram per method, and its count as total_requests."""
    buckets: dict[float, float] = defaultdict(float)
    count = total = 0.0
    for sample in family.samples if family is not None else ():
        if sample.name.endswith("_bucket"):
            buckets[float(sample.labels["le"])] += sample.value
        elif sample.name.endswith("_count"):
            count += sample.value
        elif sample.name.endswith("_sum"):
            total += sample.value
    method = {"grpc_method": GRPC_METHOD}
    requests = UnknownMetricFamily(
        f"{PREFIX}total_requests",
        f"Calls by gRPC method (from {CALL_SECONDS})",
        labels=["grpc_method"],
    )
    requests.add_sample(f"{PREFIX}total_requests", method, count)
    yield requests
    seconds = HistogramMetricFamily(
        f"{PREFIX}response_time_seconds",
        f"Call times by gRPC method (from {CALL_SECONDS})",
        labels=["grpc_method"],
    )
    if buckets:
        bounds = [(_bound(le), n) for le, n in sorted(buckets.items())]
        seconds.add_metric([GRPC_METHOD], bounds, total)
    yield seconds


def _bound(le: float) -> str:
    """A bucket's bound as prometheus_client writes it ("0.005", "+Inf")."""
    return str(floatToGoString(le))  # type: ignore[no-untyped-call]
