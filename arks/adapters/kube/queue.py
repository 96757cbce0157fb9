"""A per-object work queue, after client-go's rate-limited workqueue.

Guarantees: a key is pending at most once (adds while pending are merged); a key is never
handed to two workers at once (an add while it is being processed is held until `done`);
retries back off exponentially per key and `forget` resets that after a success. Delays are
measured on an injected clock so tests can drive time; `get`'s own timeout is real time
because it only bounds how long a worker thread blocks.

`on_wait`, when set, is told how long each key `get` hands out waited: from the add that made it
pending (a delayed add counts from when its delay ran out) until it was taken, including the time
it was held while an earlier run of it finished. That is client-go's
`workqueue_queue_duration_seconds`: its `Add` notes the time whenever the key was not dirty yet,
processing or not, and `Get` observes the time since.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable

Key = tuple[str, str]
"""(namespace, name); namespace is "" for cluster-scoped objects."""

Clock = Callable[[], float]
WaitObserver = Callable[[float], None]


class WorkQueue:
    def __init__(
        self,
        clock: Clock = time.monotonic,
        base_delay_s: float = 0.05,
        max_delay_s: float = 60.0,
    ) -> None:
        self._clock = clock
        self._base_delay_s = base_delay_s
        self._max_delay_s = max_delay_s
        self._cond = threading.Condition()
        self._ready: deque[Key] = deque()
        self._dirty: set[Key] = set()  # pending: in _ready, or held until its `done`
        self._processing: set[Key] = set()
        self._waiting: list[tuple[float, int, Key]] = []  # heap of (ready_at, seq, key)
        self._waiting_at: dict[Key, float] = {}
        self._seq = itertools.count()
        self._failures: dict[Key, int] = {}
        self._pending_since: dict[Key, float] = {}  # clock() of the add that made a key pending
        self._shut_down = False
        self.on_wait: WaitObserver | None = None

    # --- adding -----------------------------------------------------------------------------

    def add(self, key: Key) -> None:
        with self._cond:
            self._add_locked(key)

    def add_after(self, key: Key, delay_s: float) -> None:
        """Add `key` once `delay_s` has passed; an earlier pending time for it wins."""
        with self._cond:
            if self._shut_down:
                return
            if delay_s <= 0:
                self._add_locked(key)
                return
            ready_at = self._clock() + delay_s
            if key in self._waiting_at and self._waiting_at[key] <= ready_at:
                return
            self._waiting_at[key] = ready_at
            heapq.heappush(self._waiting, (ready_at, next(self._seq), key))
            self._cond.notify_all()  # a sleeping `get` may need to wake earlier

    def add_rate_limited(self, key: Key, delay_s: float | None = None) -> float:
        """Requeue after a failure: `delay_s` if given, else the key's next backoff step."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = delay_s if delay_s is not None else self.backoff(failures)
        self.add_after(key, delay)
        return delay

    def backoff(self, failures: int) -> float:
        """The delay after `failures` earlier failures: base * 2**failures, capped."""
        if failures >= 64:  # 2**64 * base overflows any sensible cap
            return self._max_delay_s
        return float(min(self._base_delay_s * (2**failures), self._max_delay_s))

    def forget(self, key: Key) -> None:
        """Reset the key's backoff (after a success, or when giving up)."""
        with self._cond:
            self._failures.pop(key, None)

    def num_requeues(self, key: Key) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    # --- taking -----------------------------------------------------------------------------

    def get(self, timeout_s: float | None = None) -> Key | None:
        """The next ready key, marked as processing; None on timeout or after `shutdown`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._shut_down:
                    return None
                self._promote_due_locked()
                if self._ready:
                    key = self._ready.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    since = self._pending_since.pop(key, None)
                    if self.on_wait is not None and since is not None:
                        self.on_wait(max(self._clock() - since, 0.0))
                    return key
                wait: float | None = None
                if deadline is not None:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        return None
                if self._waiting:
                    until_due = max(self._waiting[0][0] - self._clock(), 0.0)
                    wait = until_due if wait is None else min(wait, until_due)
                self._cond.wait(wait)

    def done(self, key: Key) -> None:
        """Processing of `key` ended; if it was added meanwhile, it becomes ready again."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._ready.append(key)
                self._cond.notify()

    def shutdown(self) -> None:
        with self._cond:
            self._shut_down = True
            self._cond.notify_all()

    def __len__(self) -> int:
        """Keys ready to be taken (not the delayed ones)."""
        with self._cond:
            self._promote_due_locked()
            return len(self._ready)

    # --- internals --------------------------------------------------------------------------

    def _add_locked(self, key: Key) -> None:
        if self._shut_down or key in self._dirty:
            return
        self._dirty.add(key)
        self._pending_since[key] = self._clock()
        if key in self._processing:
            return  # `done` requeues it, so one key never runs on two workers
        self._ready.append(key)
        self._cond.notify()

    def _promote_due_locked(self) -> None:
        now = self._clock()
        while self._waiting and self._waiting[0][0] <= now:
            ready_at, _, key = heapq.heappop(self._waiting)
            if self._waiting_at.get(key) != ready_at:
                continue  # superseded by an earlier add_after
            del self._waiting_at[key]
            self._add_locked(key)
