"""The rate-limit configuration from an xDS management server, as envoyproxy/ratelimit's
CONFIG_TYPE=GRPC_XDS_SOTW: `RateLimitConfig` resources over ADS, state of the world.

One stream at a time: a response whose resources all parse replaces the configuration whole and
is ACKed; one that does not is NACKed (its error in `error_detail`) and the last good
configuration stays. When the stream ends or cannot open, the last good configuration keeps
serving and the stream opens again after the retry interval. docs/architecture.md, `ratelimit/`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format

from arks import wire
from arks.limits.config import ConfigError, RateLimitConfig, parse_config
from arks.limits.metrics import RateLimitMetrics
from ratelimit import environment
from rls_protos import rls_conf_pb2

log = logging.getLogger(__name__)

RATE_LIMIT_CONFIG = wire.RATE_LIMIT_CONFIG_TYPE
INVALID_ARGUMENT = 3  # google.rpc.Code, in a NACK's error_detail


# --- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class XdsSettings:
    """Upstream's CONFIG_GRPC_XDS_* settings (src/settings/settings.go), with its defaults."""

    server: str = "localhost:18000"  # CONFIG_GRPC_XDS_SERVER_URL
    node_id: str = "default"  # CONFIG_GRPC_XDS_NODE_ID
    node_metadata: tuple[tuple[str, str], ...] = ()  # CONFIG_GRPC_XDS_NODE_METADATA
    retry_interval_s: float = 3.0  # CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL
    headers: tuple[tuple[str, str], ...] = ()  # CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS
    use_tls: bool = False  # CONFIG_GRPC_XDS_SERVER_USE_TLS
    client_cert: Path | None = None  # CONFIG_GRPC_XDS_CLIENT_TLS_CERT
    client_key: Path | None = None  # CONFIG_GRPC_XDS_CLIENT_TLS_KEY
    server_ca: Path | None = None  # CONFIG_GRPC_XDS_SERVER_TLS_CACERT (None: system roots)
    server_san: str = ""  # CONFIG_GRPC_XDS_SERVER_TLS_SAN: the name the server's cert must hold
    # FORCE_START_WITHOUT_INITIAL_CONFIG: serve before the first config (every answer OK until
    # then); by default, as upstream, nothing is served until it has arrived
    force_start: bool = False


CONFIG_TYPES = {"file": "FILE", "grpc-xds-sotw": "GRPC_XDS_SOTW"}


def config_type(text: str) -> str:
    """`--config-type` / CONFIG_TYPE as upstream spells it (FILE, GRPC_XDS_SOTW) or as a flag."""
    for flag, name in CONFIG_TYPES.items():
        if text.strip() in (flag, name, name.lower()):
            return flag
    raise argparse.ArgumentTypeError(
        f"unknown config type {text!r}; expected FILE or GRPC_XDS_SOTW (file, grpc-xds-sotw)"
    )


go_duration = environment.duration_arg  # the flags' durations, as upstream's settings


def node_metadata(text: str) -> tuple[tuple[str, str], ...]:
    """CONFIG_GRPC_XDS_NODE_METADATA: `key1=val1,key2=val2`; an entry without `=` is skipped,
    as upstream's getClientNode does."""
    pairs = (entry.split("=", 1) for entry in text.split(",") if "=" in entry)
    return tuple((key, value) for key, value in pairs)


