"""Filters: which engines may take the request. Each keeps a subset of the candidates.

`Healthy` is strict (an engine that is not answering its scrapes never gets a request, even if
none is left: the caller then fails open or closed). The room filters are soft: they drop the
engines without room only while some engine has it, so a busy fleet is still served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from extproc.picking.state import EngineView


class Filter(Protocol):
    def __call__(self, engines: Sequence[EngineView]) -> Sequence[EngineView]: ...


@dataclass(frozen=True, slots=True)
class Healthy:
    """Scraped at least once, and not failing its last `max_failures` scrapes in a row."""

    max_failures: int = 2

    def __call__(self, engines: Sequence[EngineView]) -> Sequence[EngineView]:
        return [e for e in engines if e.scraped and e.failures < self.max_failures]


@dataclass(frozen=True, slots=True)
class KvCacheRoom:
    """KV cache at most `threshold` full, if any engine is (a full cache means preemption)."""

    threshold: float = 0.9

    def __call__(self, engines: Sequence[EngineView]) -> Sequence[EngineView]:
        roomy = [e for e in engines if e.kv_cache_usage <= self.threshold]
        return roomy or engines


@dataclass(frozen=True, slots=True)
class QueueRoom:
    """Fewer than `max_waiting` requests in the engine's scraped queue, if any engine has that.

    What "while it has room" means for prefix affinity: an engine holding the prompt's prefix
    keeps its conversations until its queue reaches this, then they move. Our own picks since
    the scrape are not added: most of them run at once (and the access log reports their end
    only ~0.1 s later), so counting them would move a conversation on its own quick turns."""

    max_waiting: float = 8.0

    def __call__(self, engines: Sequence[EngineView]) -> Sequence[EngineView]:
        roomy = [e for e in engines if e.waiting < self.max_waiting]
        return roomy or engines
