"""The ADS server (envoy.service.discovery.v3: state of the world and delta) over grpc.aio.

A thin servicer: each stream has one `StreamState` (or `DeltaStreamState`); requests from Envoy
and changes of the cache both wake the same loop, which answers with whatever the state says is
due. A NACK is
logged once per (node, type, version), counted, and kept as a `Rejection` until that node
ACKs a later version of the type; the rejected version is not re-sent, so Envoy stays on its
last good configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from arks.adapters.grpc_server import GrpcServer, start_grpc
from controller.xds.cache import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    RATE_LIMIT_CONFIG,
    ROUTE,
    Snapshot,
    SnapshotCache,
)
from controller.xds.delta import DeltaRequest, DeltaStreamState
from controller.xds.stream import Kind, Received, StreamState, XdsRequest

log = logging.getLogger(__name__)

_TYPE_LABELS = {
    LISTENER: "lds",
    ROUTE: "rds",
    CLUSTER: "cds",
    ENDPOINT: "eds",
    RATE_LIMIT_CONFIG: "rls",  # envoyproxy/ratelimit's configuration
}


def type_label(type_url: str) -> str:
    return _TYPE_LABELS.get(type_url, type_url.rpartition("/")[2])


@dataclass(frozen=True)
class Rejection:
    """Envoy `node` refused `version` of `type_url`; it runs its last good config of that type."""

    node: str
    type_url: str
    version: str
    message: str


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.pushes = Counter(
            "arks_xds_pushes_total",
            "xDS responses sent, by type (lds, rds, cds, eds, rls).",
            ["type"],
            registry=registry,
        )
        self.nacks = Counter(
            "arks_xds_nacks_total",
            "xDS responses Envoy rejected, by type.",
            ["type"],
            registry=registry,
        )
        self.connected = Gauge("arks_xds_connected_streams", "Open ADS streams.", registry=registry)
        self.answered = Histogram(
            "arks_xds_answer_seconds",
            "Time from sending an xDS response to Envoy's ACK or NACK of it (Envoy applies it in "
            "between), by type.",
            ["type"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        self.resources = Counter(
            "arks_xds_resources_sent_total",
            "Resources sent in xDS responses, by type: all of the type per state-of-the-world "
            "response, only the changed ones per delta response.",
            ["type"],
            registry=registry,
        )
        for label in _TYPE_LABELS.values():  # every known type exists at 0 from the start
            for counter in (self.pushes, self.nacks, self.resources):
                counter.labels(label)


class _Ended:
    """Sentinel: Envoy closed its side of the stream."""


_CHANGED: Final = "changed"
_ENDED: Final = _Ended()
_Req = TypeVar("_Req", discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest)


class _Pushed(Protocol):
    """What the stream loop reads of a response of either protocol."""

    @property
    def type_url(self) -> str: ...
    @property
    def nonce(self) -> str: ...
    @property
    def resources(self) -> Sized: ...


_Resp = TypeVar("_Resp", bound=_Pushed, covariant=True)


class _State(Protocol[_Resp]):
    """A stream's protocol bookkeeping: `StreamState` or `DeltaStreamState`."""

    node: str

    def due(self, snapshot: Snapshot | None) -> Sequence[_Resp]: ...