def header_map(text: str) -> tuple[tuple[str, str], ...]:
    """CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS, envconfig's map syntax: `k1:v1,k2:v2` (gRPC
    metadata keys are lower case)."""
    out = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        key, sep, value = entry.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"header {entry!r} is not key:value")
        out.append((key.strip().lower(), value.strip()))
    return tuple(out)


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "")
    if value.lower() in ("1", "t", "true"):
        return True
    if value.lower() in ("", "0", "f", "false"):
        return False
    raise SystemExit(f"ratelimit: {name}={value!r} is not a boolean (true or false)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The config-source flags, each defaulting to its upstream environment variable."""
    env = os.environ.get
    d = XdsSettings()
    p.add_argument(
        "--config-type",
        type=config_type,
        default=config_type(env("CONFIG_TYPE") or "FILE"),
        help="where the limits come from: file (--config) or grpc-xds-sotw (an xDS server; "
        "upstream's CONFIG_TYPE=GRPC_XDS_SOTW, also read from there)",
    )
    p.add_argument(
        "--config-xds-server",
        metavar="HOST:PORT",
        default=env("CONFIG_GRPC_XDS_SERVER_URL") or d.server,
        help="the xDS management server (CONFIG_GRPC_XDS_SERVER_URL)",
    )
    p.add_argument(
        "--config-xds-node-id",
        default=env("CONFIG_GRPC_XDS_NODE_ID") or d.node_id,
        help="the node id sent to it; the server keys snapshots by it (CONFIG_GRPC_XDS_NODE_ID)",
    )
    p.add_argument(
        "--config-xds-node-metadata",
        type=node_metadata,
        default=node_metadata(env("CONFIG_GRPC_XDS_NODE_METADATA", "")),
        metavar="K=V,…",
        help="the node's metadata (CONFIG_GRPC_XDS_NODE_METADATA)",
    )
    p.add_argument(
        "--config-xds-retry-interval",
        type=go_duration,
        default=go_duration(env("CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL") or "3s"),
        metavar="DURATION",
        help="wait between attempts to (re)open the stream "
        "(CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL, default 3s)",
    )
    p.add_argument(
        "--config-xds-header",
        type=header_map,
        default=header_map(env("CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS", "")),
        metavar="K:V,…",
        help="gRPC metadata sent on the stream (CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS)",
    )
    p.add_argument(
        "--config-xds-tls",
        action="store_true",
        default=_env_flag("CONFIG_GRPC_XDS_SERVER_USE_TLS"),
        help="TLS to the xDS server (CONFIG_GRPC_XDS_SERVER_USE_TLS)",
    )
    for flag, var, what in (
        ("--config-xds-client-cert", "CONFIG_GRPC_XDS_CLIENT_TLS_CERT", "client certificate"),
        ("--config-xds-client-key", "CONFIG_GRPC_XDS_CLIENT_TLS_KEY", "client key"),
        ("--config-xds-server-ca", "CONFIG_GRPC_XDS_SERVER_TLS_CACERT", "CA of the server"),
    ):
        value = env(var)
        p.add_argument(
            flag, type=Path, default=Path(value) if value else None, help=f"{what} ({var})"
        )
    p.add_argument(
        "--force-start-without-initial-config",
        action="store_true",
        default=_env_flag("FORCE_START_WITHOUT_INITIAL_CONFIG"),
        help="serve before the xDS server's first config, answering OK (no domain) until it "
        "comes; by default nothing is served until then, as upstream "
        "(FORCE_START_WITHOUT_INITIAL_CONFIG)",
    )
    p.add_argument(
        "--config-xds-server-san",
        default=env("CONFIG_GRPC_XDS_SERVER_TLS_SAN") or "",
        help="the name the server's certificate must hold, if not its host "
        "(CONFIG_GRPC_XDS_SERVER_TLS_SAN)",
    )


def from_args(a: argparse.Namespace) -> XdsSettings | None:
    """The xDS settings when the config type is grpc-xds-sotw, else None."""
    if a.config_type != "grpc-xds-sotw":
        return None
    if (a.config_xds_client_cert is None) != (a.config_xds_client_key is None):
        raise SystemExit("ratelimit: an xDS client certificate needs its key, and the reverse")
    return XdsSettings(
        server=a.config_xds_server,
        node_id=a.config_xds_node_id,
        node_metadata=a.config_xds_node_metadata,
        retry_interval_s=a.config_xds_retry_interval,
        headers=a.config_xds_header,
        use_tls=a.config_xds_tls,
        client_cert=a.config_xds_client_cert,
        client_key=a.config_xds_client_key,
        server_ca=a.config_xds_server_ca,
        server_san=a.config_xds_server_san,
        force_start=a.force_start_without_initial_config,
    )


# --- resources to the configuration (pure) ---------------------------------------------------


def config_document(resource: rls_conf_pb2.RateLimitConfig) -> dict[str, Any]:
    """One resource in the YAML file's shape, field for field as upstream's ConfigXdsProtoToYaml
    (src/config/config_xds.go); unset fields are left out, so the YAML parser's checks apply."""
    return {"domain": resource.domain, "descriptors": _descriptors(resource.descriptors)}


def _descriptors(descriptors: Sequence[rls_conf_pb2.RateLimitDescriptor]) -> list[dict[str, Any]]:
    out = []
    for d in descriptors:
        item: dict[str, Any] = {"key": d.key}
        if d.value:
            item["value"] = d.value
        if d.HasField("rate_limit"):
            item["rate_limit"] = _policy(d.rate_limit)
        for flag in ("shadow_mode", "detailed_metric", "quota_mode"):
            if getattr(d, flag):
                item[flag] = True
        if d.HasField("metadata"):
            item["metadata"] = json_format.MessageToDict(d.metadata)
        if d.descriptors:
            item["descriptors"] = _descriptors(d.descriptors)
        out.append(item)
    return out


def _policy(policy: rls_conf_pb2.RateLimitPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {"requests_per_unit": policy.requests_per_unit}
    if policy.unit != rls_conf_pb2.UNKNOWN:  # UNKNOWN is the unset unit: an unlimited policy's
        try:
            out["unit"] = rls_conf_pb2.RateLimitUnit.Name(policy.unit)
        except ValueError:  # a number this proto does not know: the parser names it
            out["unit"] = str(policy.unit)
    if policy.unlimited:
        out["unlimited"] = True
    if policy.name:
        out["name"] = policy.name
    if policy.replaces:
        out["replaces"] = [{"name": r.name} for r in policy.replaces]
    return out


def build_config(
    resources: Sequence[rls_conf_pb2.RateLimitConfig], *, merge_domains: bool = False
) -> RateLimitConfig:
    """The configuration of one state-of-the-world response: every resource, each read as one
    domain file named after the resource (two of a domain merged only with `merge_domains`, as
    upstream's MERGE_DOMAIN_CONFIG). Raises ConfigError naming the resource."""
    return parse_config(
        [(f"RateLimitConfig {r.name!r}", config_document(r)) for r in resources],
        merge_domains=merge_domains,
    )


class ResourceError(ValueError):
    """A response held something that is not a RateLimitConfig."""


def decode(response: discovery_pb2.DiscoveryResponse) -> list[rls_conf_pb2.RateLimitConfig]:
    if response.type_url != RATE_LIMIT_CONFIG:
        raise ResourceError(f"a response of type {response.type_url}, not {RATE_LIMIT_CONFIG}")
    out = []
    for index, packed in enumerate(response.resources):
        if packed.type_url != RATE_LIMIT_CONFIG:
            raise ResourceError(f"resources[{index}] is a {packed.type_url}")
        resource = rls_conf_pb2.RateLimitConfig()
        if not packed.Unpack(resource):
            raise ResourceError(f"resources[{index}] does not parse as a RateLimitConfig")
        out.append(resource)
    return out


# --- the stream ------------------------------------------------------------------------------


class XdsConfigSource:
    """The configuration an xDS server streams; `current()` as `ConfigSource`'s, `run()` the
    client (until cancelled), `loaded` set by the first good response. Before it: no domain
    (every answer OK), which the service serves only when forced to (`force_start`)."""

    def __init__(
        self, settings: XdsSettings, metrics: RateLimitMetrics, *, merge_domains: bool = False
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.merge_domains = merge_domains
        self._config = RateLimitConfig()
        self._version = ""  # the version in force, sent again when the stream reopens
        self.loaded = asyncio.Event()
        self._node = base_pb2.Node(id=settings.node_id)
        for key, value in settings.node_metadata:
            self._node.metadata.fields[key].string_value = value

    def current(self) -> RateLimitConfig:
        return self._config

    @property
    def version(self) -> str:
        return self._version

    def reload_if_changed(self) -> bool:
        """Nothing to poll: changes arrive over the stream."""
        return False

    async def run(self) -> None:
        while True:
            try:
                await self._stream()
                log.warning("xDS server %s closed the stream", self.settings.server)
            except grpc.aio.AioRpcError as err:
                log.warning(
                    "xDS stream to %s failed (%s: %s); serving the last good config",
                    self.settings.server,
                    err.code().name,
                    err.details(),
                )
            except Exception:  # e.g. a certificate file missing: retried like a refused stream
                log.exception("xDS stream to %s failed", self.settings.server)
            await asyncio.sleep(self.settings.retry_interval_s)

    def _request(self, nonce: str = "", error: str | None = None) -> discovery_pb2.DiscoveryRequest:
        # As upstream's client: the node on every request, no names (every resource of the type).
        request = discovery_pb2.DiscoveryRequest(
            node=self._node,
            type_url=RATE_LIMIT_CONFIG,
            version_info=self._version,
            response_nonce=nonce,
        )
        if error is not None:
            request.error_detail.code = INVALID_ARGUMENT
            request.error_detail.message = error
        return request

    async def _stream(self) -> None:
        async with self._channel() as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources(metadata=self.settings.headers or None)
            await call.write(self._request())
            log.info(
                "xDS stream to %s opened as node %r", self.settings.server, self.settings.node_id
            )
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return
                await call.write(self._apply(response))

    def _apply(self, response: discovery_pb2.DiscoveryResponse) -> discovery_pb2.DiscoveryRequest:
        """The ACK or NACK of one response; the configuration swapped on an ACK."""
        try:
            config = build_config(decode(response), merge_domains=self.merge_domains)
        except (ConfigError, ResourceError) as err:
            self.metrics.config_errors.inc()
            log.error(
                "xDS config version %s rejected, keeping version %r: %s",
                response.version_info,
                self._version,
                err,
            )
            return self._request(response.nonce, str(err))
        self._config, self._version = config, response.version_info
        self.loaded.set()
        self.metrics.config_reloads.inc()
        log.info("xDS config version %s in force (%d domains)", self._version, len(config.domains))
        return self._request(response.nonce)

    def _channel(self) -> grpc.aio.Channel:
        s = self.settings
        if not s.use_tls:
            return grpc.aio.insecure_channel(s.server)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(s.server_ca),
            private_key=_read(s.client_key),
            certificate_chain=_read(s.client_cert),
        )
        options = [("grpc.ssl_target_name_override", s.server_san)] if s.server_san else []
        return grpc.aio.secure_channel(s.server, credentials, options=options)


def _read(path: Path | None) -> bytes | None:
    """A mounted certificate file, read at each connection (a rotated Secret is picked up)."""
    return None if path is None else path.read_bytes()
