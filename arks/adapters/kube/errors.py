"""What a reconcile failure means for retrying, carried by the exception type (as in kopf).

- `TemporaryError`: retry the key with backoff (or after `delay_s` when given).
- `PermanentError`: record it and stop retrying until the object changes (a new event
  enqueues the key again).
- Any other exception is treated as temporary by the runner.
"""

from __future__ import annotations


class ReconcileError(Exception):
    """Base of the errors a reconcile may raise to say how it should be retried."""


class TemporaryError(ReconcileError):
    """Retry later: with the queue's backoff, or after `delay_s` seconds when given."""

    def __init__(self, message: str, delay_s: float | None = None) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class PermanentError(ReconcileError):
    """Do not retry until the object changes."""
