"""Render Envoy's configuration from a policy: the listener, one route and one cluster per
ArksEndpoint, and the cluster's engines with their weights. Pure: dicts in Envoy's v3 JSON.

The local stack writes the bootstrap (`bootstrap`); the controller's xDS server serves the rest
(`xds_resources`). Why the clusters look as they do: docs/architecture.md, section 10.
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

from arks.api import (
    LEAST_LOAD,
    PREFIX_CACHE,
    STATIC,
    ArksEndpoint,
    Backend,
    BackendRef,
    ObjectKey,
    SocketAddress,
)
from arks.envoy_stats import stats_config
from arks.policy import Policy
from arks.wire import (
    DESTINATION_HEADER,
    DESTINATION_METADATA_NAMESPACE,
    HEALTH_PATH,
    METADATA_NAMESPACE,
    MODEL_HEADER,
    NAMESPACE_HEADER,
)

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
FILTERS_FILE = ENVOY_DIR / "filters.yaml"
USAGE_LUA_FILE = ENVOY_DIR / "usage.lua"
EXTPROC_CLUSTER = "arks_extproc"
XDS_CLUSTER = "arks_xds"
ACCESS_LOG_NAME = "arks_usage"
LISTENER = "arks"
ROUTE_CONFIG = "arks"
_TYPE = "type.googleapis.com/envoy.config.{}.v3.{}"
LISTENER_TYPE = _TYPE.format("listener", "Listener")
ROUTE_TYPE = _TYPE.format("route", "RouteConfiguration")
CLUSTER_TYPE = _TYPE.format("cluster", "Cluster")
ENDPOINT_TYPE = _TYPE.format("endpoint", "ClusterLoadAssignment")
ADS_SOURCE: Mapping[str, Any] = {"ads": {}, "resource_api_version": "V3"}

# Failover: an engine that refuses the connection, resets (e.g. dies) before answering or
# answers 503 is retried on another engine. Envoy retries only before it has sent the client
# any byte of the answer (response headers included), so a started answer is never duplicated.
RETRY_ON = ("connect-failure", "refused-stream", "reset", "retriable-status-codes")
RETRIABLE_STATUS_CODES = (503,)
NUM_RETRIES = 2

# Endpoint picking (Gateway API Inference Extension): where extproc names the chosen engines.
PICKED_WEIGHTINGS = frozenset({LEAST_LOAD, PREFIX_CACHE})
_LB_TYPE = "type.googleapis.com/envoy.extensions.load_balancing_policies.{}.v3.{}"


@dataclass(frozen=True)
class EnvoySettings:
    listen_port: int
    admin_port: int
    extproc_port: int
    config_dir: Path = Path(".")
    xds_port: int = 0  # the controller's xDS server (ADS)
    # Delta ADS: a changed resource travels alone (one engine's weight: one endpoint
    # assignment), where the state of the world re-sends every resource of its type.
    xds_delta: bool = True
    listen_address: str = "127.0.0.1"
    body_limit_bytes: int = 4 * 1024 * 1024
    # The audio paths' multipart uploads: OpenAI takes files up to 25 MB (their routes' limit).
    audio_body_limit_bytes: int = 25 * 1024 * 1024
    message_timeout_ms: int = 2000
    upstream_timeout_s: int = 600  # a whole answer; long generations stream for minutes
    access_log_flush_ms: int = 100
    access_log_buffer_bytes: int = 16384
    # Downstream limits: what a slow or idle client may hold (Envoy's edge recommendations).
    request_headers_timeout_s: int = 10  # from a request's first byte to its last header
    request_timeout_s: int = 60  # the whole request, body included (a 4 MiB body at 70 KB/s)
    idle_timeout_s: int = 300  # a connection with no request in flight
    max_connections: int = 50_000  # downstream connections, all listeners together
    max_heap_bytes: int = 2 * 1024**3  # Envoy's heap: past 95 % it frees, past 98 % it refuses
    http2_max_concurrent_streams: int = 100
    # Browsers' origins allowed to call the API (CORS); empty: no CORS headers, preflights refused.
    cors_origins: tuple[str, ...] = ()
    # Keep a client's x-request-id instead of replacing it: only behind a trusted front proxy
    # (the id is the usage record's identity, so a client choosing it could collide with others).
    trust_client_request_id: bool = False


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
    if isinstance(value, str) and "{" in value:  # a placeholder inside Lua code
        for placeholder, replacement in replacements.items():
            value = value.replace(placeholder, replacement)
    return value


def http_filters(settings: EnvoySettings) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = _fill(
        copy.deepcopy(_filter_chain_template()),
        {
            "{extproc_cluster}": EXTPROC_CLUSTER,
            "{message_timeout}": f"{settings.message_timeout_ms / 1000}s",
            "{body_limit_bytes}": str(settings.body_limit_bytes),
            "{audio_body_limit_bytes}": str(settings.audio_body_limit_bytes),
            "{usage_lua}": _usage_lua(),
        },
    )
    if settings.cors_origins:
        filters.insert(0, cors_filter())  # first: a preflight carries no credential
    return filters


def endpoint_cluster_name(endpoint: ArksEndpoint) -> str:
    return f"endpoint/{endpoint.key.namespace}/{endpoint.model}"


def routed_backends(endpoint: ArksEndpoint, policy: Policy) -> list[tuple[BackendRef, Backend]]:
    """The Backends an endpoint routes to here, with their routeConfig (weight > 0 only).

    Services are routed by Envoy Gateway in Kubernetes, not by the local Envoy."""
    out = []
    for ref in endpoint.route_configs:
        backend = (
            policy.backends.get(ObjectKey(ref.namespace, ref.name))
            if ref.kind == "Backend"
            else None
        )
        if backend is not None and ref.weight > 0:
            out.append((ref, backend))
    return out


def _least_request() -> dict[str, Any]:
    return {
        "typed_extension_config": {
            "name": "envoy.load_balancing_policies.least_request",
            "typed_config": {
                "@type": _LB_TYPE.format("least_request", "LeastRequest"),
                "locality_lb_config": {"locality_weighted_lb_config": {}},
            },
        }
    }


def picked_host_policy() -> dict[str, Any]:
    """The engines extproc picked (metadata, then header), else weighted least request."""
    return {
        "policies": [
            {
                "typed_extension_config": {
                    "name": "envoy.load_balancing_policies.override_host",
                    "typed_config": {
                        "@type": _LB_TYPE.format("override_host", "OverrideHost"),
                        "override_host_sources": [
                            {
                                "metadata": {
                                    "key": DESTINATION_METADATA_NAMESPACE,
                                    "path": [{"key": DESTINATION_HEADER}],
                                }
                            },
                            {"header": DESTINATION_HEADER},
                        ],
                        "fallback_policy": {"policies": [_least_request()]},
                    },
                }
            }
        ]
    }


# Envoy's default circuit breakers allow 3 retries in flight per cluster: when an engine dies under
# load, every request beyond those gets 503 (upstream_rq_retry_overflow) instead of its retry on
# another engine. A retry budget scales with the traffic: as many retries as requests in flight
# (each request retries at most NUM_RETRIES times, on other hosts), never fewer than 64. The
# request and connection caps are Envoy's defaults raised for LLM serving, where a model's
# requests in flight (long streams) number in the thousands; the engines' own queues bound them.
CIRCUIT_BREAKERS: dict[str, Any] = {
    "priority": "DEFAULT",
    "max_connections": 100_000,
    "max_pending_requests": 100_000,
    "max_requests": 100_000,
    "retry_budget": {"budget_percent": {"value": 100.0}, "min_retry_concurrency": 64},
}


def endpoint_cluster(endpoint: ArksEndpoint) -> dict[str, Any]:
    name = endpoint_cluster_name(endpoint)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": dict(ADS_SOURCE), "service_name": name},
        "connect_timeout": "2s",
        # Weighted least request: among the engines, fewer requests in flight and a higher
        # weight both attract the next request.
        "lb_policy": "LEAST_REQUEST",
        # Drained engines get nothing, however many there are (Envoy's default "panic" would
        # spread traffic over all of them once half are unhealthy); when all of an endpoint's
        # engines are drained, `load_assignment` fails open instead.
        "common_lb_config": {
            "locality_weighted_lb_config": {},
            "healthy_panic_threshold": {"value": 0},
        },
        # An engine answering errors or refusing connections is set aside for a while, on top
        # of the controller's load-based draining (which needs a scrape to notice).
        "outlier_detection": {
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 3,
            "interval": "5s",
            "base_ejection_time": "15s",
            "max_ejection_percent": 50,
        },
        "circuit_breakers": {"thresholds": [CIRCUIT_BREAKERS]},
    }
    # Every endpoint takes an engine extproc names: the picked one (least-load, prefix-cache),
    # or the one holding a stored response (the Responses API), whatever the weighting.
    # `load_balancing_policy` replaces `lb_policy`; locality weighting moves into the fallback
    # policy, the panic threshold stays common (the fallback reads it).
    del cluster["lb_policy"]
    cluster["load_balancing_policy"] = picked_host_policy()
    cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    return cluster


def load_assignment(
    endpoint: ArksEndpoint, policy: Policy, engine_weights: Mapping[SocketAddress, int]
) -> dict[str, Any]:
    """The endpoint's engines: a locality per Backend, each engine with its weight.

    `engine_weights` is consulted for every endpoint not on `weighting: static`; an engine
    missing from it (not scraped yet) gets weight 1, as under static weighting."""
    dynamic = endpoint.weighting != STATIC
    routed = routed_backends(endpoint, policy)
    if dynamic and all(engine_weights.get(a, 1) == 0 for _, b in routed for a in b.endpoints):
        # Every engine is failing its scrapes: rather than answer 503 for the whole model on
        # the strength of the scrapes alone, let traffic try them (outlier detection and
        # retries still keep requests off the ones that are really down).
        dynamic = False
    localities = []
    for ref, backend in routed:
        lb_endpoints = []
        for address in backend.endpoints:
            weight = engine_weights.get(address, 1) if dynamic else 1
            entry: dict[str, Any] = {
                "endpoint": {
                    "address": {
                        "socket_address": {"address": address.address, "port_value": address.port}
                    }
                },
                "load_balancing_weight": max(weight, 1),
            }
            if weight == 0:
                entry["health_status"] = "UNHEALTHY"  # drained: failing its scrapes
            lb_endpoints.append(entry)
        localities.append(
            {
                "locality": {"sub_zone": f"{backend.key.namespace}/{backend.key.name}"},
                "load_balancing_weight": ref.weight,
                "lb_endpoints": lb_endpoints,
            }
        )
    return {"cluster_name": endpoint_cluster_name(endpoint), "endpoints": localities}


def retry_policy() -> dict[str, Any]:
    return {
        "retry_on": ",".join(RETRY_ON),
        "retriable_status_codes": list(RETRIABLE_STATUS_CODES),
        "num_retries": NUM_RETRIES,
        # Retry on another engine, not the one that just failed.
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 5,
    }


def _endpoints(policy: Policy) -> list[ArksEndpoint]:
    return sorted(policy.endpoints.values(), key=lambda e: (e.key.namespace, e.key.name))


def routes(policy: Policy, settings: EnvoySettings) -> list[dict[str, Any]]:
    """One route per ArksEndpoint, matched on the headers extproc sets (never on client input)."""
    out: list[dict[str, Any]] = [
        {
            # extproc answers it first (see HEALTH_PATH): while extproc is away, this is the
            # 503 gateway_unavailable every request gets, not a healthy "ok".
            "name": "healthz",
            "match": {"path": HEALTH_PATH},
            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
        }
    ]
    for endpoint in _endpoints(policy):
        headers = [
            {"name": MODEL_HEADER, "string_match": {"exact": endpoint.model}},
            {"name": NAMESPACE_HEADER, "string_match": {"exact": endpoint.key.namespace}},
        ]
        name = f"endpoint/{endpoint.key.namespace}/{endpoint.model}"
        if not routed_backends(endpoint, policy):
            out.append(
                {
                    "name": name,
                    "match": {"prefix": "/", "headers": headers},
                    "direct_response": _json_error(
                        503,
                        "service_unavailable",
                        "no_backend",
                        f"model {endpoint.model!r} has no ready backend",
                    ),
                }
            )
            continue
        action = {
            "cluster": endpoint_cluster_name(endpoint),
            "timeout": f"{settings.upstream_timeout_s}s",
            "retry_policy": retry_policy(),
        }
        out.append(
            audio_route(f"{name}/audio", settings, {"route": action}, headers)
        )  # first: an upload keeps its limit once extproc routed it
        out.append({"name": name, "match": {"prefix": "/", "headers": headers}, "route": action})
    out.append(upload_route(settings))
    if settings.cors_origins:
        out.append(cors_route())
    out.append({"name": "not_found", "match": {"prefix": "/"}, "direct_response": _not_found()})
    return out


def upload_route(settings: EnvoySettings) -> dict[str, Any]:
    """What an upload matches before extproc routed it: the route Envoy picks first sets the
    request's buffer limit, which json_to_metadata and arks.form_to_metadata buffer under. A
    direct response has no route entry, hence no limit: it forwards, as the CORS route does, to
    a cluster named in a header nobody sets (still on it at the router: 404 not_found)."""
    no_cluster = {"route": {"cluster_header": CORS_NO_CLUSTER_HEADER}}
    return audio_route("audio", settings, no_cluster, [])


def _not_found() -> dict[str, Any]:
    return _json_error(404, "invalid_request_error", "not_found", "no such route")


# The audio paths (extproc/request.py AUDIO_PATHS), matched whole (the query string aside).
AUDIO_PATH_REGEX = "/v1/audio/(transcriptions|translations)"


def audio_route(
    name: str, settings: EnvoySettings, action: dict[str, Any], headers: list[dict[str, Any]]
) -> dict[str, Any]:
    """A route of the audio paths: their bodies (multipart uploads) may be as large as
    `audio_body_limit_bytes`; every other path keeps the listener's `body_limit_bytes`."""
    match: dict[str, Any] = {"safe_regex": {"regex": AUDIO_PATH_REGEX}}
    if headers:
        match["headers"] = headers
    return {
        "name": name,
        "match": match,
        "request_body_buffer_limit": settings.audio_body_limit_bytes,
        **action,
    }