class AggregatedDiscoveryService(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, cache: SnapshotCache, metrics: XdsMetrics) -> None:
        self._cache = cache
        self._metrics = metrics
        self._lock = threading.Lock()  # rejected() may be read from the controller's threads
        self._rejections: dict[tuple[str, str], Rejection] = {}
        self._streams_per_node: dict[str, int] = {}

    def rejected(self) -> list[Rejection]:
        """The NACKs in force now: per node and type, the last version Envoy refused."""
        with self._lock:
            return sorted(self._rejections.values(), key=lambda r: (r.node, r.type_url))

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        state = StreamState()
        stream = self._serve(
            request_iterator, state, lambda m: state.receive(_request(m)), supersedes=True
        )
        async for response in stream:
            log.debug(
                "%s: sending %s version %s",
                state.node,
                type_label(response.type_url),
                response.version,
            )
            yield discovery_pb2.DiscoveryResponse(
                version_info=response.version,
                resources=response.resources,
                type_url=response.type_url,
                nonce=response.nonce,
            )

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        state = DeltaStreamState()
        stream = self._serve(
            request_iterator, state, lambda m: state.receive(_delta_request(m)), supersedes=False
        )
        async for response in stream:
            log.debug(
                "%s: sending %d %s, removing %d",
                state.node,
                len(response.resources),
                type_label(response.type_url),
                len(response.removed),
            )
            yield discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=response.system_version,
                resources=[
                    discovery_pb2.Resource(name=r.name, version=r.version, resource=r.resource)
                    for r in response.resources
                ],
                type_url=response.type_url,
                removed_resources=response.removed,
                nonce=response.nonce,
            )

    async def _serve(
        self,
        requests: AsyncIterator[_Req],
        state: _State[_Resp],
        receive: Callable[[_Req], Received],
        *,
        supersedes: bool,
    ) -> AsyncIterator[_Resp]:
        """One stream of either protocol: Envoy's requests and the cache's changes wake one
        loop, which yields whatever the stream's state says is due."""
        events: asyncio.Queue[_Req | str | _Ended] = asyncio.Queue()
        tasks = [
            asyncio.create_task(_read(requests, events)),
            asyncio.create_task(_watch(self._cache, events)),
        ]
        timer = _AnswerTimer(self._metrics.answered, supersedes=supersedes)
        self._metrics.connected.inc()
        try:
            while not isinstance(event := await events.get(), _Ended):
                if not isinstance(event, str):  # a request, not "the cache changed"
                    self._opened(state, event.node.id)
                    received = receive(event)
                    self._record(state.node, received)
                    timer.answered(event.type_url, event.response_nonce, received)
                for response in state.due(self._cache.get(state.node)):
                    self._sent(response.type_url, len(response.resources))
                    timer.sent(response.type_url, response.nonce)
                    yield response
        finally:
            for task in tasks:
                task.cancel()
            self._metrics.connected.dec()
            self._stream_ended(state.node)

    def _sent(self, type_url: str, resources: int) -> None:
        label = type_label(type_url)
        self._metrics.pushes.labels(label).inc()
        self._metrics.resources.labels(label).inc(resources)

    def _opened(self, state: _State[Any], node: str) -> None:
        """Note the stream's node from its first request (later ones may leave it out)."""
        if state.node:
            return
        state.node = node
        with self._lock:
            self._streams_per_node[node] = self._streams_per_node.get(node, 0) + 1
        log.info("xDS stream opened by node %r", node)

    def _record(self, node: str, received: Received) -> None:
        """A NACK kept as a Rejection (logged once per version) until an ACK of the type clears it."""
        key = (node, received.type_url)
        if received.kind is Kind.NACK:
            self._metrics.nacks.labels(type_label(received.type_url)).inc()
            rejection = Rejection(node, received.type_url, received.version, received.message)
            with self._lock:
                known = self._rejections.get(key)
                self._rejections[key] = rejection
            if known is None or known.version != rejection.version:
                log.error(
                    "node %r rejected %s version %s; it keeps its last good config: %s",
                    node,
                    type_label(received.type_url),
                    received.version,
                    received.message,
                )
        elif received.kind is Kind.ACK:
            with self._lock:
                cleared = self._rejections.pop(key, None)
            if cleared is not None:
                log.info(
                    "node %r accepted %s version %s",
                    node,
                    type_label(received.type_url),
                    received.version,
                )
        elif received.kind is Kind.SUBSCRIBE and received.type_url not in _TYPE_LABELS:
            log.warning(
                "node %r subscribed to %s, which this server does not serve",
                node,
                received.type_url,
            )

    def _stream_ended(self, node: str) -> None:
        if not node:
            return
        with self._lock:
            left = self._streams_per_node.get(node, 1) - 1
            if left > 0:
                self._streams_per_node[node] = left
                return
            self._streams_per_node.pop(node, None)
            # Nobody is left to be running the rejected config's predecessor: no stale status.
            for key in [k for k in self._rejections if k[0] == node]:
                del self._rejections[key]
        log.info("xDS stream of node %r closed", node)


class _AnswerTimer:
    """When each response of a stream went out, until Envoy answers it (ACK or NACK).

    Under the state of the world an answer also settles the type's older responses, which
    Envoy will never answer (`supersedes`); under delta every response is answered."""

    def __init__(self, histogram: Histogram, *, supersedes: bool) -> None:
        self._histogram = histogram
        self._supersedes = supersedes
        self._sent: dict[tuple[str, str], float] = {}

    def sent(self, type_url: str, nonce: str) -> None:
        self._sent[(type_url, nonce)] = time.monotonic()

    def answered(self, type_url: str, nonce: str, received: Received) -> None:
        if received.kind not in (Kind.ACK, Kind.NACK):
            return
        at = self._sent.pop((type_url, nonce), None)
        if at is not None:
            self._histogram.labels(type_label(type_url)).observe(time.monotonic() - at)
        if self._supersedes:
            for key in [k for k in self._sent if k[0] == type_url]:
                del self._sent[key]


def _request(message: discovery_pb2.DiscoveryRequest) -> XdsRequest:
    return XdsRequest(
        type_url=message.type_url,
        names=message.resource_names,
        version=message.version_info,
        nonce=message.response_nonce,
        error=message.error_detail.message if message.HasField("error_detail") else None,
    )


def _delta_request(message: discovery_pb2.DeltaDiscoveryRequest) -> DeltaRequest:
    return DeltaRequest(
        type_url=message.type_url,
        subscribe=message.resource_names_subscribe,
        unsubscribe=message.resource_names_unsubscribe,
        initial_versions=dict(message.initial_resource_versions),
        nonce=message.response_nonce,
        error=message.error_detail.message if message.HasField("error_detail") else None,
    )


async def _read(requests: AsyncIterator[Message], events: asyncio.Queue[Any]) -> None:
    try:
        async for request in requests:
            events.put_nowait(request)
    except asyncio.CancelledError:
        raise
    except Exception as err:  # the stream broke; the loop ends as if Envoy had closed it
        log.debug("xDS stream read failed: %s", err)
    events.put_nowait(_ENDED)


async def _watch(cache: SnapshotCache, events: asyncio.Queue[Any]) -> None:
    seen = cache.generation
    while True:
        seen = await cache.wait(seen)
        events.put_nowait(_CHANGED)


class XdsServer:
    """The ADS service on its own grpc.aio server: `await start()`, `await stop()`."""

    def __init__(self, cache: SnapshotCache, address: str, registry: CollectorRegistry) -> None:
        self.address = address
        self.service = AggregatedDiscoveryService(cache, XdsMetrics(registry))
        self.port = 0
        self._server: GrpcServer | None = None

    async def start(self) -> int:
        """Bind and serve; returns the port (useful with `host:0`)."""

        def register(server: grpc.aio.Server) -> None:
            ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.service, server)

        self._server = await start_grpc(self.address, register)
        self.port = self._server.port
        log.info("xDS (ADS) serving on %s", self.address.rpartition(":")[0] + f":{self.port}")
        return self.port

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            with contextlib.suppress(asyncio.CancelledError):
                await server.stop(grace)

    def rejected(self) -> list[Rejection]:
        return self.service.rejected()
