"""envoyproxy/ratelimit's Prometheus series, read off ours at scrape time.

Upstream, with USE_PROMETHEUS=true, turns its statsd stats into Prometheus series through
statsd_exporter's mapping rules: its default rules, or PROMETHEUS_MAPPER_YAML's file (which
Envoy Gateway writes from its rate-limit rules). This collector names our `arks_ratelimit_*`
figures as upstream's statsd stats (`ratelimit.service.rate_limit.<stats key>.over_limit`,
`ratelimit_server.ShouldRateLimit.response_time`, ...) and maps them with the same rules
(`ratelimit.statsd_mapping`), so alerts, dashboards and Envoy Gateway's end-to-end tests find
the series they query, and nothing is counted twice on the decision path.

Differences, deliberate: upstream's counters carry no `_total` suffix, which prometheus_client
writes for every counter, so these are untyped (a query reads them the same); an Envoy override
is keyed `<domain>.override` (upstream: its descriptor's values); timers are histograms of our
buckets (a rule's `observer_type: summary` gives no quantiles).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import HistogramMetricFamily, Metric, UnknownMetricFamily
from prometheus_client.utils import floatToGoString

from arks.adapters import files
from ratelimit import statsd_mapping
from ratelimit.statsd_mapping import COUNTER, OBSERVER, Rule

log = logging.getLogger(__name__)

GRPC_METHOD = "ShouldRateLimit"

# Our per-limit family -> upstream's stat (`ratelimit.service.rate_limit.<key>.<stat>`).
PER_LIMIT = (
    ("arks_ratelimit_hits", "total_hits"),
    ("arks_ratelimit_over_limit", "over_limit"),
    ("arks_ratelimit_near_limit", "near_limit"),
    ("arks_ratelimit_within_limit", "within_limit"),
    ("arks_ratelimit_shadow_mode", "shadow_mode"),
    ("arks_ratelimit_over_limit_with_local_cache", "over_limit_with_local_cache"),
)
# Our counter without labels -> upstream's stat (`ratelimit.service.<stat>`).
PLAIN = (
    ("arks_ratelimit_config_reloads", "config_load_success"),
    ("arks_ratelimit_config_errors", "config_load_error"),
    ("arks_ratelimit_global_shadow_mode", "global_shadow_mode"),
)
CALL_ERRORS = "arks_ratelimit_call_errors"  # `type` -> ratelimit.service.call.should_rate_limit.*
CALL_SECONDS = "arks_ratelimit_call_seconds"  # by domain -> ratelimit_server.<method>.*

Labels = tuple[tuple[str, str], ...]
MAX_MAPPED = 200_000  # stats whose mapping is remembered (all forgotten at once beyond)


def stats_key(domain: str, key: str) -> str:
    """Upstream's stats key for our `key` label: it starts with the domain (an override's,
    `override`, is put under it)."""
    return key if key.startswith(f"{domain}.") else f"{domain}.{key}"


class RuleFile:
    """PROMETHEUS_MAPPER_YAML's rules, read again when the file changes: Envoy Gateway rewrites
    its ConfigMap as its rate-limit rules change (upstream reads the file once, at start-up). A
    file that cannot be read or parsed leaves the rules as they were; at start-up that is none
    (every series under its escaped statsd name), as upstream, which ignores the error."""

    def __init__(self, path: Path, *, response_time_ms: bool = False) -> None:
        self.path = path
        self.response_time_ms = response_time_ms
        self._seen: files.Stamp | None = None  # the file's when last read
        self._rules: tuple[Rule, ...] = ()
        self._said = False

    def __call__(self) -> tuple[Rule, ...]:
        seen = files.stamp(self.path)
        if seen is None:
            if not self._said:
                self._said = True
                log.warning("upstream's stat names: no %s; rules kept as they are", self.path)
            return self._rules
        if seen == self._seen:
            return self._rules
        self._seen, self._said = seen, False
        try:
            rules = statsd_mapping.parse(
                self.path.read_text(), response_time_ms=self.response_time_ms
            )
        except (OSError, UnicodeDecodeError, statsd_mapping.MappingError) as err:
            log.warning("upstream's stat names: %s unusable (%s); rules kept", self.path, err)
            return self._rules
        log.info("upstream's stat names: %d rules from %s", len(rules), self.path)
        self._rules = rules
        return rules


class UpstreamStats:
    """A collector of upstream's series, computed from `source`'s families on every scrape and
    named by `rules` (statsd_exporter's: fixed, or a `RuleFile` asked at each scrape;
    `statsd_mapping.DEFAULT` when none were given)."""

    foreign_names = True  # upstream's names, by its rules: outside `arks.metric_rules`

    def __init__(
        self,
        source: Iterable[Any],
        rules: tuple[Rule, ...] | Callable[[], tuple[Rule, ...]] | None = None,
    ) -> None:
        self.source = tuple(source)  # collectors (our counters, the call histogram)
        if rules is None:
            rules = statsd_mapping.parse(statsd_mapping.DEFAULT)
        self._rule_source = rules
        self.rules: tuple[Rule, ...] = ()
        # Each stat's mapping, worked out once per set of rules: a scrape runs in the metrics
        # thread, holding the GIL, and a regex rule per stat per series each time would stall
        # the decisions.
        self._mapped: dict[tuple[str, str], statsd_mapping.Mapped | None] = {}

    def _resolve(self, event: str, kind: str) -> statsd_mapping.Mapped | None:
        key = (event, kind)
        try:
            return self._mapped[key]
        except KeyError:
            if len(self._mapped) >= MAX_MAPPED:
                self._mapped.clear()
            found = self._mapped[key] = statsd_mapping.resolve(self.rules, event, kind)
            return found

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: every name is computed at scrape time

    def collect(self) -> Iterator[Metric]:
        source = self._rule_source
        rules = source if isinstance(source, tuple) else source()
        if rules is not self.rules:
            self.rules = rules
            self._mapped = {}
        families = {
            family.name: family for collector in self.source for family in collector.collect()
        }
        counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))

        def count(event: str, value: float) -> None:
            mapped = self._resolve(event, COUNTER)
            if mapped is not None:
                counters[mapped.name][mapped.labels] += value

        for ours, stat in PER_LIMIT:
            for sample in _counted(families.get(ours)):
                domain, key = sample.labels["domain"], sample.labels["key"]
                count(f"ratelimit.service.rate_limit.{stats_key(domain, key)}.{stat}", sample.value)
        for sample in _counted(families.get(CALL_ERRORS)):
            count(f"ratelimit.service.call.should_rate_limit.{sample.labels['type']}", sample.value)
        for ours, stat in PLAIN:
            for sample in _counted(families.get(ours)):
                count(f"ratelimit.service.{stat}", sample.value)
        calls = _Calls.of(families.get(CALL_SECONDS))
        count(f"ratelimit_server.{GRPC_METHOD}.total_requests", calls.count)
        for name, series in counters.items():
            labels = sorted({label for key in series for label, _ in key})
            family = UnknownMetricFamily(name, f"envoyproxy/ratelimit's {name}", labels=labels)
            for key, value in sorted(series.items()):
                family.add_sample(name, dict(key), value)
            yield family
        timed = self._resolve(f"ratelimit_server.{GRPC_METHOD}.response_time", OBSERVER)
        if timed is not None:
            yield calls.histogram(timed)


def _counted(family: Metric | None) -> Iterator[Any]:
    """A counter family's running totals (not its `_created` timestamps)."""
    if family is not None:
        yield from (s for s in family.samples if s.name.endswith("_total"))


