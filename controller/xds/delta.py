"""What one delta ADS stream is owed: pure bookkeeping, no gRPC (cf. `stream.py`, the state of
the world's).

Delta xDS sends resources one by one, each with its own version, and names the ones that went
away; Envoy says what it subscribes to and unsubscribes from as it goes. Per type URL the
stream keeps:

* the subscription: wildcard (every resource of the type: LDS and CDS by default) and/or names;
* what Envoy holds, by name and version: seeded from `initial_resource_versions` when Envoy
  reconnects (to a restarted controller, say), so only what changed meanwhile is sent again;
* the responses awaiting an answer, by nonce, with what Envoy held before each: a NACK rolls
  that back, and the versions it refused are not sent again until they change, so Envoy stays
  on its last good configuration as under the state of the world;
* names to send even though Envoy holds them: those it subscribes to again (a cluster being
  replaced asks for its endpoints anew), and the endpoints of every cluster just sent, which
  cannot finish warming without them.

A name Envoy asks for that the snapshot lacks is answered once in `removed_resources` (it does
not exist), so Envoy stops waiting for it.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from google.protobuf import any_pb2

from controller.xds.cache import CLUSTER, ENDPOINT, RESOURCE_TYPES, WILDCARD_TYPES, Snapshot
from controller.xds.stream import Kind, Received

_ABSENT = ""  # in `held`: Envoy was told the resource does not exist


@dataclass(frozen=True)
class DeltaRequest:
    """The parts of a DeltaDiscoveryRequest the protocol turns on."""

    type_url: str
    subscribe: Collection[str] = ()
    unsubscribe: Collection[str] = ()
    initial_versions: Mapping[str, str] = field(default_factory=dict)
    nonce: str = ""
    error: str | None = None  # error_detail's message: this is a NACK


@dataclass(frozen=True)
class VersionedResource:
    name: str
    version: str
    resource: any_pb2.Any


@dataclass(frozen=True)
class DeltaResponse:
    type_url: str
    system_version: str  # the snapshot's version of the type, for logs and NACK reports
    nonce: str
    resources: list[VersionedResource]
    removed: list[str]


@dataclass
class _Sent:
    version: str
    before: dict[str, str | None]  # what Envoy held of each name in the response (None: nothing)
    refused: dict[str, str]  # the versions it carried


@dataclass
class _Subscription:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    held: dict[str, str] = field(default_factory=dict)
    awaiting: dict[str, _Sent] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    resend: set[str] = field(default_factory=set)

    def wants(self, snapshot_names: frozenset[str]) -> set[str]:
        return set(snapshot_names) | self.names if self.wildcard else set(self.names)


@dataclass
class DeltaStreamState:
    node: str = ""
    _subscriptions: dict[str, _Subscription] = field(default_factory=dict)
    _nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def subscribed(self) -> list[str]:
        return list(self._subscriptions)

    def receive(self, request: DeltaRequest) -> Received:
        sub = self._subscriptions.get(request.type_url)
        first = sub is None
        if sub is None:
            sub = self._subscriptions[request.type_url] = _Subscription()
            # No names on the first request of a wildcard type: the legacy wildcard.
            sub.wildcard = request.type_url in WILDCARD_TYPES and not request.subscribe
            sub.held = {
                name: version for name, version in request.initial_versions.items() if version
            }
        for name in request.subscribe:
            if name == "*":
                sub.wildcard = True
                continue
            sub.names.add(name)
            if not first:  # a subscription renewed: Envoy wants it again, held or not
                sub.resend.add(name)
        for name in request.unsubscribe:
            if name == "*":
                sub.wildcard = False
                continue
            sub.names.discard(name)
            sub.held.pop(name, None)
            sub.resend.discard(name)
        sent = sub.awaiting.pop(request.nonce, None) if request.nonce else None
        if sent is None:  # a first request, a change of subscription, or a nonce of another server
            return Received(Kind.SUBSCRIBE, request.type_url, "")
        if request.error is None:
            return Received(Kind.ACK, request.type_url, sent.version)
        for name, before in sent.before.items():  # Envoy keeps what it had
            if before is None:
                sub.held.pop(name, None)
            else:
                sub.held[name] = before
        sub.rejected.update(sent.refused)
        return Received(Kind.NACK, request.type_url, sent.version, request.error)

    def due(self, snapshot: Snapshot | None) -> list[DeltaResponse]:
        """The responses owed now, in push order (clusters, endpoints, listeners, routes)."""
        if snapshot is None:
            return []
        out: list[DeltaResponse] = []
        clusters_sent: set[str] = set()
        for type_url in RESOURCE_TYPES:
            sub = self._subscriptions.get(type_url)
            if sub is None:
                continue
            if type_url == ENDPOINT:
                sub.resend |= clusters_sent
            response = self._due(type_url, sub, snapshot)
            if response is None:
                continue
            if type_url == CLUSTER:
                clusters_sent = {r.name for r in response.resources}
            out.append(response)
        return out

    def _due(self, type_url: str, sub: _Subscription, snapshot: Snapshot) -> DeltaResponse | None:
        versions = snapshot.resource_versions[type_url]
        present = frozenset(versions)
        wanted = sub.wants(present)
        updated = []
        for name in sorted(wanted & present):
            version = versions[name]
            forced = name in sub.resend
            if not forced and (sub.held.get(name) == version or sub.rejected.get(name) == version):
                continue
            updated.append(VersionedResource(name, version, snapshot.packed(type_url, [name])[0]))
        gone = sorted(
            name for name, held in sub.held.items() if name not in present and held != _ABSENT
        )
        unknown = sorted(name for name in sub.names - present if name not in sub.held)
        sub.resend -= wanted & present
        removed = gone + unknown
        if not updated and not removed:
            return None
        nonce = str(next(self._nonces))
        before = {r.name: sub.held.get(r.name) for r in updated} | {
            name: sub.held.get(name) for name in removed
        }
        sub.awaiting[nonce] = _Sent(
            snapshot.versions[type_url], before, {r.name: r.version for r in updated}
        )
        for resource in updated:
            sub.held[resource.name] = resource.version
            sub.rejected.pop(resource.name, None)
        for name in gone:  # still asked for by name: known not to exist, as `unknown` below
            if name in sub.names:
                sub.held[name] = _ABSENT
            else:
                del sub.held[name]
        for name in unknown:
            sub.held[name] = _ABSENT
        return DeltaResponse(type_url, snapshot.versions[type_url], nonce, updated, removed)
