"""metav1.Condition bookkeeping, pure: the caller passes the time."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any


def format_time(now: datetime.datetime) -> str:
    """RFC 3339 in UTC with second precision, as metav1.Time serialises."""
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def find_condition(
    conditions: Sequence[Mapping[str, Any]] | None, type_: str
) -> Mapping[str, Any] | None:
    for condition in conditions or ():
        if condition.get("type") == type_:
            return condition
    return None


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    observed_generation: int | None,
    now: datetime.datetime,
) -> list[dict[str, Any]]:
    """A new list with condition `type_` set; other conditions keep their order and content.

    `lastTransitionTime` changes only when the status changes (metav1.Condition semantics), so
    re-setting an unchanged condition yields an equal list and a status patch that is a no-op.
    """
    if status not in ("True", "False", "Unknown"):
        raise ValueError(f"condition status must be True, False or Unknown, not {status!r}")
    previous = find_condition(conditions, type_)
    transition = (
        str(previous["lastTransitionTime"])
        if previous is not None
        and previous.get("status") == status
        and previous.get("lastTransitionTime")
        else format_time(now)
    )
    updated: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
    }
    if observed_generation is not None:
        updated["observedGeneration"] = observed_generation
    result = [dict(c) for c in conditions or () if c.get("type") != type_]
    position = next(
        (i for i, c in enumerate(conditions or ()) if c.get("type") == type_), len(result)
    )
    result.insert(position, updated)
    return result
