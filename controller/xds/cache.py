"""Snapshots of Envoy resources and the cache the xDS server serves them from.

A `Snapshot` is immutable and swapped whole: every stream sees one consistent set of resources.
Each resource carries a version, a hash of its content, and each resource type one over its
resources: a change to endpoints alone re-sends only endpoints (state of the world), or only the
endpoints that changed (delta), and Envoy keeps its listeners and clusters untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib
import pkgutil
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any as AnyValue

from google.protobuf import any_pb2, descriptor_pool, json_format
from google.protobuf.message import Message

from arks import wire

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
# envoyproxy/ratelimit's configuration (CONFIG_TYPE=GRPC_XDS_SOTW), as Envoy Gateway serves it
RATE_LIMIT_CONFIG = wire.RATE_LIMIT_CONFIG_TYPE

# Clusters before their endpoints, listeners before their routes (the xDS protocol's advice for
# ADS): nothing then points at a resource Envoy does not know yet.
RESOURCE_TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE, RATE_LIMIT_CONFIG)
# LDS and CDS subscribe to everything, and so does the rate-limit service (it names no resource);
# RDS and EDS name the resources they want.
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER, RATE_LIMIT_CONFIG})

_TOP_LEVEL_MODULES = {
    LISTENER: ("envoy.config.listener.v3.listener_pb2", "Listener"),
    ROUTE: ("envoy.config.route.v3.route_pb2", "RouteConfiguration"),
    CLUSTER: ("envoy.config.cluster.v3.cluster_pb2", "Cluster"),
    ENDPOINT: ("envoy.config.endpoint.v3.endpoint_pb2", "ClusterLoadAssignment"),
    RATE_LIMIT_CONFIG: ("rls_protos.rls_conf_pb2", "RateLimitConfig"),
}


class SnapshotError(ValueError):
    """A snapshot's resources are malformed; the message names the type and the resource."""


@functools.cache
def message_class(type_url: str) -> type[Message]:
    """The generated class of a top-level xDS resource type."""
    if type_url not in _TOP_LEVEL_MODULES:
        raise SnapshotError(f"unknown resource type {type_url!r}")
    module, name = _TOP_LEVEL_MODULES[type_url]
    cls: type[Message] = getattr(importlib.import_module(module), name)
    return cls


def _nested_types(value: AnyValue) -> set[str]:
    """The `@type`s of the typed Anys anywhere in a JSON-shaped value."""
    found: set[str] = set()
    if isinstance(value, Mapping):
        if isinstance(value.get("@type"), str):
            found.add(value["@type"])
        for item in value.values():
            found |= _nested_types(item)
    elif isinstance(value, list | tuple):
        for item in value:
            found |= _nested_types(item)
    return found


@functools.cache
def _import_package(package: str) -> None:
    with contextlib.suppress(ImportError):
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            if info.name.endswith("_pb2"):
                importlib.import_module(f"{package}.{info.name}")


def load_nested_types(document: Mapping[str, AnyValue]) -> None:
    """Register the message types of a document's typed Anys, so json_format can resolve them.

    A type's generated module is found from its name (`envoy.extensions.filters.http.lua.v3.Lua`
    lives in package `envoy.extensions.filters.http.lua.v3`): no list of extensions to keep in
    step with the renderer. A type xds-protos does not know stays unknown, and parsing fails
    with an error naming it."""
    pool = descriptor_pool.Default()
    for type_url in _nested_types(document):
        full_name = type_url.rpartition("/")[2]
        try:
            pool.FindMessageTypeByName(full_name)
        except KeyError:
            _import_package(full_name.rpartition(".")[0])


def resource_name(resource: Message) -> str:
    """The name xDS knows a resource by: `cluster_name` for endpoints, `name` for the rest."""
    field_name = "cluster_name" if resource.DESCRIPTOR.name == "ClusterLoadAssignment" else "name"
    return str(getattr(resource, field_name))


def _type_url_of(message: Message) -> str:
    return f"type.googleapis.com/{message.DESCRIPTOR.full_name}"


def _pack(type_url: str, name: str, resource: Message) -> any_pb2.Any:
    if isinstance(resource, any_pb2.Any):
        if resource.type_url != type_url:
            raise SnapshotError(f"{type_url} {name!r}: holds an Any of {resource.type_url}")
        return resource
    if _type_url_of(resource) != type_url:
        raise SnapshotError(f"{type_url} {name!r}: is a {resource.DESCRIPTOR.full_name}")
    packed = any_pb2.Any()
    packed.Pack(resource, deterministic=True)
    return packed


def _canonical(type_url: str, packed: any_pb2.Any) -> bytes:
    """Bytes that depend only on the content: nested Anys and maps are not serialized in a
    stable order, so hash the sorted JSON form instead of the wire bytes."""
    message = message_class(type_url)()
    packed.Unpack(message)
    try:
        text: str = json_format.MessageToJson(message, sort_keys=True, indent=None)
        return text.encode()
    except TypeError:  # an Any of a type this process has not loaded: hash the wire form
        wire: bytes = message.SerializeToString(deterministic=True)
        return wire


def resource_version(type_url: str, resource: any_pb2.Any) -> str:
    """One resource's version (delta xDS): the first 16 hex digits of a SHA-256 of its content."""
    return hashlib.sha256(_canonical(type_url, resource)).hexdigest()[:16]