def _local_reply_mapper(
    status: int,
    kind: str,
    code: str,
    message: str = "%LOCAL_REPLY_BODY%",
    *,
    details_prefix: str | None = None,
    details_not_prefix: str | None = None,
) -> dict[str, Any]:
    """Envoy's own answer with this status gets OpenAI's error shape. `details_prefix` (or
    `details_not_prefix`): only when the answer's response code details start so (or do not), e.g. `http` for Envoy's HTTP codec refusing the
    request, so the gateway's own answers with the same status (ext_proc's `arks_*`, usage.lua's)
    keep their bodies. (The DPE response flag is not set yet when local replies are mapped: a
    CEL filter on the details it is.)"""
    status_filter = {
        "status_code_filter": {
            "comparison": {
                "op": "EQ",
                "value": {"default_value": status, "runtime_key": f"arks.local_reply.{status}"},
            }
        }
    }
    expression = f"response.code == {status}"
    if details_prefix:
        expression += f" && response.code_details.startsWith('{details_prefix}')"
    if details_not_prefix:
        expression += f" && !response.code_details.startsWith('{details_not_prefix}')"
    by_details = {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }
    }
    return {
        "filter": by_details if details_prefix or details_not_prefix else status_filter,
        "body_format_override": {
            "json_format": {"error": {"message": message, "type": kind, "code": code}},
            "content_type": "application/json",
        },
    }


