"""Window arithmetic for the rate-limit counters: pure functions, no I/O, no clock.

Two algorithms share one shape: a backend reads a stored state, applies a transition
(`fixed_window`: add the hits to a counter; `gcra_charge`: push the theoretical arrival time
forward) and turns the new state into an `Outcome` with the functions here. The Redis backend
runs the transitions inside a Lua script that mirrors `gcra_charge` and `Instant` operation for
operation, so both backends compute bit-identical outcomes.

GCRA state is how far the theoretical arrival time (TAT) is *ahead* of now, in seconds: outcomes
depend only on that offset. The absolute TAT is stored as an `Instant` (whole seconds plus a
fraction) because a plain float at today's epoch keeps only ~0.2 µs, and that error would
accumulate over a burst until the limit-th request looked over the limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from arks.limits.model import Algorithm, Hit, Outcome

# Float sums such as ten times 0.1 land a few ulps off; this much of one emission interval is
# forgiven when comparing against the limit, so exactly `limit` units always fit.
CELL_SLACK = 1e-6


def validate(hit: Hit) -> None:
    """Reject a hit no counter can answer; backends call this before any I/O."""
    if hit.window_s <= 0:
        raise ValueError(f"hit {hit.key!r}: window_s must be positive, got {hit.window_s}")
    if hit.limit < 0:
        raise ValueError(f"hit {hit.key!r}: limit must not be negative, got {hit.limit}")
    if hit.hits < 0:
        raise ValueError(f"hit {hit.key!r}: hits must not be negative, got {hit.hits}")


def counter_key(hit: Hit, now: float) -> str:
    """The backend key for a hit at `now`, without the backend's prefix."""
    if hit.algorithm is Algorithm.GCRA:
        return gcra_key(hit.key)
    return fixed_window_key(hit.key, hit.window_s, now)


# Fixed window (envoyproxy/ratelimit compatible) ------------------------------------------------


def fixed_window_start(now: float, window_s: int) -> int:
    return int(now) // window_s * window_s


def fixed_window_key(key: str, window_s: int, now: float) -> str:
    return f"{key}_{fixed_window_start(now, window_s)}"


def fixed_window_outcome(used: int, hit: Hit, now: float) -> Outcome:
    """The outcome once the window's count is `used` (this hit's `hits` already added).

    As in envoyproxy/ratelimit, the request that brings the count exactly to the limit passes.
    """
    start = fixed_window_start(now, hit.window_s)
    return Outcome(
        over_limit=used > hit.limit,
        remaining=max(0, hit.limit - used),
        reset_s=start + hit.window_s - now,
        used=used,
    )


# GCRA -------------------------------------------------------------------------------------------


def gcra_key(key: str) -> str:
    # Its own suffix, so a limit switched between algorithms never reads the other's state.
    return f"{key}_gcra"


def emission_interval(limit: int, window_s: int) -> float:
    """Seconds one unit occupies (`T`); only meaningful for `limit > 0`."""
    return window_s / limit


@dataclass(frozen=True)
class Instant:
    """A point in time as whole seconds plus a fraction in [0, 1).

    Offsets between two instants are computed from small numbers, so they keep double
    precision (~1e-16 of the offset) instead of the ~2e-7 s a float epoch time allows.
    """

    seconds: int
    fraction: float

    @classmethod
    def of(cls, t: float) -> Instant:
        whole = math.floor(t)
        return cls(whole, t - whole)  # exact: the fraction's bits are a subset of t's

    def offset_from(self, other: Instant) -> float:
        """`self - other` in seconds (Lua mirrors this operation order)."""
        return (self.seconds - other.seconds) + (self.fraction - other.fraction)

    def plus(self, offset_s: float) -> Instant:
        """`self + offset_s` for `offset_s >= 0` (Lua mirrors this operation order)."""
        at = self.fraction + offset_s
        whole = math.floor(at)
        return Instant(self.seconds + whole, at - whole)


def gcra_ahead(tat: Instant | None, now: Instant) -> float:
    """How far the stored TAT is ahead of now; a missing or past TAT is now itself."""
    if tat is None:
        return 0.0
    return max(0.0, tat.offset_from(now))


def gcra_charge(ahead_s: float, hit: Hit) -> float:
    """The TAT's offset from now after charging `hit.hits`; over-limit hits are charged too.

    Costs such as tokens are known only after the fact and must never be lost: over-use becomes
    debt that blocks later requests until it is repaid.
    """
    if hit.hits == 0 or hit.limit == 0:
        return ahead_s
    return ahead_s + hit.hits * emission_interval(hit.limit, hit.window_s)


def gcra_stores(hit: Hit) -> bool:
    """Whether charging `hit` writes state (a read or a zero limit leaves it alone)."""
    return hit.hits > 0 and hit.limit > 0


def gcra_ttl_s(ahead_s: float) -> int:
    """How long the stored TAT matters: once it is in the past, a missing key means the same."""
    return math.ceil(ahead_s) + 1


def gcra_outcome(ahead_s: float, hit: Hit) -> Outcome:
    """The outcome once the TAT is `ahead_s` past now (this hit's cost already charged).

    The tolerance is one full window: `limit` units may arrive at once, then one more every
    `window_s / limit` seconds. With `hits == 0` it answers "would one more unit fit?".
    """
    window = float(hit.window_s)
    if hit.limit == 0:
        return Outcome(over_limit=True, remaining=0, reset_s=window, used=0)
    interval = emission_interval(hit.limit, hit.window_s)
    slack = interval * CELL_SLACK
    if hit.hits == 0:
        over_limit = ahead_s + interval > window + slack
    else:
        over_limit = ahead_s > window + slack
    remaining = max(0, math.floor((window - ahead_s) / interval + CELL_SLACK))
    # Within the limit: until the TAT is back at now. Over it: until one unit fits again.
    reset_s = ahead_s - window + interval if over_limit else max(0.0, ahead_s)
    return Outcome(
        over_limit=over_limit,
        remaining=remaining,
        reset_s=reset_s,
        used=hit.limit - remaining,
    )


def uncharged(outcome: Outcome, hit: Hit) -> Outcome:
    """The outcome of a hit within its limit as if it had not been charged: what is left now
    (an all-or-nothing call refused by another hit charged it nothing)."""
    if hit.hits == 0:
        return outcome
    if hit.algorithm is Algorithm.GCRA:
        if hit.limit == 0:
            return outcome
        remaining = min(hit.limit, outcome.remaining + hit.hits)
        back_s = hit.hits * emission_interval(hit.limit, hit.window_s)
        return Outcome(False, remaining, max(0.0, outcome.reset_s - back_s), hit.limit - remaining)
    used = max(0, outcome.used - hit.hits)
    return Outcome(False, max(0, hit.limit - used), outcome.reset_s, used)


@dataclass(frozen=True)
class GcraStep:
    """One GCRA transition: the outcome and what to store (None: leave the state alone)."""

    outcome: Outcome
    tat: Instant | None
    ttl_s: int


def gcra_step(tat: Instant | None, now: float, hit: Hit) -> GcraStep:
    """Charge `hit` against a stored TAT at `now`: the whole GCRA rule in one call."""
    at = Instant.of(now)
    ahead = gcra_charge(gcra_ahead(tat, at), hit)
    stored = at.plus(ahead) if gcra_stores(hit) else None
    return GcraStep(gcra_outcome(ahead, hit), stored, gcra_ttl_s(ahead))
