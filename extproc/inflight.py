"""Admitted requests whose usage has not arrived yet.

Usage reaches Python through Envoy's batched access log, which drops entries while the receiver
is unreachable. Every admitted request is noted here and struck off when its entry arrives; one
still here after the longest possible answer (plus the log's flush delay) is charged with what
the gateway knew when it admitted it, and counted as unreported. So a lost entry costs at most
the difference between that estimate and the real usage, never the whole request.

With replicas (or workers) the entry often reaches another process, which marks it in Redis
(`reported.py`). With `recheck`, each entry is due for a look at those marks FIRST_CHECK_S after
its admission, then after twice as long each time (at most MAX_CHECK_S apart), so one whose usage
another process charged stops being in flight here within seconds, not after the longest answer
(it held memory, the in-flight gauge and its engine pick until then).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field

from extproc.decision import Identity
from extproc.reservation import Reservation
from extproc.usage import Usage


@dataclass(frozen=True)
class Admitted:
    request_id: str
    identity: Identity
    prompt_estimate: int | None
    max_tokens: int | None
    at: float  # monotonic seconds
    reservation: Reservation | None = None
    limits: Mapping[str, int] = field(default_factory=dict)
    path: str = ""  # the API path (the usage record's)

    def usage(self) -> Usage:
        ident = self.identity
        return Usage(
            ident.namespace,
            ident.user,
            ident.model,
            self.prompt_estimate or 0,
            self.max_tokens or 0,
            "access_log_lost",
        )


FIRST_CHECK_S = 2.0  # the access log's flush, and the other process's batch, are well within
MAX_CHECK_S = 60.0


class InFlight:
    def __init__(self, max_age: float, *, recheck: bool = False) -> None:
        self.max_age = max_age
        self.recheck = recheck
        self._entries: dict[str, Admitted] = {}  # insertion order is admission order
        # (due at, request id, interval): entries of finished requests linger until popped
        self._checks: list[tuple[float, str, float]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: Admitted) -> Admitted | None:
        """Keep `entry` (none without an id); the entry a reused id replaced, if any."""
        if not entry.request_id:
            return None
        replaced = self._entries.pop(entry.request_id, None)  # a reused id moves to the back
        self._entries[entry.request_id] = entry
        if self.recheck:
            heapq.heappush(
                self._checks, (entry.at + FIRST_CHECK_S, entry.request_id, FIRST_CHECK_S)
            )
        return replaced

    def due(self, now: float, limit: int = 4096) -> list[tuple[str, float]]:
        """The requests still in flight whose look at the marks is due (at most `limit`), with
        their interval; each is due again only once `again` schedules it."""
        out: list[tuple[str, float]] = []
        while self._checks and self._checks[0][0] <= now and len(out) < limit:
            _, request_id, interval = heapq.heappop(self._checks)
            if request_id in self._entries:
                out.append((request_id, interval))
        return out

    def again(self, due: list[tuple[str, float]], now: float) -> None:
        """Look at these (still in flight) later: twice as long after, at most MAX_CHECK_S."""
        for request_id, interval in due:
            if request_id in self._entries:
                longer = min(2 * interval, MAX_CHECK_S)
                heapq.heappush(self._checks, (now + longer, request_id, longer))

    def finish(self, request_id: str) -> Admitted | None:
        """Strike the request off; None when this process never admitted it."""
        return self._entries.pop(request_id, None)

    def expire(self, now: float) -> list[Admitted]:
        """Remove and return the entries older than `max_age`, oldest first."""
        expired = []
        for _request_id, entry in self._entries.items():
            if now - entry.at <= self.max_age:
                break
            expired.append(entry)
        for entry in expired:
            del self._entries[entry.request_id]
        if len(self._checks) > 2 * len(self._entries) + 1024:  # drop finished requests' checks
            self._checks = [c for c in self._checks if c[1] in self._entries]
            heapq.heapify(self._checks)
        return expired
