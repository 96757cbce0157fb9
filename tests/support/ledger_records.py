"""A fixed, varied set of usage records for the report tests (`arks usage`, the Billing
dashboard), and the totals they must add up to, computed here in plain Python from the records
themselves, independently of any store's SQL."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from arks.adapters.ledger import open_ledger
from arks.ledger import UsageRecord

START = datetime(2026, 3, 1, tzinfo=UTC)  # a Sunday: ISO weeks split the range
DAYS = 10
TENANTS = (("team-a", "alice"), ("team-a", "bob"), ("team-b", "carol"), ("team-b", "dave"))
MODELS = ("model-a", "model-b")


def records(count: int = 240) -> list[UsageRecord]:
    """`count` records over DAYS days from START: every tenant and model, some unpriced
    (cost None), some estimated, costs with more than six decimals."""
    out = []
    for i in range(count):
        namespace, user = TENANTS[i % len(TENANTS)]
        estimated = i % 7 == 0
        out.append(
            UsageRecord(
                request_id=f"req-{i:05d}",
                time=START + timedelta(minutes=i * DAYS * 24 * 60 / count + 3),
                namespace=namespace,
                user=user,
                model=MODELS[(i // 3) % len(MODELS)],
                engine="127.0.0.1:8001",
                path="/v1/chat/completions",
                status=200,
                prompt_tokens=10 + i % 37,
                completion_tokens=(5 + i % 23) * 3,
                cost=None if i % 11 == 0 else round((10 + i % 37) * 1.25e-6 + i * 3.3e-7, 10),
                source="estimated" if estimated else "reported",
                estimate_reason="no_usage_in_response" if estimated else None,
                duration_s=0.5,
                ttft_s=None,
            )
        )
    return out


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    estimated_requests: int = 0
    estimated_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def plus(self, r: UsageRecord) -> Totals:
        estimated = r.source == "estimated"
        return Totals(
            self.requests + 1,
            self.prompt_tokens + r.prompt_tokens,
            self.completion_tokens + r.completion_tokens,
            self.cost + (r.cost or 0.0),
            self.estimated_requests + estimated,
            self.estimated_tokens + (r.total_tokens if estimated else 0),
        )


def totals_by(
    items: Iterable[UsageRecord], key: Callable[[UsageRecord], Hashable]
) -> dict[Hashable, Totals]:
    out: dict[Hashable, Totals] = defaultdict(Totals)
    for r in items:
        out[key(r)] = out[key(r)].plus(r)
    return dict(out)


def total(items: Iterable[UsageRecord]) -> Totals:
    return totals_by(items, lambda r: ()).get((), Totals())


def store(url: str, items: list[UsageRecord]) -> None:
    """Migrate the ledger at `url` and write `items` into it, through the real store."""

    async def go() -> None:
        ledger = open_ledger(url)
        try:
            await ledger.migrate()
            assert await ledger.write(items) == len(items)
        finally:
            await ledger.close()

    asyncio.run(go())
