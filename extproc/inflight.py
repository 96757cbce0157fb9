"""Admitted requests whose usage has not arrived yet.

Usage reaches Python through Envoy's batched access log, which drops entries while the receiver
is unreachable. Every admitted request is noted here and struck off when its entry arrives; one
still here after the longest possible answer (plus the log's flush delay) is charged with what
the gateway knew when it admitted it, and counted as unreported. So a lost entry costs at most
the difference between that estimate and the real usage, never the whole request.
"""

from __future__ import annotations

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


class InFlight:
    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self._entries: dict[str, Admitted] = {}  # insertion order is admission order

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: Admitted) -> Admitted | None:
        """Keep `entry` (none without an id); the entry a reused id replaced, if any."""
        if not entry.request_id:
            return None
        replaced = self._entries.pop(entry.request_id, None)  # a reused id moves to the back
        self._entries[entry.request_id] = entry
        return replaced

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
        return expired