class _Calls:
    """Every domain's call times together, in seconds."""

    def __init__(self) -> None:
        self.buckets: dict[float, float] = defaultdict(float)
        self.count = 0.0
        self.total_s = 0.0

    @classmethod
    def of(cls, family: Metric | None) -> _Calls:
        calls = cls()
        for sample in family.samples if family is not None else ():
            if sample.name.endswith("_bucket"):
                calls.buckets[float(sample.labels["le"])] += sample.value
            elif sample.name.endswith("_count"):
                calls.count += sample.value
            elif sample.name.endswith("_sum"):
                calls.total_s += sample.value
        return calls

    def histogram(self, mapped: statsd_mapping.Mapped) -> Metric:
        """As statsd_exporter observes upstream's timer: in milliseconds, times the rule's
        scale (upstream's default rule: 0.001, seconds)."""
        factor = 1000.0 * mapped.scale
        family = HistogramMetricFamily(
            mapped.name,
            f"envoyproxy/ratelimit's {mapped.name} (from {CALL_SECONDS})",
            labels=[label for label, _ in mapped.labels],
        )
        if self.buckets:
            bounds = [(_bound(le * factor), n) for le, n in sorted(self.buckets.items())]
            family.add_metric([value for _, value in mapped.labels], bounds, self.total_s * factor)
        return family


def _bound(le: float) -> str:
    """A bucket's bound as prometheus_client writes it ("0.005", "+Inf")."""
    return str(floatToGoString(le))  # type: ignore[no-untyped-call]