def local_reply_config(settings: EnvoySettings) -> dict[str, Any]:
    """OpenAI-shaped bodies for the answers Envoy makes itself; the gateway's own answers (ext_proc,
    usage.lua) are JSON already and keep their bodies."""
    too_large = (
        f"The request body is larger than the gateway's limit of {settings.body_limit_bytes} bytes"
        f" ({settings.audio_body_limit_bytes} on /v1/audio/transcriptions and translations)."
    )
    return {
        "mappers": [
            # Refused by Envoy itself: its HTTP codec, its header limits, its timeouts.
            _local_reply_mapper(
                400,
                "invalid_request_error",
                "bad_request",
                "The request is not valid HTTP (%RESPONSE_CODE_DETAILS%).",
                details_prefix="http",
            ),
            _local_reply_mapper(
                400,
                "invalid_request_error",
                "bad_request",
                "The request's path is not valid (%RESPONSE_CODE_DETAILS%).",
                details_prefix="path_normalization",
            ),
            _local_reply_mapper(
                426,
                "invalid_request_error",
                "upgrade_required",
                "HTTP/1.0 is not supported: use HTTP/1.1 or HTTP/2.",
            ),
            _local_reply_mapper(
                431,
                "invalid_request_error",
                "request_headers_too_large",
                "The request's headers are larger than the gateway accepts.",
            ),
            _local_reply_mapper(
                408,
                "invalid_request_error",
                "request_timeout",
                "The request did not arrive in time (%RESPONSE_CODE_DETAILS%).",
            ),
            _local_reply_mapper(413, "invalid_request_error", "request_too_large", too_large),
            # The CORS route's router, with no cluster to go to (`cors_route`).
            _local_reply_mapper(
                404,
                "invalid_request_error",
                "not_found",
                "no such route",
                details_prefix="cluster_not_found",
            ),
            _local_reply_mapper(500, "server_error", "internal_error"),
            _local_reply_mapper(502, "server_error", "bad_gateway"),
            # ext_proc unreachable (status_on_error 503): the gateway is away, not the engines.
            _local_reply_mapper(
                503,
                "service_unavailable",
                "gateway_unavailable",
                "The gateway's decision service is unreachable; try again shortly.",
                details_prefix="ext_proc",
            ),
            _local_reply_mapper(
                503,
                "service_unavailable",
                "gateway_unavailable",
                "The gateway's decision service is unreachable; try again shortly.",
                details_prefix="ext_authz",
            ),
            _local_reply_mapper(
                503,
                "service_unavailable",
                "overloaded",
                "The gateway is overloaded; try again shortly.",
                details_prefix="overload",
            ),
            # Envoy's own 503s only: extproc's (arks_*: picking, quota store) keep their bodies.
            _local_reply_mapper(
                503, "service_unavailable", "no_backend", details_not_prefix="arks_"
            ),
            # ext_proc's message timeout: extproc is up but did not answer in time (stalled).
            _local_reply_mapper(
                504,
                "timeout",
                "gateway_timeout",
                "The gateway's decision service did not answer in time; try again shortly.",
                details_prefix="ext_proc",
            ),
            _local_reply_mapper(504, "timeout", "upstream_timeout"),
        ]
    }


