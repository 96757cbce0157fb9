"""Render Envoy's configuration from a policy: one cluster per Backend, one route per endpoint.

Pure functions, dicts in the shape of Envoy's v3 JSON. The local stack writes them into a static
bootstrap; the controller's xDS server (a later issue) serves the same clusters and routes.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from arks.api import ArksEndpoint, BackendRef
from arks.policy import Policy

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
FILTERS_FILE = ENVOY_DIR / "filters.yaml"
USAGE_LUA_FILE = ENVOY_DIR / "usage.lua"
EXTPROC_CLUSTER = "arks_extproc"
ACCESS_LOG_NAME = "arks_usage"
ROUTE_CONFIG = "arks"
_TYPE = "type.googleapis.com/envoy.config.{}.v3.{}"


@dataclass(frozen=True)
class EnvoySettings:
    listen_port: int
    admin_port: int
    extproc_port: int
    config_dir: Path = Path(".")
    listen_address: str = "127.0.0.1"
    body_limit_bytes: int = 4 * 1024 * 1024
    message_timeout_ms: int = 2000
    upstream_timeout_s: int = 600  # a whole answer; long generations stream for minutes
    access_log_flush_ms: int = 100
    access_log_buffer_bytes: int = 16384


def _json_error(status: int, kind: str, code: str, message: str) -> dict[str, Any]:
    body = {"error": {"message": message, "type": kind, "code": code}}
    return {"status": status, "body": {"inline_string": json.dumps(body)}}


@functools.cache
def _filter_chain_template() -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = yaml.safe_load(FILTERS_FILE.read_text())["http_filters"]
    return filters


@functools.cache
def _usage_lua() -> str:
    return USAGE_LUA_FILE.read_text()


def _fill(value: Any, replacements: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, replacements) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, replacements) for v in value]
    if isinstance(value, str) and value in replacements:
        return replacements[value]
    return value


def http_filters(settings: EnvoySettings) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = _fill(
        copy.deepcopy(_filter_chain_template()),
        {
            "{extproc_cluster}": EXTPROC_CLUSTER,
            "{message_timeout}": f"{settings.message_timeout_ms / 1000}s",
            "{usage_lua}": _usage_lua(),
        },
    )
    return filters


def cluster_name(ref: BackendRef) -> str:
    return f"{ref.kind.lower()}/{ref.namespace}/{ref.name}"


def backend_clusters(policy: Policy) -> list[dict[str, Any]]:
    clusters = []
    for backend in sorted(policy.backends.values(), key=lambda b: (b.key.namespace, b.key.name)):
        endpoints = [
            {"endpoint": {"address": {"socket_address": {"address": ep.address, "port_value": ep.port}}}}
            for ep in backend.endpoints
        ]
        clusters.append(
            {
                "name": f"backend/{backend.key.namespace}/{backend.key.name}",
                "type": "STATIC",
                "connect_timeout": "2s",
                "lb_policy": "LEAST_REQUEST",
                "load_assignment": {
                    "cluster_name": f"backend/{backend.key.namespace}/{backend.key.name}",
                    "endpoints": [{"lb_endpoints": endpoints}],
                },
            }
        )
    return clusters


def _weighted_clusters(endpoint: ArksEndpoint, policy: Policy) -> list[dict[str, Any]]:
    out = []
    for ref in endpoint.route_configs:
        if ref.kind != "Backend" or ref.key not in policy.backends or ref.weight == 0:
            continue  # Services are routed by Envoy Gateway in Kubernetes, not here
        out.append({"name": cluster_name(ref), "weight": ref.weight})
    return out


def routes(policy: Policy, settings: EnvoySettings) -> list[dict[str, Any]]:
    """One route per ArksEndpoint, matched on the headers extproc sets (never on client input)."""
    out: list[dict[str, Any]] = [
        {
            "name": "healthz",
            "match": {"path": "/healthz"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
            "typed_per_filter_config": {
                "envoy.filters.http.ext_proc": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                    "disabled": True,
                }
            },
        }
    ]
    for endpoint in sorted(policy.endpoints.values(), key=lambda e: (e.key.namespace, e.key.name)):
        match = {
            "prefix": "/",
            "headers": [
                {"name": "x-arks-model", "string_match": {"exact": endpoint.model}},
                {"name": "x-arks-namespace", "string_match": {"exact": endpoint.key.namespace}},
            ],
        }
        weighted = _weighted_clusters(endpoint, policy)
        name = f"endpoint/{endpoint.key.namespace}/{endpoint.model}"
        if not weighted:
            out.append(
                {
                    "name": name,
                    "match": match,
                    "direct_response": _json_error(
                        503, "service_unavailable", "no_backend", f"model {endpoint.model!r} has no ready backend"
                    ),
                }
            )
            continue
        out.append(
            {
                "name": name,
                "match": match,
                "route": {
                    "weighted_clusters": {"clusters": weighted},
                    "timeout": f"{settings.upstream_timeout_s}s",
                    "retry_policy": {
                        "retry_on": "connect-failure,refused-stream,reset-before-request",
                        "num_retries": 2,
                    },
                },
            }
        )
    out.append(
        {
            "name": "not_found",
            "match": {"prefix": "/"},
            "direct_response": _json_error(404, "invalid_request_error", "not_found", "no such route"),
        }
    )
    return out


def _local_reply_mapper(status: int, kind: str, code: str, message: str = "%LOCAL_REPLY_BODY%") -> dict[str, Any]:
    return {
        "filter": {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": status, "runtime_key": f"arks.local_reply.{status}"}}}},
        "body_format_override": {
            "json_format": {"error": {"message": message, "type": kind, "code": code}},
            "content_type": "application/json",
        },
    }


def local_reply_config(settings: EnvoySettings) -> dict[str, Any]:
    """OpenAI-shaped bodies for the answers Envoy makes itself (ext_proc never sends these codes)."""
    too_large = f"The request body is larger than the gateway's limit of {settings.body_limit_bytes} bytes."
    return {
        "mappers": [
            _local_reply_mapper(413, "invalid_request_error", "request_too_large", too_large),
            _local_reply_mapper(500, "server_error", "internal_error"),
            _local_reply_mapper(502, "server_error", "bad_gateway"),
            _local_reply_mapper(503, "service_unavailable", "no_backend"),
            _local_reply_mapper(504, "timeout", "upstream_timeout"),
        ]
    }


def usage_access_log(settings: EnvoySettings) -> dict[str, Any]:
    """Batched gRPC access log of the requests extproc admitted: it carries usage to Python."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {
            "metadata_filter": {
                "matcher": {"filter": "io.arks", "path": [{"key": "user"}], "value": {"present_match": True}},
                "match_if_key_not_found": False,
            }
        },
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": ACCESS_LOG_NAME,
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
                "buffer_flush_interval": f"{settings.access_log_flush_ms / 1000}s",
                "buffer_size_bytes": settings.access_log_buffer_bytes,
            },
        },
    }


