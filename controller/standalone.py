"""The controller without Kubernetes: policy from a file, Envoy programmed over xDS.

`python -m controller --policy FILE --xds-address HOST:PORT` (what `arks up` runs). Every
round it reloads the policy if the file changed, scrapes the `/metrics` of the engines whose
endpoint weighs by load, turns their load into weights (`controller.load.weights`), renders
Envoy's listener, routes, clusters and engines (`arks.envoy_config.xds_resources`) and hands
a new snapshot to the xDS server when anything changed. Envoy keeps its last configuration
while this process is away and reconnects when it is back.

`/status` (JSON) shows the weights with the load behind them and any update Envoy rejected.
`/metrics` has the same `ControllerMetrics` as in Kubernetes mode (the engine load of each round,
`engine` = the address; the leader gauge at 1: a standalone controller is the only one) and the
xDS server's series.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import aiohttp.web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from arks.adapters.scrape import Scraper
from arks.api import STATIC, SocketAddress
from arks.engine_metrics import EngineLoad, Observation
from arks.envoy_config import EnvoySettings, routed_backends, xds_resources
from arks.policy import FilePolicySource, Policy
from controller.load.metrics import EngineReading, EngineSeries
from controller.load.weights import WeightSettings, WeightTracker
from controller.metrics import ControllerMetrics
from controller.xds.cache import SnapshotCache, SnapshotError, snapshot_from_json
from controller.xds.server import XdsServer

log = logging.getLogger(__name__)


def load_weighted_engines(policy: Policy) -> dict[SocketAddress, str]:
    """The engines to scrape: those of endpoints not on static weights, with their metrics URL."""
    engines: dict[SocketAddress, str] = {}
    for endpoint in policy.endpoints.values():
        if endpoint.weighting == STATIC:
            continue
        for _ref, backend in routed_backends(endpoint, policy):
            for address in backend.endpoints:
                engines[address] = f"http://{address.address}:{address.port}/metrics"
    return engines


ModelKey = tuple[str, str]  # (namespace, model)


def served_models(policy: Policy) -> dict[SocketAddress, list[ModelKey]]:
    """The models each load-weighted engine serves, for the labels of its series."""
    served: dict[SocketAddress, list[ModelKey]] = {}
    for endpoint in policy.endpoints.values():
        if endpoint.weighting == STATIC:
            continue
        model = (endpoint.key.namespace, endpoint.model)
        for _ref, backend in routed_backends(endpoint, policy):
            for address in backend.endpoints:
                if model not in served.setdefault(address, []):
                    served[address].append(model)
    return served


def engine_readings(
    observations: Mapping[SocketAddress, Observation],
    weights: Mapping[SocketAddress, int],
    served: Mapping[SocketAddress, list[ModelKey]],
) -> dict[EngineSeries, EngineReading]:
    """A round as exported series: one per engine and model it serves, engine = `address:port`
    (an engine serving two models has the same load under each)."""
    out: dict[EngineSeries, EngineReading] = {}
    for engine, observation in observations.items():
        for namespace, model in served.get(engine, ()):
            series = (namespace, model, f"{engine.address}:{engine.port}")
            out[series] = EngineReading(observation, weights.get(engine))
    return out


class StandaloneMetrics(ControllerMetrics):
    """The controller's series, as in Kubernetes mode, and the snapshots this one publishes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.leader.set(1)
        self.snapshots = Counter(
            "arks_xds_snapshots",
            "Snapshots handed to the xDS server since start.",
            registry=self.registry,
        )


