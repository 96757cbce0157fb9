"""What an admission took (quota, a concurrency slot), carried in the request's metadata so that
whoever settles the request — the access log, or the expiry of an unreported one — gives it back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Reservation:
    """What an admission took, so that its settlement can give it back."""

    admitted_at: float  # epoch seconds: the quota periods to settle into
    quota: str | None = None
    concurrency: bool = False

    # Its fields in the request's metadata (written by `codec`, read back by `from_metadata`).
    FIELDS: ClassVar[tuple[str, ...]] = ("admitted_at", "quota", "concurrency")

    @classmethod
    def from_metadata(cls, fields: Mapping[str, object]) -> Reservation | None:
        admitted_at = fields.get("admitted_at")
        if not isinstance(admitted_at, int | float):
            return None
        name = fields.get("quota")
        return cls(
            float(admitted_at),
            name if isinstance(name, str) else None,
            fields.get("concurrency") is True,
        )