def type_version(resource_versions: Mapping[str, str]) -> str:
    """The version of one type's resources (state of the world): a hash over names and versions."""
    digest = hashlib.sha256()
    for name in sorted(resource_versions):
        digest.update(name.encode() + b"\0" + resource_versions[name].encode() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Snapshot:
    """One consistent set of resources for a node, by type URL then resource name.

    `version` is the caller's label (e.g. the policy version), for logs and status; what Envoy
    sees as `version_info` is `versions[type_url]`, the content hash of that type alone.
    Resources may be given as messages or as Anys of the right type; they are kept packed.
    """

    version: str
    resources: Mapping[str, Mapping[str, Message]]
    versions: Mapping[str, str] = field(init=False, compare=False)
    resource_versions: Mapping[str, Mapping[str, str]] = field(init=False, compare=False)
    _packed: Mapping[str, Mapping[str, any_pb2.Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        packed: dict[str, Mapping[str, any_pb2.Any]] = {}
        for type_url in self.resources:
            message_class(type_url)  # rejects unknown types
        for type_url in RESOURCE_TYPES:
            given = self.resources.get(type_url, {})
            packed[type_url] = MappingProxyType(
                {name: _pack(type_url, name, resource) for name, resource in given.items()}
            )
        object.__setattr__(self, "_packed", MappingProxyType(packed))
        per_resource = {
            t: MappingProxyType({name: resource_version(t, r) for name, r in packed[t].items()})
            for t in RESOURCE_TYPES
        }
        object.__setattr__(self, "resource_versions", MappingProxyType(per_resource))
        versions = {t: type_version(per_resource[t]) for t in RESOURCE_TYPES}
        object.__setattr__(self, "versions", MappingProxyType(versions))

    def names(self, type_url: str) -> frozenset[str]:
        return frozenset(self._packed.get(type_url, {}))

    def packed(self, type_url: str, names: Iterable[str] | None = None) -> list[any_pb2.Any]:
        """The resources of a type, sorted by name; only `names` (those that exist) if given."""
        of_type = self._packed.get(type_url, {})
        wanted = sorted(of_type) if names is None else sorted(n for n in set(names) if n in of_type)
        return [of_type[n] for n in wanted]


def snapshot_from_messages(version: str, resources: Mapping[str, Iterable[Message]]) -> Snapshot:
    """A snapshot from lists of resources by type URL, each named by its `name` / `cluster_name`."""
    by_type: dict[str, dict[str, Message]] = {}
    for type_url, items in resources.items():
        named: dict[str, Message] = {}
        for item in items:
            name = resource_name(item)
            if not name:
                raise SnapshotError(f"{type_url}: a resource has no name")
            if name in named:
                raise SnapshotError(f"{type_url} {name!r}: given twice")
            named[name] = item
        by_type[type_url] = named
    return Snapshot(version, by_type)


def parse_resource(type_url: str, document: Mapping[str, AnyValue]) -> Message:
    """One resource from Envoy's v3 JSON shape (as arks/envoy_config.py renders it); a top-level
    `@type`, as in a discovery file, must match `type_url`."""
    body = dict(document)
    declared = body.pop("@type", type_url)
    label = f"{type_url} {body.get('cluster_name' if type_url == ENDPOINT else 'name', '?')!r}"
    if declared != type_url:
        raise SnapshotError(f"{label}: declares @type {declared}")
    load_nested_types(body)
    try:
        return json_format.ParseDict(body, message_class(type_url)())
    except json_format.ParseError as err:
        raise SnapshotError(f"{label}: {err}") from err


def snapshot_from_json(
    version: str, resources: Mapping[str, Iterable[Mapping[str, AnyValue]]]
) -> Snapshot:
    """A snapshot from JSON-shaped dicts by type URL (the shape of `envoy_config.xds_resources`)."""
    return snapshot_from_messages(
        version,
        {t: [parse_resource(t, d) for d in documents] for t, documents in resources.items()},
    )


class SnapshotCache:
    """The snapshot each node should run: a default for every node, overridden per node id.

    Thread-safe: reconcilers may `set` from their own threads; streams on the event loop
    `await wait(seen)` for the generation to move past the one they last served.
    """

    def __init__(self, default: Snapshot | None = None) -> None:
        self._lock = threading.Lock()
        self._default = default
        self._nodes: dict[str, Snapshot] = {}
        self._generation = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[int]]] = []

    @property
    def generation(self) -> int:
        """Moves on every change; a stream that served generation g waits for one after g."""
        with self._lock:
            return self._generation

    def get(self, node_id: str) -> Snapshot | None:
        with self._lock:
            return self._nodes.get(node_id, self._default)

    def set(self, snapshot: Snapshot, node_id: str | None = None) -> None:
        """Serve `snapshot` to `node_id`, or to every node without its own when None."""
        with self._lock:
            if node_id is None:
                self._default = snapshot
            else:
                self._nodes[node_id] = snapshot
            self._bump()

    def clear(self, node_id: str) -> None:
        """Drop a node's own snapshot: it gets the default again."""
        with self._lock:
            if self._nodes.pop(node_id, None) is not None:
                self._bump()

    def _bump(self) -> None:
        self._generation += 1
        waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits
                loop.call_soon_threadsafe(_resolve, future, self._generation)

    async def wait(self, seen: int) -> int:
        """The current generation once it differs from `seen`."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._generation != seen:
                return self._generation
            future: asyncio.Future[int] = loop.create_future()
            self._waiters.append((loop, future))
        try:
            return await future
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove((loop, future))


def _resolve(future: asyncio.Future[int], generation: int) -> None:
    if not future.done():
        future.set_result(generation)
