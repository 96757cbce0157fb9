"""Counters in dicts: for a single process (the local default) and as the tests' real fake."""

from __future__ import annotations

from collections.abc import Sequence

from arks.limits.model import Algorithm, Hit, Outcome
from arks.limits.window import (
    Instant,
    counter_key,
    emission_interval,
    fixed_window_outcome,
    gcra_ahead,
    gcra_charge,
    gcra_outcome,
    gcra_step,
    gcra_stores,
    validate,
)

# Expired entries are dropped lazily on read, and all at once after this many writes (or as many
# writes as there were live entries, whichever is more), so a sweep costs O(1) per write.
MIN_WRITES_PER_SWEEP = 1024


class MemoryBackend:
    """Not shared between processes; atomic per `apply` because `apply` never awaits."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, float]] = {}  # key -> (count, expires_at)
        self._tats: dict[str, tuple[Instant, float]] = {}  # key -> (tat, expires_at)
        self._writes = 0
        self._writes_per_sweep = MIN_WRITES_PER_SWEEP

    async def apply(
        self, hits: Sequence[Hit], now: float, *, all_or_nothing: bool = False
    ) -> list[Outcome]:
        for hit in hits:
            validate(hit)
        if all_or_nothing:
            prospective = self._prospective(hits, now)
            if any(outcome.over_limit for outcome in prospective):
                return prospective
        outcomes = [self._apply_one(hit, now) for hit in hits]
        if self._writes >= self._writes_per_sweep:
            self._sweep(now)
        return outcomes

    async def refund(self, hits: Sequence[Hit], now: float) -> None:
        at = Instant.of(now)
        for hit in hits:
            if hit.hits == 0:
                continue
            key = counter_key(hit, now)
            if hit.algorithm is Algorithm.GCRA:
                tat = self._live_tat(key, now)
                if tat is None or not gcra_stores(hit):
                    continue
                ahead = gcra_ahead(tat[0], at) - hit.hits * emission_interval(
                    hit.limit, hit.window_s
                )
                if ahead <= 0:
                    del self._tats[key]
                else:
                    self._tats[key] = (at.plus(ahead), tat[1])
                continue
            count = self._live_count(key, now)
            if count is None:
                continue
            if count[0] <= hit.hits:  # back to nothing, as if never charged
                del self._counts[key]
            else:
                self._counts[key] = (count[0] - hit.hits, count[1])

    async def ping(self) -> None:
        return  # in this process: always there

    async def close(self) -> None:
        self._counts.clear()
        self._tats.clear()

    def __len__(self) -> int:
        """Entries held, expired ones included until the next sweep."""
        return len(self._counts) + len(self._tats)

    def _prospective(self, hits: Sequence[Hit], now: float) -> list[Outcome]:
        """The outcomes charging `hits` would give, nothing written (a key hit twice adds up)."""
        at = Instant.of(now)
        counts: dict[str, int] = {}
        aheads: dict[str, float] = {}
        outcomes = []
        for hit in hits:
            key = counter_key(hit, now)
            if hit.algorithm is Algorithm.GCRA:
                if key not in aheads:
                    tat = self._live_tat(key, now)
                    aheads[key] = gcra_ahead(tat[0] if tat else None, at)
                aheads[key] = gcra_charge(aheads[key], hit)
                outcomes.append(gcra_outcome(aheads[key], hit))
            else:
                if key not in counts:
                    count = self._live_count(key, now)
                    counts[key] = count[0] if count else 0
                counts[key] += hit.hits
                outcomes.append(fixed_window_outcome(counts[key], hit, now))
        return outcomes

    def _live_tat(self, key: str, now: float) -> tuple[Instant, float] | None:
        entry = self._tats.get(key)
        return entry if entry is not None and entry[1] > now else None

    def _live_count(self, key: str, now: float) -> tuple[int, float] | None:
        entry = self._counts.get(key)
        return entry if entry is not None and entry[1] > now else None

    def _apply_one(self, hit: Hit, now: float) -> Outcome:
        key = counter_key(hit, now)
        if hit.algorithm is Algorithm.GCRA:
            tat_entry = self._live_tat(key, now)
            step = gcra_step(tat_entry[0] if tat_entry else None, now, hit)
            if step.tat is not None:
                self._tats[key] = (step.tat, now + step.ttl_s)
                self._writes += 1
            return step.outcome

        count_entry = self._live_count(key, now)
        used = count_entry[0] if count_entry else 0
        if hit.hits > 0:
            used += hit.hits
            # Like Redis EXPIRE on creation: the window's length from the first hit.
            expires_at = count_entry[1] if count_entry else now + hit.window_s
            self._counts[key] = (used, expires_at)
            self._writes += 1
        return fixed_window_outcome(used, hit, now)

    def _sweep(self, now: float) -> None:
        self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
        self._tats = {k: v for k, v in self._tats.items() if v[1] > now}
        self._writes = 0
        self._writes_per_sweep = max(MIN_WRITES_PER_SWEEP, len(self))
