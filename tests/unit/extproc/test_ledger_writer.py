"""The ledger writer's batching, backoff, spill and replay, over a real SQLite store in a
temporary directory. An outage is the real store behind a switch that refuses writes the way a
store says its database is away (`LedgerUnavailable`); the PostgreSQL outage through a cut TCP
connection is in tests/integration/test_ledger.py."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from arks.adapters.ledger import open_ledger
from arks.ledger import LedgerStore, LedgerUnavailable, ReportQuery, ReportRow, UsageRecord
from extproc.ledger import (
    REPLAYING_SUFFIX,
    LedgerWriter,
    WriterSettings,
    backoff_delays,
    parse_line,
    read_spilled,
    record_line,
)
from extproc.metrics import LedgerMetrics

T0 = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
FAST = WriterSettings(batch_wait_s=0.001, backoff_s=0.001, backoff_max_s=0.01, close_timeout_s=5)


def record(n: int, **changes: object) -> UsageRecord:
    fields: dict[str, object] = {
        "request_id": f"req-{n}",
        "time": T0 + timedelta(seconds=n),
        "namespace": "team-a",
        "user": "alice",
        "model": "qwen",
        "engine": "10.0.0.7:8000",
        "path": "/v1/chat/completions",
        "status": 200,
        "prompt_tokens": 10 + n,
        "completion_tokens": 5,
        "cost": 0.25,
        "source": "reported",
        "estimate_reason": None,
        "duration_s": 0.5,
        "ttft_s": None,
    }
    fields.update(changes)
    return UsageRecord(**fields)  # type: ignore[arg-type]


class Switchable:
    """A real store that can be cut: while `down`, every call fails as an unreachable database
    does (nothing of the batch stored)."""

    def __init__(self, store: LedgerStore) -> None:
        self.store = store
        self.down = False
        self.refused = 0
        self.batches: list[int] = []

    def _check(self) -> None:
        if self.down:
            self.refused += 1
            raise LedgerUnavailable("cut")

    async def migrate(self) -> int:
        self._check()
        return await self.store.migrate()

    async def write(self, records: Sequence[UsageRecord]) -> int:
        self._check()
        self.batches.append(len(records))
        return await self.store.write(records)

    async def report(self, query: ReportQuery) -> list[ReportRow]:
        return await self.store.report(query)

    async def close(self) -> None:
        await self.store.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Switchable]:
    real = open_ledger(f"sqlite:///{tmp_path / 'usage.db'}")
    await real.migrate()
    yield Switchable(real)
    await real.close()


async def stored(store: Switchable) -> tuple[int, int]:
    """How many records the store holds, and their prompt tokens."""
    rows = await store.report(
        ReportQuery(T0 - timedelta(days=1), T0 + timedelta(days=1), (), "none")
    )
    return sum(r.requests for r in rows), sum(r.prompt_tokens for r in rows)


def counted(metrics: LedgerMetrics) -> dict[str, float]:
    return {
        result: metrics.records.labels(result)._value.get()
        for result in ("written", "duplicate", "spilled", "dropped")
    }


async def until(condition: object, attempts: int = 2000) -> None:
    """Let the writer's task run until `condition()` holds (a bound on turns, not a timing)."""
    for _ in range(attempts):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


def expected_prompt(ns: range) -> int:
    return sum(10 + n for n in ns)


def test_backoff_doubles_up_to_its_cap() -> None:
    assert list(itertools.islice(backoff_delays(0.1, 1.0), 6)) == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_a_spill_line_is_the_whole_record() -> None:
    estimated = record(3, source="estimated", estimate_reason="upstream_reset", cost=None)
    for original in (record(1), estimated):
        line = record_line(original)
        assert line.endswith("\n") and "\n" not in line[:-1]
        assert parse_line(line) == original


async def test_records_are_written_in_batches_of_at_most_batch_size(store: Switchable) -> None:
    registry = CollectorRegistry()
    metrics = LedgerMetrics.create(registry)
    writer = LedgerWriter(store, metrics, settings=WriterSettings(batch_size=500))
    for n in range(1200):  # all handed over before the task first runs
        writer.submit(record(n))
    writer.start()
    await writer.close()

    assert store.batches == [500, 500, 200]
    assert await stored(store) == (1200, expected_prompt(range(1200)))
    assert counted(metrics) == {"written": 1200, "duplicate": 0, "spilled": 0, "dropped": 0}
    assert registry.get_sample_value("arks_ledger_write_seconds_count") == 3  # one per batch


