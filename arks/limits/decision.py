"""From a rate-limit request to the counters to charge, and from their outcomes to an answer.

Pure functions over our own types (`model.py`); the servicer does the I/O around them.
Semantics follow envoyproxy/ratelimit: the limit of a descriptor is Envoy's per-descriptor
override if it sent one, else the configured one; a limit named in another matched limit's
`replaces` is not applied; every matched counter is charged, also when another is over.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from arks.limits.model import Algorithm, Hit, Outcome, RateLimit


@dataclass(frozen=True)
class DescriptorRequest:
    entries: tuple[tuple[str, str], ...]
    override: RateLimit | None = None
    hits: int | None = None  # the descriptor's own hits_addend; 0 = look without counting


@dataclass(frozen=True)
class LimitRequest:
    domain: str
    descriptors: tuple[DescriptorRequest, ...]
    hits_addend: int = 0  # request-wide; 0 (unset) counts 1, as in envoyproxy/ratelimit


@dataclass(frozen=True)
class Status:
    over_limit: bool
    limit: RateLimit | None = None
    remaining: int = 0
    reset_s: float = 0.0
    shadowed: bool = False  # over the limit, but the limit (or the service) is in shadow mode
    near_limit: bool = False
    unlimited: bool = False  # the descriptor's limit is `unlimited: true`: never counted
    quota_mode: bool = False  # its limit (or the service) is in quota mode
    used: int = 0  # the counter after this request's hits (the outcome's)
    cached: bool = False  # over the limit by the local over-limit cache (the outcome's)


@dataclass(frozen=True)
class Answer:
    over_limit: bool
    statuses: tuple[Status, ...]
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    without_store: bool = False  # decided without the counter store (it could not be reached)
    shadowed: bool = False  # over the limit, answered OK by the service's own shadow mode


Lookup = Callable[[str, Sequence[tuple[str, str]]], RateLimit | None]


def limits_for(
    request: LimitRequest, lookup: Lookup, *, overrides: bool = True
) -> list[RateLimit | None]:
    """The limit applying to each descriptor, after overrides and `replaces`; an unlimited one
    is kept (its status says so) but never counted. Without `overrides` (a domain the
    configuration does not have: envoyproxy/ratelimit finds no limit there, override or not)
    a descriptor's own limit is ignored."""
    found = [
        (d.override if overrides else None) or lookup(request.domain, d.entries)
        for d in request.descriptors
    ]
    replaced = {name for limit in found if limit is not None for name in limit.replaces}
    return [
        None
        if limit is None or (not limit.unlimited and limit.name and limit.name in replaced)
        else limit
        for limit in found
    ]


def counted(limit: RateLimit | None) -> bool:
    """Whether a descriptor's limit is charged and can refuse (an unlimited one is not)."""
    return limit is not None and not limit.unlimited


def counter_key(domain: str, entries: Sequence[tuple[str, str]], limit: RateLimit) -> str:
    """envoyproxy/ratelimit's key shape (domain_key_value_…; a `share_threshold` wildcard's
    pattern for the values it matched), plus the window, so that an override with another unit
    never shares a counter; GCRA state is kept apart from counts."""
    shared = limit.shared_values
    parts = "_".join(
        f"{key}_{shared[i] if shared and shared[i] is not None else value}"
        for i, (key, value) in enumerate(entries)
    )
    prefix = "gcra:" if limit.algorithm is Algorithm.GCRA else ""
    return f"{prefix}{domain}_{parts}_{limit.unit.seconds}"


def hits_for(request: LimitRequest, limits: Sequence[RateLimit | None]) -> list[Hit | None]:
    default_hits = max(1, request.hits_addend)
    out: list[Hit | None] = []
    for descriptor, limit in zip(request.descriptors, limits, strict=True):
        if limit is None or limit.unlimited:
            out.append(None)
            continue
        hits = default_hits if descriptor.hits is None else descriptor.hits
        key = counter_key(request.domain, descriptor.entries, limit)
        out.append(Hit(key, limit.requests_per_unit, limit.unit.seconds, hits, limit.algorithm))
    return out


def answer(
    limits: Sequence[RateLimit | None],
    outcomes: Sequence[Outcome | None],
    *,
    shadow_mode: bool = False,
    quota_mode: bool = False,
    near_ratio: float = 0.8,
) -> Answer:
    """Combine the outcomes into Envoy's answer: overall code, statuses, headers, 429 body.

    As envoyproxy/ratelimit: a limit in shadow mode over its count reports OK; the service's
    own shadow mode (`shadow_mode`) leaves each descriptor's status as it is (OVER_LIMIT
    included) and only answers OK overall. Descriptors in quota mode (their limit's, or the
    service's `quota_mode`) refuse together: the answer is over the limit when a descriptor not
    in quota mode is, or when every one in quota mode is."""
    statuses = []
    for limit, outcome in zip(limits, outcomes, strict=True):
        if limit is not None and limit.unlimited:
            statuses.append(Status(over_limit=False, unlimited=True))
            continue
        if limit is None or outcome is None:
            statuses.append(Status(over_limit=False, quota_mode=quota_mode))
            continue
        shadowed = outcome.over_limit and (shadow_mode or limit.shadow_mode)
        near = not outcome.over_limit and outcome.used > near_threshold(
            limit.requests_per_unit, near_ratio
        )
        statuses.append(
            Status(
                over_limit=outcome.over_limit and not limit.shadow_mode,
                limit=limit,
                remaining=outcome.remaining,
                reset_s=max(0.0, outcome.reset_s),
                shadowed=shadowed,
                near_limit=near,
                quota_mode=quota_mode or limit.quota_mode,
                used=outcome.used,
                cached=outcome.cached,
            )
        )
    refused = _over(statuses)
    over = refused and not shadow_mode
    return Answer(
        over,
        tuple(statuses),
        _headers(statuses, over),
        _body(statuses) if over else b"",
        shadowed=refused and shadow_mode,
    )


