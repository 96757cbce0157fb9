"""Runs a reconcile function over an informer's keys with worker threads.

Retry meaning comes from the exception type: TemporaryError → requeue with backoff (or its
`delay_s`); PermanentError → log and forget until the object changes; anything else → as
temporary. A reconcile that returns a number of seconds is run again after that long (state
that changes with time, such as a token's expiry). Workers take keys only while the leader
elector (if any) says we lead; informers run regardless so a new leader starts with a warm cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from arks.adapters.kube.errors import PermanentError, TemporaryError
from arks.adapters.kube.queue import Key, WorkQueue
from arks.adapters.kube.watch import Informer, Watched, enqueue

log = logging.getLogger(__name__)

Reconcile = Callable[[Key], float | None]


class Leadership(Protocol):
    def is_leader(self) -> bool: ...


class ReconcileMetrics(Protocol):
    """Where a controller counts its reconciles; the service that runs it owns the registry."""

    @property
    def reconciles(self) -> Counter: ...  # labels: controller, result

    @property
    def duration(self) -> Histogram: ...  # labels: controller

    @property
    def queue_depth(self) -> Gauge: ...  # labels: controller

    @property
    def queue_wait(self) -> Histogram: ...  # labels: controller


class Controller:
    def __init__(
        self,
        name: str,
        informer: Informer,
        reconcile: Reconcile,
        workers: int = 1,
        *,
        queue: WorkQueue | None = None,
        owned: Sequence[Watched] = (),
        leader: Leadership | None = None,
        poll_s: float = 0.1,
    ) -> None:
        self.name = name
        self.informer = informer
        self.queue = queue if queue is not None else WorkQueue()
        self._reconcile = reconcile
        self._workers = workers
        self._owned: list[Watched] = list(
            owned
        )  # their handlers must already enqueue into `self.queue`
        self._leader = leader
        self._poll_s = poll_s
        self._metrics: ReconcileMetrics | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        informer.add_handler(enqueue(self.queue))

    def start(self) -> None:
        for informer in (self.informer, *self._owned):
            informer.start()
        self._threads = [
            threading.Thread(target=self._work, name=f"{self.name}-worker-{i}", daemon=True)
            for i in range(self._workers)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking keys, let running reconciles finish, then stop the informers."""
        self._stopping.set()
        self.queue.shutdown()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for informer in (self.informer, *self._owned):
            # Informer threads are daemons and leave within their watch timeout by themselves:
            # waiting for each open watch to end would hold a shutdown for minutes.
            informer.stop(timeout_s=0.0)

    def _work(self) -> None:
        while not self._stopping.is_set():
            if self._leader is not None and not self._leader.is_leader():
                self._stopping.wait(self._poll_s)
                continue
            key = self.queue.get(timeout_s=self._poll_s)
            if key is None:
                continue
            try:
                self.process(key)
            finally:
                self.queue.done(key)

    def instrument(self, metrics: ReconcileMetrics) -> None:
        """Count reconciles, time them, export the queue depth and time each key's wait in the
        queue (before `start`)."""
        self._metrics = metrics
        metrics.queue_depth.labels(self.name).set_function(lambda: len(self.queue))
        self.queue.on_wait = metrics.queue_wait.labels(self.name).observe

    def cached(self) -> int:
        """How many objects its informers' caches hold in all."""
        return sum(i.size() for i in (self.informer, *self._owned))

    def synced(self) -> bool:
        """Whether every informer has listed its objects once."""
        return all(i.wait_synced(0) for i in (self.informer, *self._owned))

    def process(self, key: Key) -> None:
        """Reconcile one key and apply the retry policy (the caller owns `done`)."""
        started = time.perf_counter()
        result = self._process(key)
        if self._metrics is not None:
            self._metrics.reconciles.labels(self.name, result).inc()
            self._metrics.duration.labels(self.name).observe(time.perf_counter() - started)

    def _process(self, key: Key) -> str:
        try:
            again_after_s = self._reconcile(key)
        except TemporaryError as e:
            delay = self.queue.add_rate_limited(key, e.delay_s)
            log.info("%s %s: %s; retrying in %.2fs", self.name, key, e, delay)
            return "retry"
        except PermanentError as e:
            log.error("%s %s: %s; not retrying until it changes", self.name, key, e)
            self.queue.forget(key)
            return "permanent_error"
        except Exception:
            delay = self.queue.add_rate_limited(key)
            log.exception("%s %s failed; retrying in %.2fs", self.name, key, delay)
            return "error"
        self.queue.forget(key)
        if again_after_s is not None:
            self.queue.add_after(key, again_after_s)
        return "success"
