"""Counter stores behind the rate-limit service: one `apply` per request, all its hits at once.

`MemoryBackend` (one process, the local default) and `RedisBackend` (shared, atomic) answer the
same `Hit`s with the same `Outcome`s: both run the arithmetic of `arks.limits.window`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from arks.limits.model import BackendUnavailable, Hit, Outcome


class CounterBackend(Protocol):
    async def apply(
        self, hits: Sequence[Hit], now: float, *, all_or_nothing: bool = False
    ) -> list[Outcome]:
        """Charge every hit at `now` (epoch seconds); one Outcome per Hit, in order.

        By default over-limit hits are charged too (envoyproxy/ratelimit's rule). With
        `all_or_nothing`, atomically: if any outcome would be over its limit, nothing is charged
        and the outcomes say what charging would have given (admission: a refused request must
        not use up the allowance)."""
        ...

    async def refund(self, hits: Sequence[Hit], now: float) -> None:
        """Give back what `apply(hits, now)` charged: a fixed window's count goes down by the
        hits, a GCRA TAT back by their emission intervals. For all or nothing across stores (a
        store that charged, when another refused); a request racing it may see the counts a
        moment higher."""
        ...

    async def ping(self) -> None:
        """Return once the store answers; BackendUnavailable when it does not (health)."""
        ...

    async def close(self) -> None: ...


from arks.limits.backends.memory import MemoryBackend  # noqa: E402

__all__ = ["BackendUnavailable", "CounterBackend", "MemoryBackend"]
