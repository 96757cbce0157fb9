"""The engines of picking endpoints in a cluster: the hosts of the Envoy cluster that Envoy
Gateway builds for each endpoint's HTTPRoute (`route_hosts`, `picking_endpoints`: pure).

`ClusterEngines` is the I/O: informers on managed HTTPRoutes, Services and EndpointSlices. The
Envoy Gateway rules it mirrors: docs/architecture.md, section 11.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kubernetes.client import ApiClient

from arks.adapters.kube.queue import Key
from arks.adapters.kube.rest import Obj
from arks.adapters.kube.watch import Handler, Informer, key_of, start_all
from arks.api import Backend, ObjectKey, SocketAddress
from arks.envoy_config import PICKED_WEIGHTINGS
from arks.policy import Policy
from arks.resources import ENDPOINTSLICES, HTTPROUTES, SERVICES, Resource
from arks.wire import ANNOTATION_SERVED_NAME, LABEL_MANAGED_BY
from extproc.picking.scraping import backend_hosts
from extproc.picking.state import EndpointKey, host

log = logging.getLogger(__name__)

MANAGED_ROUTES = f"{LABEL_MANAGED_BY}=arks"
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
MANAGED_SERVICES = MANAGED_ROUTES
MANAGED_SLICES = f"{MANAGED_ROUTES},{LABEL_SERVICE_NAME}"
BACKEND_GROUP = "gateway.envoyproxy.io"

T = TypeVar("T")


# --- what is read from the objects (pure) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteRef:
    """One backendRef of a route, defaults applied."""

    kind: str
    group: str
    namespace: str
    name: str
    port: int | None
    weight: int


@dataclass(frozen=True, slots=True)
class Route:
    namespace: str
    name: str
    model: str
    refs: tuple[RouteRef, ...]


@dataclass(frozen=True, slots=True)
class Port:
    """A Service port (`port` is the Service's) or an EndpointSlice port (the pods')."""

    name: str
    port: int | None
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    ports: tuple[Port, ...]


@dataclass(frozen=True, slots=True)
class Slice:
    """An EndpointSlice: whose it is, its ports and the addresses of its routable endpoints."""

    namespace: str
    name: str
    service: str
    ports: tuple[Port, ...]
    addresses: tuple[str, ...]


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_route(obj: Mapping[str, Any]) -> Route:
    meta = _meta(obj)
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    model = (meta.get("annotations") or {}).get(ANNOTATION_SERVED_NAME) or name
    refs = []
    for rule in (obj.get("spec") or {}).get("rules") or []:
        for ref in rule.get("backendRefs") or []:
            weight = _int(ref.get("weight"))
            refs.append(
                RouteRef(
                    kind=str(ref.get("kind") or "Service"),
                    group=str(ref.get("group") or ""),
                    namespace=str(ref.get("namespace") or namespace),
                    name=str(ref.get("name") or ""),
                    port=_int(ref.get("port")),
                    weight=1 if weight is None else weight,
                )
            )
    return Route(namespace, name, str(model), tuple(refs))


def _port(obj: Mapping[str, Any]) -> Port:
    return Port(
        str(obj.get("name") or ""), _int(obj.get("port")), str(obj.get("protocol") or "TCP")
    )


def parse_service(obj: Mapping[str, Any]) -> Service:
    meta = _meta(obj)
    ports = tuple(_port(p) for p in (obj.get("spec") or {}).get("ports") or [])
    return Service(str(meta.get("namespace") or ""), str(meta.get("name") or ""), ports)


def routable(conditions: Mapping[str, Any] | None) -> bool:
    """Whether Envoy Gateway makes the endpoint a host that takes new requests (module doc)."""
    c = conditions or {}
    ready, serving, terminating = c.get("ready"), c.get("serving"), c.get("terminating")
    if serving is not None and terminating is not None:
        return bool(serving) and not terminating
    # `ready` is false while terminating (unless the Service publishes unready addresses).
    return ready is True or (ready is None and not terminating)


def parse_slice(obj: Mapping[str, Any]) -> Slice:
    meta = _meta(obj)
    service = str((meta.get("labels") or {}).get(LABEL_SERVICE_NAME) or "")
    addresses: list[str] = []
    if obj.get("addressType") != "FQDN":
        for endpoint in obj.get("endpoints") or []:
            if routable(endpoint.get("conditions")):
                addresses.extend(str(a) for a in endpoint.get("addresses") or [])
    ports = tuple(_port(p) for p in obj.get("ports") or [])
    return Slice(
        str(meta.get("namespace") or ""),
        str(meta.get("name") or ""),
        service,
        ports,
        tuple(addresses),
    )


@dataclass(frozen=True)
class ClusterView:
    """Routes, Services and EndpointSlices as of one moment, indexed for `route_hosts`."""

    routes: Mapping[EndpointKey, Route] = field(default_factory=dict)  # by (namespace, model)
    services: Mapping[Key, Service] = field(default_factory=dict)  # by (namespace, name)
    slices: Mapping[Key, tuple[Slice, ...]] = field(default_factory=dict)  # by (namespace, service)

    @classmethod
    def build(
        cls, routes: Iterable[Route], services: Iterable[Service], slices: Iterable[Slice]
    ) -> ClusterView:
        by_model: dict[EndpointKey, Route] = {}
        # Two routes claiming one model (not the controller's doing): the one named after it wins.
        for route in sorted(routes, key=lambda r: (r.name != r.model, r.name)):
            by_model.setdefault((route.namespace, route.model), route)
        by_service: dict[Key, list[Slice]] = {}
        for s in sorted(slices, key=lambda s: (s.namespace, s.name)):
            by_service.setdefault((s.namespace, s.service), []).append(s)
        return cls(
            by_model,
            {(s.namespace, s.name): s for s in services},
            {key: tuple(group) for key, group in by_service.items()},
        )


def service_hosts(ref: RouteRef, view: ClusterView) -> list[str]:
    service = view.services.get((ref.namespace, ref.name))
    if service is None or ref.port is None:
        return []
    port = next((p for p in service.ports if p.port == ref.port), None)
    if port is None:
        return []
    out: list[str] = []
    for s in view.slices.get((ref.namespace, ref.name), ()):
        target = next(
            (p.port for p in s.ports if (p.name, p.protocol) == (port.name, port.protocol)), None
        )
        if target is not None:
            out.extend(host(SocketAddress(address, target)) for address in s.addresses)
    return out


def route_hosts(
    route: Route, view: ClusterView, backends: Mapping[ObjectKey, Backend]
) -> list[str]:
    """The hosts of the Envoy cluster Envoy Gateway builds for `route`, deduplicated, in the
    order of its backendRefs (module doc)."""
    out: list[str] = []
    for ref in route.refs:
        if ref.weight <= 0:
            continue
        if ref.kind == "Service" and not ref.group:
            out.extend(service_hosts(ref, view))
        elif ref.kind == "Backend" and ref.group == BACKEND_GROUP:
            backend = backends.get(ObjectKey(ref.namespace, ref.name))
            if backend is not None:
                out.extend(host(a) for a in backend.endpoints)
    return list(dict.fromkeys(out))


def picking_endpoints(policy: Policy, view: ClusterView) -> dict[EndpointKey, list[str]]:
    """(namespace, model) -> engine hosts, for every endpoint whose weighting picks per request:
    its route's hosts, or its own Backends' while no route is known (module doc)."""
    out: dict[EndpointKey, list[str]] = {}
    for endpoint in policy.endpoints.values():
        if endpoint.weighting not in PICKED_WEIGHTINGS:
            continue
        key = (endpoint.key.namespace, endpoint.model)
        route = view.routes.get(key)
        out[key] = (
            route_hosts(route, view, policy.backends) if route else backend_hosts(endpoint, policy)
        )
    return out


# --- the watches (I/O) ---------------------------------------------------------------------------


class ClusterEngines:
    """Informers on managed HTTPRoutes, Services and EndpointSlices (all namespaces, or
    `namespace`), folded into a parsed index; `picking_endpoints` is `scraping.scrape_forever`'s engine-set
    function in a cluster. Informers call back from their threads; the scrape loop reads a
    snapshot taken under the lock (rebuilt only after a change)."""

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str | None = None,
        informer_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._routes: dict[Key, Route] = {}
        self._services: dict[Key, Service] = {}
        self._slices: dict[Key, Slice] = {}
        self._version = 0
        self._view = ClusterView()
        self._view_version = 0

        def informer(resource: Resource, selector: str | None, handler: Handler) -> Informer:
            made = Informer(
                api_client, resource, namespace, label_selector=selector, **(informer_options or {})
            )
            made.add_handler(handler)
            return made

        self._informers = (
            informer(HTTPROUTES, MANAGED_ROUTES, self._handler(self._routes, parse_route)),
            # Only the Services labelled as Arks's (the applications' Services the controller
            # renders; a routeConfigs Service must carry the label to be picked among), and
            # their slices (the EndpointSlice controller copies a Service's labels to its
            # slices): a cluster's unrelated Services never enter memory.
            informer(SERVICES, MANAGED_SERVICES, self._handler(self._services, parse_service)),
            # Slices without the service-name label belong to no Service.
            informer(ENDPOINTSLICES, MANAGED_SLICES, self._handler(self._slices, parse_slice)),
        )

    def cached(self) -> int:
        """How many objects its informers' caches hold in all."""
        return sum(i.size() for i in self._informers)

    def _handler(self, index: dict[Key, T], parse: Callable[[Obj], T]) -> Handler:
        def handle(kind: str, obj: Obj) -> None:
            parsed = None if kind == "DELETED" else parse(obj)
            with self._lock:
                key = key_of(obj)
                if parsed is None:
                    index.pop(key, None)
                elif index.get(key) == parsed:
                    return  # a resync or a change of nothing we read
                else:
                    index[key] = parsed
                self._version += 1

        return handle

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the informers and wait (up to `timeout_s` in all) for their first lists."""
        for informer in start_all(self._informers, timeout_s):
            log.warning(
                "engine discovery: %s not listed yet; picking uses what is known",
                informer.resource.plural,
            )

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop the informers; `timeout_s` bounds the wait for each thread (0: do not wait)."""
        for informer in self._informers:
            informer.stop(timeout_s)

    def view(self) -> ClusterView:
        with self._lock:
            if self._view_version == self._version:
                return self._view
            version = self._version
            routes, services, slices = (
                list(self._routes.values()),
                list(self._services.values()),
                list(self._slices.values()),
            )
        view = ClusterView.build(routes, services, slices)
        with self._lock:
            if version >= self._view_version:
                self._view, self._view_version = view, version
        return view

    def picking_endpoints(self, policy: Policy) -> dict[EndpointKey, list[str]]:
        return picking_endpoints(policy, self.view())
