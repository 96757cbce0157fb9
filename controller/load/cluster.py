"""Engine load in a cluster: how much of each ArksApplication's capacity is free right now.

`ClusterLoad` watches the serving engine pods, scrapes their `/metrics` and sums per-pod weights
per application (`capacity_of`); `serving_target` and `PodWeights` are its pure parts. Which pods,
and why every replica scrapes: docs/architecture.md, section 8 (Engine load in a cluster). Each
round is also exported (`controller.load.metrics`), one engine per pod (`pod_readings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from kubernetes.client import ApiClient

from arks.adapters.kube.rest import Obj
from arks.adapters.kube.watch import Informer, key_of
from arks.adapters.scrape import Scraper
from arks.engine_metrics import Observation
from arks.resources import PODS
from arks.wire import (
    LABEL_APPLICATION,
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_ROLE,
    LABEL_SERVED_NAME,
)
from controller.load.metrics import EngineMetrics, EngineReading, EngineSeries
from controller.load.weights import WeightSettings, WeightTracker

log = logging.getLogger(__name__)

# Arks' engine pods that may serve: not the workers of a multi-node group.
POD_SELECTOR = f"{LABEL_MANAGED_BY}=arks,{LABEL_APPLICATION},{LABEL_ROLE}!=worker"
# arks.ai/component -> the container port whose /metrics shows the engine's load.
METRICS_PORTS: Mapping[str, str] = {"": "http", "worker": "system"}
FULL = 100  # the capacity of one pod as free as the freest of its model

AppKey = tuple[str, str]  # (namespace, application)
GroupKey = tuple[str, str]  # (namespace, served model name label): pods that compete
Listener = Callable[[set[AppKey]], None]


@dataclass(frozen=True, slots=True)
class PodTarget:
    """One serving engine pod and where its metrics are; a changed pod is a new target."""

    namespace: str
    name: str
    uid: str
    application: str
    served: str  # the arks.ai/served-model-name label
    url: str

    @property
    def app(self) -> AppKey:
        return (self.namespace, self.application)

    @property
    def group(self) -> GroupKey:
        return (self.namespace, self.served)


def _ready(status: Mapping[str, Any]) -> bool:
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def _container_port(spec: Mapping[str, Any], name: str) -> int | None:
    for container in spec.get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == name and port.get("containerPort"):
                return int(port["containerPort"])
    return None


def serving_target(pod: Mapping[str, Any]) -> PodTarget | None:
    """Where to scrape `pod`, or None when it does not serve (yet) or is not an engine."""
    meta: Mapping[str, Any] = pod.get("metadata") or {}
    labels: Mapping[str, str] = meta.get("labels") or {}
    application = labels.get(LABEL_APPLICATION)
    if labels.get(LABEL_MANAGED_BY) != "arks" or not application or meta.get("deletionTimestamp"):
        return None
    if labels.get(LABEL_ROLE) == "worker":
        return None
    port_name = METRICS_PORTS.get(labels.get(LABEL_COMPONENT, ""))
    status: Mapping[str, Any] = pod.get("status") or {}
    ip = status.get("podIP")
    if port_name is None or not ip or not _ready(status):
        return None
    port = _container_port(pod.get("spec") or {}, port_name)
    if port is None:
        return None
    host = f"[{ip}]" if ":" in str(ip) else str(ip)
    return PodTarget(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta["name"]),
        uid=str(meta.get("uid") or ""),
        application=application,
        served=labels.get(LABEL_SERVED_NAME, ""),
        url=f"http://{host}:{port}/metrics",
    )


def application_capacities(
    targets: Iterable[PodTarget], capacities: Mapping[PodTarget, int]
) -> dict[AppKey, int]:
    """Each application's capacity: the sum of its pods' (a pod not weighed yet counts FULL)."""
    out: dict[AppKey, int] = {}
    for target in targets:
        out[target.app] = out.get(target.app, 0) + capacities.get(target, FULL)
    return out


def pod_readings(
    observations: Mapping[PodTarget, Observation], capacities: Mapping[PodTarget, int]
) -> dict[EngineSeries, EngineReading]:
    """A round as exported series: engine = the pod's name, model = its served model name."""
    return {
        (target.namespace, target.served, target.name): EngineReading(
            observation, capacities.get(target)
        )
        for target, observation in observations.items()
    }


def changed_keys(before: Mapping[AppKey, int], after: Mapping[AppKey, int]) -> set[AppKey]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


