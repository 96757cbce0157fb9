"""What the servicer calls: pick an engine for a forwarded request, note its end.

Per weighting mode a `Profile`:
- `least-load`: healthy engines, those with KV-cache room first, the shortest queue (scraped
  waiting plus our unseen picks) then the freest KV cache.
- `prefix-cache`: the same, plus queue room, plus the prompt's cached prefix with a weight that
  beats any load difference: a conversation stays on the engine holding its prefix while that
  engine has room (`QueueRoom`, `KvCacheRoom`), and moves to the least loaded otherwise; a
  prompt with no cached prefix goes to the least loaded. Every pick is recorded in the index.

An endpoint without engines the gateway knows (routed to Services, which Envoy Gateway
balances, or not seen by the scrape loop yet) is left to Envoy ("unmanaged"). No engine to
pick among known ones (none scraped yet, all failing): fail open — no destination, Envoy's own
least-request balancing over the endpoint's engines decides — or, with `fail_closed`, 503
`no_backend`. Both counted in `arks_picks_total{reason}`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter

from arks.api import LEAST_LOAD, PREFIX_CACHE
from extproc.decision import Deny, Identity
from extproc.metrics import GatewayMetrics
from extproc.picking.filters import Healthy, KvCacheRoom, QueueRoom
from extproc.picking.picker import Profile, pick
from extproc.picking.prefix import PrefixIndex, block_hashes
from extproc.picking.scorers import KvCacheScorer, PickRequest, PrefixScorer, QueueScorer
from extproc.picking.state import Datastore


@dataclass(frozen=True)
class PickSettings:
    fail_closed: bool = False  # 503 when no engine can be picked, instead of letting Envoy choose
    interval_s: float = 0.5  # engines' /metrics are scraped this often
    scrape_timeout_s: float = 0.4
    max_failures: int = 2  # consecutive failed scrapes that take an engine out
    kv_threshold: float = 0.9
    prefix_max_waiting: float = (
        8.0  # an engine holding a prefix keeps it while its queue is shorter
    )
    prefix_weight: float = 4.0  # > queue + KV weights: a held prefix outweighs any load difference
    block_chars: int = 256
    max_blocks: int = 256  # prompts longer than 64 KiB are matched on their first 64 KiB
    index_capacity: int = 200_000
    fallbacks: int = 2
    max_pick_age_s: float = 630.0


def profiles(s: PickSettings) -> dict[str, Profile]:
    """The filters and scorers of each picked weighting (least-load, prefix-cache)."""
    load = ((QueueScorer(), 1.0), (KvCacheScorer(), 0.5))
    return {
        LEAST_LOAD: Profile(Healthy(s.max_failures), (KvCacheRoom(s.kv_threshold),), load),
        PREFIX_CACHE: Profile(
            Healthy(s.max_failures),
            (KvCacheRoom(s.kv_threshold), QueueRoom(s.prefix_max_waiting)),
            ((PrefixScorer(), s.prefix_weight), *load),
        ),
    }


@dataclass(frozen=True, slots=True)
class Destination:
    hosts: tuple[str, ...]  # `ip:port`, the pick first
    reason: str

    @property
    def value(self) -> str:
        return ",".join(self.hosts)


NO_PREFIX = PickRequest()
NO_ENGINE = Deny(
    503,
    "no_backend",
    "No engine can take this request right now; try again shortly.",
    type="service_unavailable",
    headers=(("retry-after", "1"),),
)


@dataclass
class Picking:
    settings: PickSettings
    metrics: GatewayMetrics
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    store: Datastore = field(init=False)
    index: PrefixIndex = field(init=False)
    _profiles: dict[str, Profile] = field(init=False)
    _series: dict[tuple[str, str, str], Counter] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.store = Datastore(self.settings.max_pick_age_s)
        self.index = PrefixIndex(self.settings.index_capacity)
        self._profiles = profiles(self.settings)

    def choose(
        self, request_id: str, identity: Identity, weighting: str, prompt: str | None
    ) -> Destination | Deny | None:
        """The engines for this request; None: fail open (Envoy balances); Deny: fail closed."""
        started = time.perf_counter()
        s = self.settings
        prefix = weighting == PREFIX_CACHE
        blocks: tuple[int, ...] = ()
        request = NO_PREFIX
        if prefix and prompt:
            blocks = block_hashes(
                prompt, f"{identity.namespace}/{identity.model}", s.block_chars, s.max_blocks
            )
            request = PickRequest(len(blocks), self.index.matches(blocks))
        engines = self.store.engines((identity.namespace, identity.model))
        if (
            not engines
        ):  # no engine of ours to pick from (Services only, or not loaded yet): Envoy's call
            self._count(identity, "unmanaged", time.perf_counter() - started)
            return None
        ranked = pick(
            engines,
            self._profiles[PREFIX_CACHE if prefix else LEAST_LOAD],
            request,
            self.rng,
            s.fallbacks,
        )
        result: Destination | Deny | None
        if not ranked.hosts:
            reason = "refused" if s.fail_closed else "fallback"
            result = NO_ENGINE if s.fail_closed else None
        else:
            primary = ranked.hosts[0]
            if prefix:
                reason = "prefix_hit" if request.matches.get(primary, 0) > 0 else "prefix_miss"
                if blocks:
                    self.index.record(blocks, primary)
            else:
                reason = "least_load"
            self.store.picked(request_id, primary, self.clock())
            result = Destination(ranked.hosts, reason)
        self._count(identity, reason, time.perf_counter() - started)
        return result

    def finished(self, request_id: str) -> None:
        self.store.finished(request_id)

    def _count(self, identity: Identity, reason: str, elapsed_s: float) -> None:
        key = (identity.namespace, identity.model, reason)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self.metrics.picks.labels(*key)
        series.inc()
        self.metrics.pick_seconds.observe(elapsed_s)