def usage_access_log(settings: EnvoySettings) -> dict[str, Any]:
    """Batched gRPC access log of the requests extproc admitted: it carries usage to Python."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {
            "metadata_filter": {
                "matcher": {
                    "filter": METADATA_NAMESPACE,
                    "path": [{"key": "user"}],
                    "value": {"present_match": True},
                },
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


CORS_FILTER = "envoy.filters.http.cors"
# What a browser's request may carry and read. No credentials mode (the API key travels in a
# header, not a cookie), so the wildcards hold; Authorization is never covered by a wildcard.
CORS_METHODS = "GET, POST, OPTIONS"
CORS_MAX_AGE_S = 600
CORS_ALLOW_HEADERS = "authorization, x-api-key, content-type, *"
CORS_EXPOSE_HEADERS = "x-request-id, retry-after, *"
CORS_NO_CLUSTER_HEADER = "x-arks-no-cluster"


def cors_route() -> dict[str, Any]:
    """A browser's request before ext_proc has routed it: Envoy's CORS filter acts only on a
    route that forwards (never on a direct response such as `not_found`), so requests with an
    Origin get one. It names its cluster in a header nobody sets (ext_proc removes a client's
    x-arks-*): a request still on it when the router runs is answered 404 not_found."""
    return {
        "name": "cors",
        "match": {"prefix": "/", "headers": [{"name": "origin", "present_match": True}]},
        "route": {"cluster_header": CORS_NO_CLUSTER_HEADER},
    }


def cors_filter() -> dict[str, Any]:
    """Envoy's CORS filter: it answers an allowed origin's preflight itself (before the credential
    check, which a preflight cannot pass) and adds Access-Control-Allow-Origin to its answers."""
    return {
        "name": CORS_FILTER,
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
    }


def cors_policy(origins: tuple[str, ...]) -> dict[str, Any]:
    """The virtual host's CorsPolicy: `*` allows any origin, anything else is matched exactly."""
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": [
            {"safe_regex": {"regex": ".*"}} if origin == "*" else {"exact": origin}
            for origin in origins
        ],
        "allow_methods": CORS_METHODS,
        "allow_headers": CORS_ALLOW_HEADERS,
        "expose_headers": CORS_EXPOSE_HEADERS,
        "max_age": str(CORS_MAX_AGE_S),
    }