async def test_a_request_id_already_stored_is_counted_a_duplicate(store: Switchable) -> None:
    metrics = LedgerMetrics.create(CollectorRegistry())
    writer = LedgerWriter(store, metrics, settings=FAST)
    writer.start()
    for n in range(10):
        writer.submit(record(n))
    for n in range(5, 15):  # 5..9 again (another replica, a replay), 10..14 new
        writer.submit(record(n))
    await writer.close()

    assert await stored(store) == (15, expected_prompt(range(15)))
    assert counted(metrics) == {"written": 15, "duplicate": 5, "spilled": 0, "dropped": 0}


async def test_a_full_queue_without_a_spill_file_drops_and_counts(store: Switchable) -> None:
    metrics = LedgerMetrics.create(CollectorRegistry())
    writer = LedgerWriter(store, metrics, settings=WriterSettings(queue_size=10))
    for n in range(25):
        writer.submit(record(n))
    writer.start()
    await writer.close()

    assert await stored(store) == (10, expected_prompt(range(10)))
    assert counted(metrics) == {"written": 10, "duplicate": 0, "spilled": 0, "dropped": 15}


async def test_a_full_queue_spills_and_the_spill_is_replayed(
    store: Switchable, tmp_path: Path
) -> None:
    spill = tmp_path / "spill.jsonl"
    registry = CollectorRegistry()
    metrics = LedgerMetrics.create(registry)
    writer = LedgerWriter(store, metrics, spill, WriterSettings(queue_size=10, batch_wait_s=0.001))
    for n in range(25):
        writer.submit(record(n))
    assert len(spill.read_text().splitlines()) == 15  # on disk at once (line-buffered)
    assert registry.get_sample_value("arks_ledger_queue_depth") == 10
    writer.start()
    await until(lambda: not spill.exists())
    await writer.close()

    assert await stored(store) == (25, expected_prompt(range(25)))
    assert counted(metrics) == {"written": 25, "duplicate": 0, "spilled": 15, "dropped": 0}
    assert not spill.with_name(spill.name + REPLAYING_SUFFIX).exists()


async def test_an_outage_keeps_every_record_until_the_store_is_back(
    store: Switchable, tmp_path: Path
) -> None:
    spill = tmp_path / "spill.jsonl"
    metrics = LedgerMetrics.create(CollectorRegistry())
    writer = LedgerWriter(store, metrics, spill, replace(FAST, queue_size=20, batch_size=8))
    writer.start()
    await until(lambda: store.batches == [] and writer._migrated)
    store.down = True
    for n in range(100):  # 8 in the batch being retried, 20 queued, the rest spilled
        writer.submit(record(n))
        await asyncio.sleep(0)
    await until(lambda: store.refused >= 3)  # retried, backing off
    assert await stored(store) == (0, 0)
    store.down = False
    await until(lambda: counted(metrics)["written"] == 100)
    await writer.close()

    assert await stored(store) == (100, expected_prompt(range(100)))
    assert counted(metrics)["dropped"] == 0
    assert counted(metrics)["spilled"] > 0
    assert metrics.errors.labels("unavailable")._value.get() == store.refused


async def test_shutdown_with_the_store_away_spills_what_is_left_for_the_next_start(
    store: Switchable, tmp_path: Path
) -> None:
    spill = tmp_path / "spill.jsonl"
    first = LedgerWriter(store, LedgerMetrics.create(CollectorRegistry()), spill, FAST)
    first.start()
    await until(lambda: first._migrated)
    store.down = True
    for n in range(30):
        first.submit(record(n))
    await first.close()
    assert len(read_spilled(spill)[0]) == 30

    store.down = False
    metrics = LedgerMetrics.create(CollectorRegistry())
    second = LedgerWriter(store, metrics, spill, FAST)
    second.start()
    await until(lambda: not spill.exists())
    await second.close()
    assert await stored(store) == (30, expected_prompt(range(30)))
    assert counted(metrics)["written"] == 30


async def test_a_replay_cut_by_a_crash_is_finished_at_start_and_a_torn_line_is_counted(
    store: Switchable, tmp_path: Path
) -> None:
    spill = tmp_path / "spill.jsonl"
    replaying = spill.with_name(spill.name + REPLAYING_SUFFIX)
    replaying.write_text("".join(record_line(record(n)) for n in range(10)))
    await store.write([record(n) for n in range(4)])  # the part replayed before the crash
    spill.write_text(
        "".join(record_line(record(n)) for n in range(10, 15)) + record_line(record(15))[:40]
    )
    metrics = LedgerMetrics.create(CollectorRegistry())
    writer = LedgerWriter(store, metrics, spill, FAST)
    writer.start()
    await until(lambda: not spill.exists() and not replaying.exists())
    await writer.close()

    assert await stored(store) == (15, expected_prompt(range(15)))
    assert counted(metrics) == {"written": 11, "duplicate": 4, "spilled": 0, "dropped": 1}
