"""What every request needs, built once in `main` and shared by both servicers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from arks.policy import PolicySource
from extproc.admission import AdmissionControl
from extproc.decision_cache import DecisionCache
from extproc.inflight import InFlight
from extproc.ledger import RecordSink
from extproc.metrics import GatewayMetrics
from extproc.picking.service import Picking
from extproc.reported import ReportedElsewhere, SingleReplica
from extproc.response_homes import MemoryHomes, ResponseHomes


@dataclass(frozen=True)
class Context:
    policy: PolicySource
    metrics: GatewayMetrics
    inflight: InFlight  # admitted requests whose usage has not arrived yet
    admission: AdmissionControl
    now: Callable[[], datetime]
    monotonic: Callable[[], float]
    reported: ReportedElsewhere = field(default_factory=SingleReplica)
    picking: Picking | None = None  # endpoint picking for least-load and prefix-cache endpoints
    timer: Callable[[], float] = time.perf_counter  # times the gateway's own work (decisions)
    ledger: RecordSink | None = None  # where usage records go (None: no ledger)
    homes: ResponseHomes = field(default_factory=MemoryHomes)  # the engine of each stored response
    # (namespace, model) -> max_model_len its engines publish (model_info.fetch_forever fills it)
    model_lens: dict[tuple[str, str], int] = field(default_factory=dict)
    decisions: DecisionCache = field(default_factory=DecisionCache)  # headers decisions kept