@dataclass
class Standalone:
    source: FilePolicySource
    envoy: EnvoySettings
    xds_address: str
    interval_s: float = 1.0
    scrape_timeout_s: float = 0.8
    weight_settings: WeightSettings = field(default_factory=WeightSettings)
    metrics: StandaloneMetrics = field(default_factory=StandaloneMetrics)
    cache: SnapshotCache = field(default_factory=SnapshotCache)
    tracker: WeightTracker[SocketAddress] = field(init=False)
    weights: dict[SocketAddress, int] = field(default_factory=dict)
    loads: dict[SocketAddress, EngineLoad | str] = field(default_factory=dict)
    _rendered: str = ""
    _published: int = 0
    server: XdsServer = field(init=False)

    def __post_init__(self) -> None:
        self.tracker = WeightTracker(self.weight_settings)
        self.server = XdsServer(self.cache, self.xds_address, self.metrics.registry)

    @property
    def ready(self) -> bool:
        return self._published > 0

    def publish(self, policy: Policy) -> bool:
        """Hand the xDS server a snapshot for `policy` and the current weights, if it changed."""
        resources = xds_resources(policy, self.envoy, self.weights)
        rendered = json.dumps(resources, sort_keys=True)
        if rendered == self._rendered:
            return False
        try:
            snapshot = snapshot_from_json(policy.version, resources)
        except SnapshotError as err:  # a renderer bug: keep serving the last good snapshot
            log.error("snapshot for policy %s not built: %s", policy.version, err)
            return False
        self.cache.set(snapshot)
        self._rendered = rendered
        self._published += 1
        self.metrics.snapshots.inc()
        return True

    def weigh(
        self,
        observations: Mapping[SocketAddress, Observation],
        served: Mapping[SocketAddress, list[ModelKey]] | None = None,
    ) -> None:
        """New weights from one scrape round (pure decisions in the tracker), exported with the
        load behind them under the models each engine serves (`served`)."""
        weights = self.tracker.update(observations)
        for engine, weight in weights.items():
            if self.weights.get(engine) != weight:
                log.info(
                    "engine %s:%d weight %s -> %d",
                    engine.address,
                    engine.port,
                    self.weights.get(engine),
                    weight,
                )
        self.weights = dict(weights)
        self.metrics.engines.publish(engine_readings(observations, weights, served or {}))
        self.loads = {
            engine: observation if isinstance(observation, EngineLoad) else observation.reason
            for engine, observation in observations.items()
        }

    async def round(self, scraper: Scraper[SocketAddress]) -> None:
        self.source.reload_if_changed()
        policy = self.source.current()
        scraper.set_targets(load_weighted_engines(policy))
        self.weigh(await scraper.scrape_once(), served_models(policy))
        if self.publish(policy):
            log.info("xDS snapshot %d published (policy %s)", self._published, policy.version)

    async def run(self, stop: asyncio.Event) -> None:
        await self.server.start()
        self.publish(self.source.current())  # Envoy gets its listener before the first scrape
        async with aiohttp.ClientSession() as session:
            scraper: Scraper[SocketAddress] = Scraper(
                session, {}, interval_s=self.interval_s, timeout_s=self.scrape_timeout_s
            )
            while not stop.is_set():
                started = asyncio.get_running_loop().time()
                try:
                    await self.round(scraper)
                except Exception:  # one bad round must not stop the control plane
                    log.exception("standalone round failed")
                elapsed = asyncio.get_running_loop().time() - started
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(self.interval_s - elapsed, 0.05))
        await self.server.stop()

    def status(self) -> dict[str, Any]:
        policy = self.source.current()
        engines = []
        for engine in sorted(self.weights, key=lambda e: (e.address, e.port)):
            load = self.loads.get(engine)
            entry: dict[str, Any] = {
                "engine": f"{engine.address}:{engine.port}",
                "weight": self.weights[engine],
            }
            if isinstance(load, EngineLoad):
                entry["load"] = {
                    "waiting": load.waiting,
                    "running": load.running,
                    "kv_cache_usage": load.kv_cache_usage,
                }
            elif load is not None:
                entry["error"] = load
            engines.append(entry)
        return {
            "policy": policy.version,
            "snapshots": self._published,
            "engines": engines,
            "rejected": [
                {"node": r.node, "type": r.type_url, "version": r.version, "message": r.message}
                for r in self.server.rejected()
            ],
        }


async def serve_http(app_state: Standalone, address: str, port: int) -> aiohttp.web.AppRunner:
    async def metrics(_: aiohttp.web.Request) -> aiohttp.web.Response:
        body = generate_latest(app_state.metrics.registry)
        return aiohttp.web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(text="ok\n")

    async def readyz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        if app_state.ready:
            return aiohttp.web.Response(text="ok\n")
        return aiohttp.web.Response(status=503, text="no snapshot yet\n")

    async def status(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response(app_state.status())

    app = aiohttp.web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, address, port).start()
    return runner
