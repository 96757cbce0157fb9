"""The gateway's ledger writer: usage records handed to a `LedgerStore` off the request path.

Settlement builds one `UsageRecord` per finished request and calls `submit`, which only appends
to a bounded in-memory queue (O(1): no I/O, no await). One background task takes batches from
the queue — up to `batch_size` records, or whatever arrived within `batch_wait_s` of the first —
and hands each to `store.write` in one transaction. The store skips request ids it holds, so a
batch written twice (a retry after an error whose commit did happen, a replayed spill file, two
gateway replicas settling one request) is recorded once.

While the database is away (`LedgerUnavailable`) the task retries the same batch with
exponential backoff (`backoff_s` doubling up to `backoff_max_s`), keeping it; new records wait in
the queue. When the queue is full, `submit` appends the record to the spill file instead (JSON
lines, one record a line, through a line-buffered file: one `write` into the page cache per
record, no fsync on the request path). Fsync policy: the background task fsyncs the spill file at
most once per `SPILL_SYNC_S` while it holds unsynced lines, and at shutdown; so a spilled record
survives a gateway crash at once (it is in the kernel) and a machine crash once synced (within
`SPILL_SYNC_S`). Once a write succeeds again, the spill file is
replayed into the store: it is first renamed (`<spill>.replaying`, atomically; new spills go to a
fresh file), then read and written in batches, then removed. A crash mid-replay leaves the
renamed file, replayed again at the next start (idempotent: nothing counted twice in the
database). Without a spill file, a record that finds the queue full is dropped.

Every record is counted once by what became of it: `written` (new in the store), `duplicate`
(its request id was stored already), `spilled` (to the file; counted again as written or
duplicate when replayed) or `dropped` (not kept: no room and no spill file, the spill file failed,
the store refused it for good, or shutdown with the store away and no spill file).

At shutdown (`close`) the queue is flushed to the store within a deadline; what the store does
not take by then goes to the spill file (else it is dropped, and counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol

from arks.ledger import LedgerStore, LedgerUnavailable, UsageRecord
from extproc.metrics import LedgerMetrics

log = logging.getLogger(__name__)

SPILL_SYNC_S = 1.0  # the longest a spilled line waits for its fsync
REPLAYING_SUFFIX = ".replaying"
_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord))


class RecordSink(Protocol):
    """What settlement hands records to (the writer; tests may collect them)."""

    def submit(self, record: UsageRecord) -> None: ...


@dataclass(frozen=True)
class WriterSettings:
    queue_size: int = 10_000  # records waiting in memory before they spill
    batch_size: int = 500  # records per store write
    batch_wait_s: float = 0.2  # how long a batch waits to fill once it has a record
    backoff_s: float = 0.1  # the first retry's delay after `LedgerUnavailable`
    backoff_max_s: float = 5.0  # the longest delay between retries
    close_timeout_s: float = 5.0  # at shutdown: how long the store gets to take the queue


def backoff_delays(first_s: float, cap_s: float) -> Iterator[float]:
    """Exponential backoff: first, 2 first, 4 first, ... capped at `cap_s` (pure)."""
    delay = first_s
    while True:
        yield min(delay, cap_s)
        delay = min(delay * 2, cap_s)


# --------------------------------------------------------------------------- spill encoding


def record_line(record: UsageRecord) -> str:
    """A record as one JSON line (the spill file's format): every field, the time in ISO 8601."""
    fields = {name: getattr(record, name) for name in _FIELDS}
    fields["time"] = record.time.isoformat()
    return json.dumps(fields, separators=(",", ":")) + "\n"


def parse_line(line: str) -> UsageRecord:
    """The record of one spill line; ValueError (or KeyError, TypeError) when it is not one."""
    fields: dict[str, Any] = json.loads(line)
    fields["time"] = datetime.fromisoformat(fields["time"])
    return UsageRecord(**fields)


def read_spilled(path: Path) -> tuple[list[UsageRecord], int]:
    """The records of a spill file and how many lines were not records (a torn last line after a
    crash mid-write)."""
    records: list[UsageRecord] = []
    bad = 0
    with path.open(encoding="utf-8") as spilled:
        for line in spilled:
            if not line.strip():
                continue
            try:
                records.append(parse_line(line))
            except (ValueError, KeyError, TypeError):
                bad += 1
    return records, bad


# --------------------------------------------------------------------------- the writer


class LedgerWriter:
    """Records in, batches out; see the module's docstring for the guarantees."""

    def __init__(
        self,
        store: LedgerStore,
        metrics: LedgerMetrics,
        spill: Path | None = None,
        settings: WriterSettings = WriterSettings(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.spill_path = spill
        self.settings = settings
        self.clock = clock
        self._queue: deque[UsageRecord] = deque()
        self._batch: list[UsageRecord] = []  # taken from the queue, not stored yet
        self._wake = asyncio.Event()  # a record arrived, a batch is full, or closing
        self._closed = asyncio.Event()  # cuts a backoff short
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._spill_file: IO[str] | None = None
        self._unsynced = False
        self._last_sync = 0.0
        self._migrated = False
        metrics.queue_depth.set_function(lambda: len(self._queue) + len(self._batch))

    # -------------------------------------------------------------- the request path

    def submit(self, record: UsageRecord) -> None:
        """Hand a record over: O(1), never blocks, never raises."""
        if self._closing:
            self._spill_or_drop(record)
            return
        if len(self._queue) >= self.settings.queue_size:
            self._spill_or_drop(record)
            return
        self._queue.append(record)
        if len(self._queue) == 1 or len(self._queue) >= self.settings.batch_size:
            self._wake.set()

    def _spill_or_drop(self, record: UsageRecord) -> None:
        if self.spill_path is None:
            self.metrics.records.labels("dropped").inc()
            return
        try:
            if self._spill_file is None:
                self._spill_file = self.spill_path.open("a", encoding="utf-8", buffering=1)
            self._spill_file.write(record_line(record))
        except OSError as err:
            log.error("ledger: cannot spill to %s: %s; record dropped", self.spill_path, err)
            self.metrics.records.labels("dropped").inc()
            self.metrics.errors.labels("spill").inc()
            return
        self._unsynced = True
        self.metrics.records.labels("spilled").inc()

    # -------------------------------------------------------------- the background task

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def close(self) -> None:
        """Flush: the queue to the store within `close_timeout_s`, the rest to the spill file.
        The store stays open (whoever opened it closes it)."""
        self._closing = True
        self._wake.set()
        self._closed.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.settings.close_timeout_s)
            except (TimeoutError, LedgerUnavailable):
                pass  # the store is away: what is left goes to the spill file
            except Exception:
                log.exception("ledger writer failed")
        left = [*self._batch, *self._queue]
        self._batch, self._queue = [], deque()
        for record in left:
            self._spill_or_drop(record)
        if left:
            log.warning(
                "ledger: %d records not written at shutdown (spilled or dropped)", len(left)
            )
        self._sync_spill(force=True)
        if self._spill_file is not None:
            self._spill_file.close()
            self._spill_file = None

    async def _run(self) -> None:
        await self._retrying(self._migrate)
        await self._replay_spilled()
        while True:
            if not self._queue and not self._closing:
                self._wake.clear()
                await self._idle_wait()
            if self._queue and len(self._queue) < self.settings.batch_size and not self._closing:
                await self._fill_wait()
            if not self._queue:
                self._sync_spill()
                if self._closing:
                    return
                continue
            take = min(len(self._queue), self.settings.batch_size)
            self._batch = [self._queue.popleft() for _ in range(take)]
            await self._retrying(self._write_batch)
            self._batch = []
            self._sync_spill()
            if self._spill_file is not None or self._replay_pending():
                await self._replay_spilled()

    async def _idle_wait(self) -> None:
        """Until a record arrives (or, with unsynced spill lines, until their sync is due)."""
        timeout = SPILL_SYNC_S if self._unsynced else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _fill_wait(self) -> None:
        """Let a batch fill for up to `batch_wait_s` (woken early when it is full)."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.settings.batch_wait_s)

    async def _retrying(self, attempt: Callable[[], Any]) -> None:
        """Run `attempt` until it does not raise `LedgerUnavailable`, backing off between tries;
        while closing, one try only (close spills what is left)."""
        delays = backoff_delays(self.settings.backoff_s, self.settings.backoff_max_s)
        while True:
            try:
                await attempt()
                return
            except LedgerUnavailable as err:
                self.metrics.errors.labels("unavailable").inc()
                if self._closing:
                    raise
                delay = next(delays)
                log.warning("ledger: database unavailable (%s); retrying in %.1f s", err, delay)
                self._sync_spill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), delay)

    async def _migrate(self) -> None:
        if not self._migrated:
            version = await self.store.migrate()
            self._migrated = True
            log.info("ledger: schema at version %d", version)

    async def _write_batch(self) -> None:
        await self._write(self._batch)

    async def _write(self, records: Sequence[UsageRecord]) -> None:
        started = self.clock()
        try:
            new = await self.store.write(records)
        except LedgerUnavailable:
            raise
        except Exception:
            # Not the database being away: a batch it refuses for good. Retrying cannot help and
            # would stall every record behind it.
            log.exception("ledger: the store refused %d records; dropped", len(records))
            self.metrics.errors.labels("refused").inc()
            self.metrics.records.labels("dropped").inc(len(records))
            return
        self.metrics.write_seconds.observe(self.clock() - started)
        self.metrics.records.labels("written").inc(new)
        self.metrics.records.labels("duplicate").inc(len(records) - new)

    # -------------------------------------------------------------- the spill file

    def _replaying_path(self) -> Path | None:
        if self.spill_path is None:
            return None
        return self.spill_path.with_name(self.spill_path.name + REPLAYING_SUFFIX)

    def _replay_pending(self) -> bool:
        replaying = self._replaying_path()
        return replaying is not None and replaying.exists()

    async def _replay_spilled(self) -> None:
        """Write the spilled records into the store (it is reachable: a write or the migration
        just succeeded): a replay a crash cut short first, then the current spill file."""
        replaying = self._replaying_path()
        if replaying is None or self.spill_path is None:
            return
        if replaying.exists():
            await self._replay(replaying)
        if self._spill_file is not None:
            self._sync_spill(force=True)
            self._spill_file.close()
            self._spill_file = None
        if self.spill_path.exists() and self.spill_path.stat().st_size > 0:
            os.replace(self.spill_path, replaying)  # new spills start a fresh file
            await self._replay(replaying)

    async def _replay(self, replaying: Path) -> None:
        """Write a renamed spill file's records in batches, then remove it."""
        records, bad = await asyncio.to_thread(read_spilled, replaying)
        if bad:
            log.warning("ledger: %d unreadable lines in %s; dropped", bad, replaying)
            self.metrics.records.labels("dropped").inc(bad)
        size = self.settings.batch_size
        for at in range(0, len(records), size):
            await self._retrying(functools.partial(self._write, records[at : at + size]))
        replaying.unlink()
        if records:
            log.info("ledger: replayed %d spilled records", len(records))

    def _sync_spill(self, force: bool = False) -> None:
        """Flush and fsync the spill file if it holds unsynced lines and a sync is due."""
        if self._spill_file is None or not self._unsynced:
            return
        now = self.clock()
        if not force and now - self._last_sync < SPILL_SYNC_S:
            return
        try:
            os.fsync(self._spill_file.fileno())
        except OSError as err:
            log.error("ledger: cannot sync the spill file %s: %s", self.spill_path, err)
            self.metrics.errors.labels("spill").inc()
        self._unsynced = False
        self._last_sync = now
