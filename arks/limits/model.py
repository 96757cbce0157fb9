"""The rate-limit service's own vocabulary, shared by config, limiter, backends and servicer.

No protobuf, no Redis here: plain frozen dataclasses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Unit(enum.Enum):
    SECOND = 1
    MINUTE = 60
    HOUR = 3600
    DAY = 86400
    WEEK = 7 * 86400
    MONTH = 30 * 86400  # envoyproxy/ratelimit's month and year are fixed lengths too
    YEAR = 365 * 86400

    @property
    def seconds(self) -> int:
        return self.value

    @classmethod
    def parse(cls, text: str) -> Unit:
        """`second`, `MINUTE`, … as envoyproxy/ratelimit's YAML and Envoy's proto spell them."""
        return cls[text.strip().upper()]


class Algorithm(enum.Enum):
    FIXED_WINDOW = "fixed_window"  # envoyproxy/ratelimit's: one counter per aligned window
    GCRA = "gcra"  # generic cell rate: no burst at a window's edge, exact under any cost


@dataclass(frozen=True)
class RateLimit:
    """A limit as configured (or as Envoy overrides it for one descriptor)."""

    requests_per_unit: int
    unit: Unit
    name: str = ""
    unlimited: bool = False
    algorithm: Algorithm = Algorithm.FIXED_WINDOW
    replaces: tuple[str, ...] = ()  # names of limits this one replaces when both apply
    shadow_mode: bool = False  # over-limit is counted and reported in metrics, never enforced
    detailed_metric: bool = False  # stats keyed by the full descriptor values
    stats_key: str = ""  # "domain.key_value.key" path used in metrics
    # Per request entry, the wildcard value its counter is keyed by instead of the entry's own
    # value (a `share_threshold` wildcard matched it), or None; () when none did.
    shared_values: tuple[str | None, ...] = ()
    metadata: str = ""  # the descriptor's `metadata`, as JSON ("" when none)
    quota_mode: bool = False  # over its count, it refuses only with every quota-mode one over


@dataclass(frozen=True)
class Hit:
    """One counter to charge for one descriptor of one request."""

    key: str  # the backend key, without the window suffix
    limit: int  # requests (or cost units) per window
    window_s: int
    hits: int  # 0 = look without counting
    algorithm: Algorithm


@dataclass(frozen=True)
class Outcome:
    """What the backend says about one Hit, after charging it."""

    over_limit: bool
    remaining: int  # never negative
    reset_s: float  # seconds until the counter has room again (fixed window: until the window ends)
    used: int  # the count (or equivalent cost) in the window after this hit
    cached: bool = False  # answered over the limit by the local over-limit cache, not the store


class BackendUnavailable(Exception):
    """The store could not be reached or did not answer in time; the cause is chained.

    The service decides what that means (fail open or closed); backends never guess.
    """
