"""envoyproxy/ratelimit's local over-limit cache (its LOCAL_CACHE_SIZE_IN_BYTES): a fixed-window
counter found over its limit is remembered in this process until its window ends, and a hit on
it meanwhile is answered over the limit without asking the store and without charging it.

Traffic that keeps hammering a spent limit then costs no round trip to Redis. As upstream, only
fixed windows are cached (a GCRA cell frees up continuously), and a refused request's other hits
still go to the store. Not with all-or-nothing (admission, STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT):
there a refusal must also say what the other hits would have used, which only the store knows.
"""

from __future__ import annotations

from collections.abc import Sequence

from arks.limits.backends import CounterBackend
from arks.limits.model import Algorithm, Hit, Outcome
from arks.limits.window import counter_key, fixed_window_start


class LocalOverLimitCache:
    """`store`, with the counters known over their limit answered here; at most `max_entries`
    remembered (the oldest forgotten first)."""

    def __init__(self, store: CounterBackend, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("a local cache holds at least one entry")
        self.store = store
        self.max_entries = max_entries
        self._until: dict[str, float] = {}  # counter key -> its window's end (epoch seconds)

    async def apply(
        self, hits: Sequence[Hit], now: float, *, all_or_nothing: bool = False
    ) -> list[Outcome]:
        if all_or_nothing:
            return await self.store.apply(hits, now, all_or_nothing=True)
        keys = [counter_key(hit, now) if _cached_kind(hit) else None for hit in hits]
        known = [key is not None and self._over(key, now) for key in keys]
        asked = [hit for hit, over in zip(hits, known, strict=True) if not over]
        answers = iter(await self.store.apply(asked, now) if asked else [])
        outcomes = []
        for hit, key, over in zip(hits, keys, known, strict=True):
            if over:
                assert key is not None
                until = self._until[key] - now
                outcomes.append(Outcome(True, 0, until, hit.limit + hit.hits, cached=True))
                continue
            outcome = next(answers)
            if key is not None and outcome.over_limit:
                self._remember(key, fixed_window_start(now, hit.window_s) + hit.window_s)
            outcomes.append(outcome)
        return outcomes

    async def refund(self, hits: Sequence[Hit], now: float) -> None:
        await self.store.refund(hits, now)

    async def ping(self) -> None:
        await self.store.ping()

    async def close(self) -> None:
        await self.store.close()

    def _over(self, key: str, now: float) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until <= now:
            del self._until[key]
            return False
        return True

    def _remember(self, key: str, until: float) -> None:
        if key not in self._until and len(self._until) >= self.max_entries:
            self._until.pop(next(iter(self._until)))  # the oldest entry
        self._until[key] = until


def _cached_kind(hit: Hit) -> bool:
    return hit.algorithm is Algorithm.FIXED_WINDOW and hit.hits > 0


# envoyproxy/ratelimit sizes its cache (freecache) in bytes; an entry here is a key of ~100
# bytes and a float in a dict: about 256 bytes all told.
BYTES_PER_ENTRY = 256


def entries_for(size_in_bytes: int) -> int:
    """How many counters a LOCAL_CACHE_SIZE_IN_BYTES holds (0: no cache)."""
    return max(0, size_in_bytes) // BYTES_PER_ENTRY
