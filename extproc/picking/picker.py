"""filter -> score -> pick: the engine for one request, and its fallbacks. Pure.

A `Profile` names the filters and the weighted scorers of one weighting mode. The candidates
are ranked by their weighted score; ties are broken at random (so new conversations spread over
idle engines) by the caller's generator, which tests seed. The first is the pick; the next
`fallbacks` (candidates first, then healthy engines a room filter set aside) are where Envoy's
retries go, in order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.picking.filters import Filter
from extproc.picking.scorers import PickRequest, Scorer
from extproc.picking.state import EngineView


@dataclass(frozen=True, slots=True)
class Profile:
    eligible: Filter  # strict: an engine outside it never gets the request
    filters: tuple[Filter, ...]  # soft preferences, applied in order
    scorers: tuple[tuple[Scorer, float], ...]  # (scorer, weight)


@dataclass(frozen=True, slots=True)
class Ranked:
    hosts: tuple[str, ...]  # the pick first, then fallbacks; empty: no engine may take it
    scores: tuple[float, ...]  # weighted score of each host


def _rank(
    engines: Sequence[EngineView], profile: Profile, request: PickRequest, rng: random.Random
) -> list[tuple[float, float, str]]:
    totals = [0.0] * len(engines)
    for scorer, weight in profile.scorers:
        for i, score in enumerate(scorer(engines, request)):
            totals[i] += weight * score
    ranked = [(total, rng.random(), e.address) for total, e in zip(totals, engines, strict=True)]
    ranked.sort(reverse=True)
    return ranked


def pick(
    engines: Sequence[EngineView],
    profile: Profile,
    request: PickRequest,
    rng: random.Random,
    fallbacks: int = 2,
) -> Ranked:
    eligible = profile.eligible(engines)
    if not eligible:
        return Ranked((), ())
    candidates = eligible
    for keep in profile.filters:
        candidates = keep(candidates)
    ranked = _rank(candidates, profile, request, rng)
    if len(ranked) <= fallbacks:
        chosen = {address for _, _, address in ranked}
        rest = [e for e in eligible if e.address not in chosen]
        ranked += _rank(rest, profile, request, rng) if rest else []
    top = ranked[: 1 + fallbacks]
    return Ranked(tuple(a for _, _, a in top), tuple(t for t, _, _ in top))
