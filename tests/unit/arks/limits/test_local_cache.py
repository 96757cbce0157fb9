"""The local over-limit cache (envoyproxy/ratelimit's LOCAL_CACHE_SIZE_IN_BYTES) over the memory
store: a counter known over its limit is answered here until its window ends, uncharged."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from arks.limits.backends import MemoryBackend
from arks.limits.backends.local_cache import LocalOverLimitCache, entries_for
from arks.limits.model import Algorithm, Hit, Outcome

T0 = 1_700_000_040.0  # a minute's start


class Counting(MemoryBackend):
    """The memory store, counting the hits it was asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    async def apply(
        self, hits: Sequence[Hit], now: float, *, all_or_nothing: bool = False
    ) -> list[Outcome]:
        self.asked += [hit.key for hit in hits]
        return await super().apply(hits, now, all_or_nothing=all_or_nothing)


def hit(key: str = "k", limit: int = 2, algorithm: Algorithm = Algorithm.FIXED_WINDOW) -> Hit:
    return Hit(key, limit, 60, 1, algorithm)


async def test_a_spent_counter_is_answered_here_until_its_window_ends() -> None:
    store = Counting()
    cached = LocalOverLimitCache(store, 10)
    answers = [(await cached.apply([hit()], T0 + i))[0] for i in range(5)]
    assert [a.over_limit for a in answers] == [False, False, True, True, True]
    assert store.asked == ["k"] * 3, "the two after the first refusal never reached the store"
    assert answers[-1].reset_s == pytest.approx(56.0) and answers[-1].remaining == 0
    (fresh,) = await cached.apply([hit()], T0 + 60)  # the next window: asked again
    assert not fresh.over_limit and store.asked == ["k"] * 4
    (read,) = await store.apply([Hit("k", 2, 60, 0, Algorithm.FIXED_WINDOW)], T0 + 59)
    assert read.used == 3, "the cached refusals charged nothing"


async def test_the_other_hits_of_a_request_still_go_to_the_store() -> None:
    store = Counting()
    cached = LocalOverLimitCache(store, 10)
    for _ in range(3):
        await cached.apply([hit("spent", 1), hit("other", 100)], T0)
    store.asked.clear()
    spent, other = await cached.apply([hit("spent", 1), hit("other", 100)], T0)
    assert spent.over_limit and not other.over_limit and other.used == 4
    assert store.asked == ["other"]


async def test_gcra_reads_and_all_or_nothing_are_never_cached() -> None:
    store = Counting()
    cached = LocalOverLimitCache(store, 10)
    for _ in range(4):
        await cached.apply([hit("cell", 1, Algorithm.GCRA)], T0)
    assert store.asked.count("cell") == 4
    for _ in range(3):
        await cached.apply([hit("strict", 1)], T0, all_or_nothing=True)
    assert store.asked.count("strict") == 3


async def test_at_most_max_entries_are_remembered_the_oldest_forgotten() -> None:
    store = Counting()
    cached = LocalOverLimitCache(store, 2)
    for key in ("a", "b", "c"):
        for _ in range(2):
            await cached.apply([hit(key, 1)], T0)
    store.asked.clear()
    for key in ("c", "b", "a"):
        await cached.apply([hit(key, 1)], T0)
    assert store.asked == ["a"], "a was forgotten for c; b and c are answered here"


def test_upstreams_size_in_bytes_as_entries() -> None:
    assert entries_for(0) == 0 and entries_for(-5) == 0
    assert entries_for(1024 * 1024) == 4096
    with pytest.raises(ValueError):
        LocalOverLimitCache(MemoryBackend(), 0)