def _f32(x: float) -> float:
    """`x` as a float32 holds it (Go's float32 conversions)."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


@functools.lru_cache(maxsize=4096)  # two float32 round trips: the hot path's costliest arithmetic
def near_threshold(limit: int, near_ratio: float) -> int:
    """envoyproxy/ratelimit's near-limit threshold: floor(float32(limit) * float32(ratio)); a
    counter above it (and within the limit) is near the limit."""
    return math.floor(_f32(_f32(limit) * _f32(near_ratio)))


def hit_stats(status: Status, hits: int, near_ratio: float) -> tuple[int, int, int, int]:
    """How many of a descriptor's `hits` envoyproxy/ratelimit counts over the limit, near it,
    within it and in shadow mode (its base_limiter: a request that crosses a threshold counts
    only its hits beyond it there; hits over a shadow-mode limit count both over and shadow;
    the service's global shadow mode changes no stat)."""
    limit = status.limit
    if limit is None:
        return 0, 0, 0, 0
    threshold = limit.requests_per_unit
    after = status.used
    before = max(0, after - hits)
    near_at = near_threshold(threshold, near_ratio)
    if status.over_limit or (limit.shadow_mode and status.shadowed):
        if before >= threshold:
            over, near = hits, 0
        else:
            over, near = after - threshold, threshold - max(near_at, before)
        return over, near, 0, over if limit.shadow_mode else 0
    near = 0
    if after > near_at:
        near = hits if before >= near_at else after - near_at
    return 0, near, hits, 0


def _over(statuses: Sequence[Status]) -> bool:
    """envoyproxy/ratelimit's overall code: over when a descriptor not in quota mode is over, or
    when there are quota-mode descriptors and all of them are over."""
    quota = [s for s in statuses if s.quota_mode and not s.unlimited]
    if any(s.over_limit and not s.quota_mode for s in statuses):
        return True
    return bool(quota) and all(s.over_limit for s in quota)


def _headers(statuses: Sequence[Status], over: bool) -> tuple[tuple[str, str], ...]:
    """IETF RateLimit-* headers for the tightest limit, and Retry-After when over."""
    limited = [s for s in statuses if s.limit is not None and not s.unlimited]
    if not limited:
        return ()
    tightest = (
        limited[0]
        if len(limited) == 1
        else min(limited, key=lambda s: (not s.over_limit, s.remaining))
    )
    limit = tightest.limit
    assert limit is not None
    count = limit.requests_per_unit
    headers: tuple[tuple[str, str], ...] = (
        ("ratelimit-limit", f"{count}, {count};w={limit.unit.value}"),
        ("ratelimit-remaining", str(tightest.remaining)),
        ("ratelimit-reset", str(math.ceil(tightest.reset_s))),
    )
    if over:
        retry = max(s.reset_s for s in statuses if s.over_limit)
        headers += (
            ("retry-after", str(max(1, math.ceil(retry)))),
            ("content-type", "application/json"),
        )
    return headers


def _body(statuses: Sequence[Status]) -> bytes:
    over = [s for s in statuses if s.over_limit and s.limit is not None]
    limit = over[0].limit if over else None
    if limit is None:
        message = "Rate limit reached."
    else:
        what = f" for {limit.name}" if limit.name else ""
        unit = limit.unit.name.lower()
        message = (
            f"Rate limit reached{what}: {limit.requests_per_unit} per {unit}. "
            f"Try again in {max(1, math.ceil(over[0].reset_s))} s."
        )
    return orjson.dumps(
        {"error": {"message": message, "type": "rate_limit_error", "code": "rate_limit_exceeded"}}
    )


def passed_metadata(decided: Answer) -> dict[str, Any]:
    """envoyproxy/ratelimit's `metadata` in a response's dynamic metadata: the configured
    `metadata` of the limit of each descriptor that passed (not over its limit, not unlimited),
    merged in the request's order: a key already there keeps its value, unless both are
    mappings, which are merged alike."""
    merged: dict[str, Any] = {}
    for status in decided.statuses:
        if status.over_limit or status.unlimited or status.limit is None:
            continue
        if status.limit.metadata:
            _merge(merged, orjson.loads(status.limit.metadata))
    return merged


def _merge(into: dict[str, Any], source: dict[str, Any]) -> None:
    for key, value in source.items():
        there = into.get(key)
        if key not in into:
            into[key] = value
        elif isinstance(there, dict) and isinstance(value, dict):
            _merge(there, value)
