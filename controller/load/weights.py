"""Engine load -> endpoint weights: pure decisions, no I/O, no clock.

`WeightTracker.update` folds one round of observations (an `EngineLoad` or a `ScrapeFailure` per
endpoint) into the weights to publish. The formula, the bands against flapping and the health
rules: docs/architecture.md, section 7 (Weights from load).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from arks.engine_metrics import EngineLoad, LoadWindow, Observation, ScrapeFailure, window

K = TypeVar("K", bound=Hashable)
SETTLED = 0.05  # score units: an EWMA this close to the load has caught up with it


@dataclass(frozen=True, slots=True)
class WeightSettings:
    min_weight: int = 1
    max_weight: int = 100
    smoothing: float = 0.3  # EWMA factor: share of the newest score
    hysteresis_abs: int = 2  # weight units
    hysteresis_rel: float = 0.05  # of the published weight
    deadband_abs: float = 1.0  # score units
    deadband_rel: float = 0.2  # of the held score
    failures_to_drain: int = 3
    recovery_steps: int = 5
    waiting_cost: float = 0.5  # per queued request
    running_cost: float = 0.1  # per request in the running batch
    kv_cost: float = 2.0  # at a full KV cache
    error_cost: float = 10.0  # when every request of the interval failed
    ttft_cost: float = 0.5  # per second of mean time to first token
    e2e_cost: float = 0.0  # per second of mean end-to-end latency (depends on answer length)

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.min_weight <= self.max_weight:
            problems.append("need 1 <= min_weight <= max_weight")
        if not 0 < self.smoothing <= 1:
            problems.append("smoothing must be in (0, 1]")
        if min(self.hysteresis_abs, self.hysteresis_rel, self.deadband_abs, self.deadband_rel) < 0:
            problems.append("hysteresis and dead band must be >= 0")
        if self.failures_to_drain < 1 or self.recovery_steps < 1:
            problems.append("failures_to_drain and recovery_steps must be >= 1")
        costs = (self.waiting_cost, self.running_cost, self.kv_cost, self.error_cost)
        if min(*costs, self.ttft_cost, self.e2e_cost) < 0:
            problems.append("costs must be >= 0")
        if problems:
            raise ValueError("WeightSettings: " + "; ".join(problems))


def load_score(load: EngineLoad, recent: LoadWindow, settings: WeightSettings) -> float:
    """The raw (unsmoothed) score of one observation; 0 is an idle engine."""
    s = settings
    return (
        s.waiting_cost * (load.waiting or 0.0)
        + s.running_cost * (load.running or 0.0)
        + s.kv_cost * (load.kv_cache_usage or 0.0)
        + s.error_cost * (recent.error_ratio or 0.0)
        + s.ttft_cost * (recent.mean_ttft_s or 0.0)
        + s.e2e_cost * (recent.mean_e2e_s or 0.0)
    )


@dataclass(frozen=True, slots=True)
class EndpointWeight:
    """What the tracker holds for one endpoint (for logs, metrics and tests)."""

    weight: int
    score: float | None
    consecutive_failures: int
    drained: bool


@dataclass(slots=True)
class _Endpoint:
    score: float | None  # smoothed
    held: float | None = None  # the smoothed score weights are computed from (dead band)
    published: int | None = None
    failures: int = 0
    drained: bool = False
    recovering: int = 0  # healthy rounds since a drain, while still ramping up
    age: int = 0  # healthy rounds since it appeared, came back or its held score moved
    previous: EngineLoad | None = None
    gap: float = 0.0  # raw - smoothed score of the last round: which side the EWMA trails on
    settling: bool = True  # following the EWMA after a move, until it caught up


@dataclass
class WeightTracker(Generic[K]):
    settings: WeightSettings = field(default_factory=WeightSettings)
    _endpoints: dict[K, _Endpoint] = field(default_factory=dict, init=False)

    def update(self, observations: Mapping[K, Observation]) -> dict[K, int]:
        """Fold in one round of observations; the weights to publish, one per endpoint."""
        for gone in self._endpoints.keys() - observations.keys():
            del self._endpoints[gone]
        neutral = self._mean_score()
        moved = False
        for key, observation in observations.items():
            ep = self._endpoints.get(key)
            if ep is None:
                ep = self._endpoints[key] = _Endpoint(score=neutral, held=neutral)
            if isinstance(observation, ScrapeFailure):
                self._fail(ep)
            else:
                moved = self._observe(ep, observation, neutral) or moved
        if moved:  # weights are relative: recompute them all from one fresh snapshot
            for ep in self._endpoints.values():
                ep.held = ep.score
        return self._publish()

    def state(self) -> dict[K, EndpointWeight]:
        return {
            key: EndpointWeight(ep.published or 0, ep.score, ep.failures, ep.drained)
            for key, ep in self._endpoints.items()
        }

    # ------------------------------------------------------------------ steps

    def _mean_score(self) -> float | None:
        scores = [
            ep.score for ep in self._endpoints.values() if not ep.drained and ep.score is not None
        ]
        return sum(scores) / len(scores) if scores else None

    def _fail(self, ep: _Endpoint) -> None:
        ep.failures += 1
        if ep.failures >= self.settings.failures_to_drain:
            ep.drained, ep.recovering = True, 0

    def _observe(self, ep: _Endpoint, load: EngineLoad, neutral: float | None) -> bool:
        """Fold one load in; whether its score, once warmed up, left the dead band."""
        s = self.settings
        if ep.drained:  # back from a drain: restart from the fleet and ramp up
            ep.drained, ep.recovering, ep.age, ep.score, ep.settling = False, 1, 0, neutral, True
        elif ep.recovering:
            ep.recovering = ep.recovering + 1 if ep.recovering + 1 < s.recovery_steps else 0
        ep.failures = 0
        raw = load_score(load, window(ep.previous, load), s)
        ep.previous = load
        ep.score = raw if ep.score is None else s.smoothing * raw + (1 - s.smoothing) * ep.score
        ep.age += 1
        gap, ep.gap = ep.gap, raw - ep.score
        # Settling after a move: follow the EWMA for its time constant, and on until it has
        # caught up with the load — it reaches it (within SETTLED) or the noise makes it cross.
        caught_up = abs(ep.gap) <= SETTLED or (gap != 0.0 and (gap > 0) != (ep.gap > 0))
        warming = ep.age <= math.ceil(3 / s.smoothing)
        if ep.held is None or warming or (ep.settling and not caught_up):
            ep.held = ep.score  # warming up, or settling after a move: follow the EWMA
            return False
        ep.settling = False
        if abs(ep.score - ep.held) <= max(s.deadband_abs, s.deadband_rel * ep.held):
            return False
        ep.held, ep.age, ep.settling = ep.score, 0, True  # a real move: follow it until it settles
        return True

    def _publish(self) -> dict[K, int]:
        s = self.settings
        live = [ep for ep in self._endpoints.values() if not ep.drained]
        best = max((_capacity(ep.held) for ep in live), default=1.0)
        out: dict[K, int] = {}
        for key, ep in self._endpoints.items():
            if ep.drained:
                ep.published = 0
            else:
                target = round(s.max_weight * _capacity(ep.held) / best)
                target = min(s.max_weight, max(s.min_weight, target))
                if ep.recovering:
                    cap = math.ceil(s.max_weight * ep.recovering / s.recovery_steps)
                    target = min(target, max(s.min_weight, cap))
                if ep.published is None or ep.published == 0 or ep.recovering:
                    ep.published = target
                elif abs(target - ep.published) > max(
                    s.hysteresis_abs, s.hysteresis_rel * ep.published
                ):
                    ep.published = target
            out[key] = ep.published
        return out


def _capacity(score: float | None) -> float:
    return 1.0 / (1.0 + (score or 0.0))