def route_configuration(policy: Policy, settings: EnvoySettings) -> dict[str, Any]:
    host: dict[str, Any] = {"name": "arks", "domains": ["*"], "routes": routes(policy, settings)}
    if settings.cors_origins:
        host["typed_per_filter_config"] = {CORS_FILTER: cors_policy(settings.cors_origins)}
    return {"name": ROUTE_CONFIG, "virtual_hosts": [host]}


def listener(settings: EnvoySettings) -> dict[str, Any]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "arks",
        "codec_type": "AUTO",
        "stream_idle_timeout": "300s",
        "request_timeout": f"{settings.request_timeout_s}s",
        "request_headers_timeout": f"{settings.request_headers_timeout_s}s",
        "common_http_protocol_options": {"idle_timeout": f"{settings.idle_timeout_s}s"},
        "http2_protocol_options": {
            "max_concurrent_streams": settings.http2_max_concurrent_streams,
            "initial_stream_window_size": 65536,  # 64 KiB
            "initial_connection_window_size": 1048576,  # 1 MiB
        },
        "generate_request_id": True,
        # The edge: the client's address is the peer's, and an outside client's x-request-id is
        # replaced (unless a trusted front proxy set it), so request ids (which pair an admission
        # with its usage) are Envoy's own.
        "use_remote_address": True,
        "preserve_external_request_id": settings.trust_client_request_id,
        # Every answer names its request (the SDK's `request_id`), errors and local replies too.
        "always_set_request_id_in_response": True,
        "rds": {"route_config_name": ROUTE_CONFIG, "config_source": dict(ADS_SOURCE)},
        "http_filters": http_filters(settings),
        "local_reply_config": local_reply_config(settings),
        "access_log": [usage_access_log(settings)],
    }
    return {
        "name": LISTENER,
        "address": {
            "socket_address": {
                "address": settings.listen_address,
                "port_value": settings.listen_port,
            }
        },
        # Bounds every buffered body (the request JSON, a non-streamed answer): Envoy answers 413.
        "per_connection_buffer_limit_bytes": settings.body_limit_bytes,
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def _grpc_cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def extproc_cluster(settings: EnvoySettings) -> dict[str, Any]:
    return _grpc_cluster(EXTPROC_CLUSTER, settings.extproc_port)


def xds_cluster(settings: EnvoySettings) -> dict[str, Any]:
    return _grpc_cluster(XDS_CLUSTER, settings.xds_port)


def bootstrap(settings: EnvoySettings, node_id: str = "arks-local") -> dict[str, Any]:
    """The fixed part: admin, the extproc and xDS clusters, and ADS for everything else.

    Envoy keeps serving its last configuration while the xDS server is away, and reconnects."""
    return {
        "node": {"id": node_id, "cluster": "arks"},
        "admin": {
            "address": {
                "socket_address": {"address": "127.0.0.1", "port_value": settings.admin_port}
            }
        },
        "static_resources": {"clusters": [extproc_cluster(settings), xds_cluster(settings)]},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if settings.xds_delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            # Reconnect within a second after a controller restart (Envoy's
                            # default backs off from 0.5 s up to 30 s).
                            "retry_policy": {
                                "retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}
                            },
                        }
                    }
                ],
                "set_node_on_first_message_only": True,
            },
            "lds_config": dict(ADS_SOURCE),
            "cds_config": dict(ADS_SOURCE),
        },
        "overload_manager": overload_manager(settings),
        # Only the stats dashboards and alerts read are created, and a cluster name keeps its
        # dots in the envoy_cluster_name label (arks/envoy_stats.py).
        "stats_config": stats_config(),
    }


