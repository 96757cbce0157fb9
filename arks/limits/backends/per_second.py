"""envoyproxy/ratelimit's per-second Redis (its REDIS_PERSECOND): the counters of limits per
second in a store of their own, every other counter in the main one.

Per-second limits are the hottest counters (a new key every second for every descriptor value)
and the least valuable to keep; upstream lets them live in a separate Redis so they neither crowd
out nor slow down the longer windows. A request's hits are split by their window, both stores
asked at once, the outcomes put back in the request's order.

All or nothing (admission, STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT) spans the two stores the way
it spans a Redis Cluster's slots: each store decides its own hits atomically, and when one
refuses while the other charged, the other gives its hits back (`refund`). So nothing stays
charged in the end, though a request racing the refund may see the counts a moment higher.
Upstream is weaker here: it reads both stores, decides, then increments.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from arks.limits.backends import CounterBackend
from arks.limits.model import Hit, Outcome, Unit


class PerSecondSplit:
    """`per_second` keeps the counters of one-second windows, `other` the rest."""

    def __init__(self, per_second: CounterBackend, other: CounterBackend) -> None:
        self.per_second = per_second
        self.other = other

    async def apply(
        self, hits: Sequence[Hit], now: float, *, all_or_nothing: bool = False
    ) -> list[Outcome]:
        fast, rest = _split(hits)
        if not fast or not rest:  # one store: its own answer, atomic as it is
            store = self.per_second if fast else self.other
            return await store.apply(hits, now, all_or_nothing=all_or_nothing)
        fast_hits = [hits[i] for i in fast]
        rest_hits = [hits[i] for i in rest]
        # Both settle before any error is raised: a store still running would charge behind
        # the caller's back.
        fast_answer, rest_answer = await asyncio.gather(
            self.per_second.apply(fast_hits, now, all_or_nothing=all_or_nothing),
            self.other.apply(rest_hits, now, all_or_nothing=all_or_nothing),
            return_exceptions=True,
        )
        # A store that charged gives its hits back when the other refused (all or nothing) or
        # failed (in any mode, as one store that failed would have charged nothing).
        fast_void = _void(fast_answer, all_or_nothing)
        rest_void = _void(rest_answer, all_or_nothing)
        if rest_void and not fast_void:
            await self.per_second.refund(fast_hits, now)
        if fast_void and not rest_void:
            await self.other.refund(rest_hits, now)
        if isinstance(fast_answer, BaseException):
            raise fast_answer
        if isinstance(rest_answer, BaseException):
            raise rest_answer
        by_index = dict(zip(fast, fast_answer, strict=True))
        by_index.update(zip(rest, rest_answer, strict=True))
        return [by_index[i] for i in range(len(hits))]

    async def refund(self, hits: Sequence[Hit], now: float) -> None:
        fast, rest = _split(hits)
        await asyncio.gather(
            self.per_second.refund([hits[i] for i in fast], now),
            self.other.refund([hits[i] for i in rest], now),
        )

    async def ping(self) -> None:
        await asyncio.gather(self.per_second.ping(), self.other.ping())

    async def close(self) -> None:
        await asyncio.gather(self.per_second.close(), self.other.close())


def _void(answer: list[Outcome] | BaseException, all_or_nothing: bool) -> bool:
    """Whether a store charged nothing: it failed, or refused all or nothing."""
    if isinstance(answer, BaseException):
        return True
    return all_or_nothing and any(outcome.over_limit for outcome in answer)


def _split(hits: Sequence[Hit]) -> tuple[list[int], list[int]]:
    """The indexes of the hits of one-second windows, and of the others."""
    fast: list[int] = []
    rest: list[int] = []
    for i, hit in enumerate(hits):
        (fast if hit.window_s == Unit.SECOND.seconds else rest).append(i)
    return fast, rest