@dataclass
class PodWeights:
    """Per-pod capacities from scrape rounds: one `WeightTracker` per group of competing pods.

    Pure (no I/O, no clock): feed it each round's observations, get each pod's capacity in
    percent of the freest pod of its group (0 = drained)."""

    settings: WeightSettings = field(default_factory=WeightSettings)
    _trackers: dict[GroupKey, WeightTracker[PodTarget]] = field(default_factory=dict, init=False)

    def update(self, observations: Mapping[PodTarget, Observation]) -> dict[PodTarget, int]:
        groups: dict[GroupKey, dict[PodTarget, Observation]] = {}
        for target, observation in observations.items():
            groups.setdefault(target.group, {})[target] = observation
        # A group without pods is forgotten, like a pod missing from a round.
        self._trackers = {g: self._trackers.get(g) or WeightTracker(self.settings) for g in groups}
        out: dict[PodTarget, int] = {}
        for group, round_ in groups.items():
            for target, weight in self._trackers[group].update(round_).items():
                out[target] = round(FULL * weight / self.settings.max_weight)
        return out


class ClusterLoad:
    """The live capacity of every ArksApplication with serving pods (see the module doc).

    Thread-safe: `capacity_of` may be called from any thread; listeners are called (from the
    informer's or the scrape thread) with the applications whose capacity changed."""

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str | None = None,
        *,
        interval_s: float = 2.0,
        timeout_s: float = 1.0,
        settings: WeightSettings | None = None,
        informer_options: Mapping[str, Any] | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.interval_s = interval_s
        self._metrics = metrics
        self.timeout_s = min(timeout_s, interval_s)
        self.informer = Informer(
            api_client, PODS, namespace, label_selector=POD_SELECTOR, **dict(informer_options or {})
        )
        self.informer.add_handler(self._on_pod)
        self._weights = PodWeights(settings or WeightSettings())
        self._lock = threading.Lock()
        self._targets: dict[tuple[str, str], PodTarget] = {}  # by pod (namespace, name)
        self._pod_capacities: dict[PodTarget, int] = {}
        self._capacities: dict[AppKey, int] = {}
        self._listeners: list[Listener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- read side ----------------------------------------------------------------------------

    def capacity_of(self, namespace: str, application: str) -> int | None:
        """Sum of the application's serving pods' capacities (100 = one free pod), or None."""
        with self._lock:
            return self._capacities.get((namespace, application))

    def capacities(self) -> dict[AppKey, int]:
        with self._lock:
            return dict(self._capacities)

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` with the applications whose capacity changed (before `start`)."""
        self._listeners.append(listener)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.informer.start()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(self._loop,), name="cluster-load", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        if self._loop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                self._loop.call_soon_threadsafe(self._wake.set)
            self._thread.join(timeout_s)
        self.informer.stop(timeout_s=0.0)  # a daemon thread; it leaves with its watch

    def synced(self) -> bool:
        return self.informer.wait_synced(0)

    # --- pods (informer threads) --------------------------------------------------------------

    def _on_pod(self, kind: str, pod: Obj) -> None:
        key = key_of(pod)
        target = None if kind == "DELETED" else serving_target(pod)
        with self._lock:
            if self._targets.get(key) == target:
                return
            if target is None:
                self._targets.pop(key, None)
            else:
                self._targets[key] = target
        self._refresh()

    def _refresh(self) -> None:
        with self._lock:
            after = application_capacities(self._targets.values(), self._pod_capacities)
            changed = changed_keys(self._capacities, after)
            before, self._capacities = self._capacities, after
        for namespace, app in sorted(changed):
            log.info(
                "application %s/%s capacity %s -> %s",
                namespace,
                app,
                before.get((namespace, app)),
                after.get((namespace, app)),
            )
        if changed:
            for listener in self._listeners:
                try:
                    listener(changed)
                except Exception:
                    log.exception("cluster load listener failed")

    # --- scraping (its own thread and event loop) ---------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.run_until_complete(self._scrape_forever())
        finally:
            loop.close()

    async def _scrape_forever(self) -> None:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            scraper: Scraper[PodTarget] = Scraper(
                session, {}, interval_s=self.interval_s, timeout_s=self.timeout_s
            )
            while not self._stopping.is_set():
                started = loop.time()
                try:
                    await self._round(scraper)
                except Exception:  # one bad round must not stop the weights for good
                    log.exception("engine load round failed")
                remaining = self.interval_s - (loop.time() - started)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(remaining, 0.0))

    async def _round(self, scraper: Scraper[PodTarget]) -> None:
        with self._lock:
            targets = list(self._targets.values())
        scraper.set_targets({t: t.url for t in targets})
        observations = await scraper.scrape_once()
        capacities = self._weights.update(observations)
        with self._lock:
            self._pod_capacities = capacities
        if self._metrics is not None:
            self._metrics.publish(pod_readings(observations, capacities))
        self._refresh()