_MONITOR = "type.googleapis.com/envoy.extensions.resource_monitors.{}.v3.{}"


def overload_manager(settings: EnvoySettings) -> dict[str, Any]:
    """Envoy's own limits: a cap on downstream connections, and a heap past which it first frees
    memory, then resets the streams holding the most buffered data, then refuses new requests."""
    heap = "envoy.resource_monitors.fixed_heap"
    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": _MONITOR.format(
                        "downstream_connections", "DownstreamConnectionsConfig"
                    ),
                    "max_active_downstream_connections": settings.max_connections,
                },
            },
            {
                "name": heap,
                "typed_config": {
                    "@type": _MONITOR.format("fixed_heap", "FixedHeapConfig"),
                    "max_heap_size_bytes": settings.max_heap_bytes,
                },
            },
        ],
        "actions": [
            {
                "name": "envoy.overload_actions.shrink_heap",
                "triggers": [{"name": heap, "threshold": {"value": 0.95}}],
            },
            {
                "name": "envoy.overload_actions.reset_high_memory_stream",
                "triggers": [
                    {
                        "name": heap,
                        "scaled": {"scaling_threshold": 0.90, "saturation_threshold": 0.97},
                    }
                ],
            },
            {
                "name": "envoy.overload_actions.stop_accepting_requests",
                "triggers": [{"name": heap, "threshold": {"value": 0.98}}],
            },
        ],
        # reset_high_memory_stream needs streams' buffers accounted (buckets from 1 MiB up).
        "buffer_factory_config": {"minimum_account_to_track_power_of_two": 20},
    }


def xds_resources(
    policy: Policy,
    settings: EnvoySettings,
    engine_weights: Mapping[SocketAddress, int] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Everything the xDS server serves, by type URL (each resource carries its `name`)."""
    weights = engine_weights or {}
    routed = [e for e in _endpoints(policy) if routed_backends(e, policy)]
    return {
        LISTENER_TYPE: [listener(settings)],
        ROUTE_TYPE: [route_configuration(policy, settings)],
        CLUSTER_TYPE: [endpoint_cluster(e) for e in routed],
        ENDPOINT_TYPE: [load_assignment(e, policy, weights) for e in routed],
    }


def write_bootstrap(settings: EnvoySettings) -> Path:
    settings.config_dir.mkdir(parents=True, exist_ok=True)
    path = settings.config_dir / "bootstrap.json"
    write_json(path, bootstrap(settings))
    return path


def write_json(path: Path, content: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=1))
    tmp.replace(path)
