"""Where charged usage goes. The memory ledger is the local default; Redis comes with quotas."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

from extproc.usage import Usage


class Ledger(Protocol):
    def charge(self, usage: Usage) -> None: ...


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_requests: int = 0


class MemoryLedger:
    """Totals per (namespace, user, model), for one process."""

    def __init__(self) -> None:
        self.totals: defaultdict[tuple[str, str, str], Totals] = defaultdict(Totals)

    def charge(self, usage: Usage) -> None:
        totals = self.totals[(usage.namespace, usage.user, usage.model)]
        totals.requests += 1
        totals.prompt_tokens += usage.prompt_tokens
        totals.completion_tokens += usage.completion_tokens
        if usage.estimated is not None:
            totals.estimated_requests += 1
