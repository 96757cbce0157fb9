"""Scorers: how much each candidate engine suits the request, each score in [0, 1].

Scorers read typed fields (`EngineView`, the prefix matches); none parses metrics text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from extproc.picking.state import EngineView


@dataclass(frozen=True, slots=True)
class PickRequest:
    """What the scorers know of the request: how many prompt blocks each engine holds."""

    blocks: int = 0  # prompt blocks hashed (prefix-cache only)
    matches: Mapping[str, int] = field(default_factory=dict)  # engine -> leading blocks it holds


class Scorer(Protocol):
    def __call__(self, engines: Sequence[EngineView], request: PickRequest) -> list[float]: ...


@dataclass(frozen=True, slots=True)
class QueueScorer:
    """Shorter queue, higher score: 1 for the shortest, 0 for the longest (min-max), all 1 when equal."""

    def __call__(self, engines: Sequence[EngineView], request: PickRequest) -> list[float]:
        queues = [e.waiting + e.unseen for e in engines]
        if not queues:
            return []
        low, high = min(queues), max(queues)
        if high == low:
            return [1.0] * len(queues)
        return [(high - q) / (high - low) for q in queues]


@dataclass(frozen=True, slots=True)
class KvCacheScorer:
    """Free KV cache: 1 - usage."""

    def __call__(self, engines: Sequence[EngineView], request: PickRequest) -> list[float]:
        return [1.0 - e.kv_cache_usage for e in engines]


@dataclass(frozen=True, slots=True)
class PrefixScorer:
    """The share of the prompt's blocks the engine is known to hold (its longest cached prefix)."""

    def __call__(self, engines: Sequence[EngineView], request: PickRequest) -> list[float]:
        if request.blocks <= 0:
            return [0.0] * len(engines)
        return [min(1.0, request.matches.get(e.address, 0) / request.blocks) for e in engines]