def route_configuration(policy: Policy, settings: EnvoySettings) -> dict[str, Any]:
    return {
        "name": ROUTE_CONFIG,
        "virtual_hosts": [{"name": "arks", "domains": ["*"], "routes": routes(policy, settings)}],
    }


def _file_source(settings: EnvoySettings, name: str) -> dict[str, Any]:
    return {"path_config_source": {"path": str(settings.config_dir / name)}, "resource_api_version": "V3"}


def listener(settings: EnvoySettings) -> dict[str, Any]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "arks",
        "codec_type": "AUTO",
        "stream_idle_timeout": "300s",
        "request_timeout": "0s",
        "generate_request_id": True,
        # The edge: the client's address is the peer's, and an outside client's x-request-id is
        # replaced, so request ids (which pair an admission with its usage) are Envoy's own.
        "use_remote_address": True,
        "rds": {"route_config_name": ROUTE_CONFIG, "config_source": _file_source(settings, "rds.json")},
        "http_filters": http_filters(settings),
        "local_reply_config": local_reply_config(settings),
        "access_log": [usage_access_log(settings)],
    }
    return {
        "name": "arks",
        "address": {"socket_address": {"address": settings.listen_address, "port_value": settings.listen_port}},
        # Bounds every buffered body (the request JSON, a non-streamed answer): Envoy answers 413.
        "per_connection_buffer_limit_bytes": settings.body_limit_bytes,
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def extproc_cluster(settings: EnvoySettings) -> dict[str, Any]:
    return {
        "name": EXTPROC_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": EXTPROC_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": settings.extproc_port}}}}
                    ]
                }
            ],
        },
    }


def bootstrap(settings: EnvoySettings) -> dict[str, Any]:
    """The fixed part: the listener and filter chain, the extproc cluster, and where the
    policy-dependent parts (routes, backend clusters) come from — files now, ADS later."""
    return {
        "node": {"id": "arks-local", "cluster": "arks"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": settings.admin_port}}},
        "static_resources": {"listeners": [listener(settings)], "clusters": [extproc_cluster(settings)]},
        "dynamic_resources": {"cds_config": _file_source(settings, "cds.json")},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {"overload": {"global_downstream_max_connections": 50000}}}]},
    }


def discovery_files(policy: Policy, settings: EnvoySettings) -> dict[str, dict[str, Any]]:
    """The policy-dependent resources as filesystem xDS responses, by file name."""
    return {
        "cds.json": {
            "version_info": policy.version,
            "resources": [{"@type": _TYPE.format("cluster", "Cluster"), **c} for c in backend_clusters(policy)],
        },
        "rds.json": {
            "version_info": policy.version,
            "resources": [{"@type": _TYPE.format("route", "RouteConfiguration"), **route_configuration(policy, settings)}],
        },
    }


def write_config(policy: Policy, settings: EnvoySettings) -> Path:
    """Write the bootstrap and the discovery files; Envoy picks up replaced files by itself
    (it watches for a rename, which is also what makes the replacement atomic)."""
    settings.config_dir.mkdir(parents=True, exist_ok=True)
    files = {"bootstrap.json": bootstrap(settings), **discovery_files(policy, settings)}
    for name, content in files.items():
        write_json(settings.config_dir / name, content)
    return settings.config_dir / "bootstrap.json"


def write_json(path: Path, content: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=1))
    tmp.replace(path)
