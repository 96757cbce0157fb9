"""What one ADS stream (state of the world) is owed: pure bookkeeping, no gRPC.

Per type URL the stream remembers what Envoy subscribed to and what was last sent with which
nonce. A request answers the latest response (ACK, or NACK with an error) or is stale (it
answers an older nonce, and Envoy will speak again about the newer one: ignored, as the xDS
protocol asks). A type is due a response when the snapshot's version of it, or the names Envoy
asks for, differ from what was last sent (and endpoints whenever clusters were sent); so a
NACKed version is not sent again on that stream until the snapshot changes.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Collection
from dataclasses import dataclass, field

from google.protobuf import any_pb2

from controller.xds.cache import CLUSTER, ENDPOINT, RESOURCE_TYPES, WILDCARD_TYPES, Snapshot


@dataclass(frozen=True)
class XdsRequest:
    """The parts of a DiscoveryRequest the protocol turns on."""

    type_url: str
    names: Collection[str] = ()
    version: str = ""
    nonce: str = ""
    error: str | None = None  # error_detail's message: this is a NACK


class Kind(enum.Enum):
    SUBSCRIBE = "subscribe"  # first request for a type on this stream (or a fresh one)
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"


@dataclass(frozen=True)
class Received:
    kind: Kind
    type_url: str
    version: str = ""  # ACK: the version now in force; NACK: the version rejected
    message: str = ""


@dataclass(frozen=True)
class Response:
    type_url: str
    version: str
    nonce: str
    resources: list[any_pb2.Any]


@dataclass
class _Subscription:
    wildcard: bool
    names: frozenset[str]
    nonce: str = ""
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None  # None: everything (wildcard)


@dataclass
class StreamState:
    node: str = ""
    _subscriptions: dict[str, _Subscription] = field(default_factory=dict)
    _nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def subscribed(self) -> list[str]:
        return list(self._subscriptions)

    def receive(self, request: XdsRequest) -> Received:
        sub = self._subscriptions.get(request.type_url)
        if sub is not None and sub.nonce and request.nonce and request.nonce != sub.nonce:
            return Received(Kind.STALE, request.type_url)
        names = frozenset(request.names)
        wildcard = request.type_url in WILDCARD_TYPES and (not names or "*" in names)
        names = names - {"*"}
        if sub is None or not sub.nonce or not request.nonce:
            # A fresh subscription, also one still carrying a nonce of an earlier server.
            self._subscriptions[request.type_url] = _Subscription(wildcard, names)
            return Received(Kind.SUBSCRIBE, request.type_url, request.version)
        sub.wildcard, sub.names = wildcard, names
        if request.error is not None:
            return Received(Kind.NACK, request.type_url, sub.sent_version or "", request.error)
        return Received(Kind.ACK, request.type_url, request.version)

    def due(self, snapshot: Snapshot | None) -> list[Response]:
        """The responses owed now, in push order (clusters, endpoints, listeners, routes)."""
        if snapshot is None:
            return []
        out: list[Response] = []
        for type_url in RESOURCE_TYPES:
            sub = self._subscriptions.get(type_url)
            if sub is None or (not sub.wildcard and not sub.names):
                continue  # not subscribed, or Envoy wants none of this type now
            version = snapshot.versions[type_url]
            names = None if sub.wildcard else sub.names
            # A cluster Envoy replaces warms until it gets its endpoints again, and Envoy asks
            # for them with the names and version it already has: after clusters, always
            # re-send endpoints (they arrive after the clusters on the same stream).
            clusters_sent = type_url == ENDPOINT and any(r.type_url == CLUSTER for r in out)
            if sub.sent_version == version and sub.sent_names == names and not clusters_sent:
                continue
            sub.nonce = str(next(self._nonces))
            sub.sent_version, sub.sent_names = version, names
            out.append(Response(type_url, version, sub.nonce, snapshot.packed(type_url, names)))
        return out
