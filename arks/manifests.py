"""Render the Envoy Gateway policies of the Kubernetes install from the local filter chain.

`python -m arks.manifests` writes `manifests/gateway/envoy-policies.yaml`; `--check` fails when it
differs from what `envoy/` and `arks/envoy_config.py` produce. What Envoy Gateway builds and what
we patch in: docs/architecture.md, section 12 (The Envoy Gateway wiring).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

import yaml

from arks.envoy_config import (
    CIRCUIT_BREAKERS,
    CORS_ALLOW_HEADERS,
    CORS_EXPOSE_HEADERS,
    CORS_MAX_AGE_S,
    CORS_METHODS,
    NUM_RETRIES,
    RETRIABLE_STATUS_CODES,
    RETRY_ON,
    EnvoySettings,
    http_filters,
    listener,
    local_reply_config,
    upload_route,
    usage_access_log,
)
from arks.wire import MODEL_HEADER, NAMESPACE_HEADER

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "manifests" / "gateway" / "envoy-policies.yaml"

NAMESPACE = "arks-system"
GATEWAY = "arks-gateway"
LISTENER = "http"
EXTPROC_POLICY = "arks-extproc"
EXTPROC_SERVICE = "arks-extproc"
EXTPROC_PORT = 50051
RATELIMIT_SERVICE = "arks-ratelimit"
RATELIMIT_PORT = 8081
RATELIMIT_CLUSTER = "arks_ratelimit"
RATELIMIT_DOMAIN = "arks"
RATELIMIT_TIMEOUT = "0.1s"
# Our filter carries its own descriptors (filter-level `rate_limits`, which take no stage) and
# sits on its own stage, so the route-level rate limits EG's BackendTrafficPolicy adds (stage 0)
# are never sent to our service.
RATELIMIT_STAGE = 1
# Gateway-wide abuse protection by EG's global rate limit: requests per client address.
CLIENT_IP_LIMIT = {"requests": 1200, "unit": "Minute"}
CLUSTER_DOMAIN = "cluster.local"

EG_GROUP = "gateway.envoyproxy.io"
EG_VERSION = f"{EG_GROUP}/v1alpha1"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# Every route of EG's route table (one per HTTPRoute rule; EG names the table as its listener).
EVERY_ROUTE = "$.virtual_hosts[*].routes[*]"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
ROUTER_FILTER = "envoy.filters.http.router"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
CREDENTIALS_FILTER = "arks.credentials_lua"
EARLY_AUTH_FILTER = "arks.early_auth"
REQUEST_FILTER = "arks.request_to_metadata"
FORM_FILTER = "arks.form_to_metadata"
USAGE_FILTER = "arks.usage_lua"
RATELIMIT_FILTER = "arks.ratelimit"

# The local ext_proc settings EG's EnvoyExtensionPolicy cannot express, patched in instead.
_PATCHED_EXTPROC_FIELDS = ("route_cache_action",)
# The processing mode EnvoyExtensionPolicy's `processingMode: {request: {}}` produces.
_HEADERS_ONLY = {
    "request_header_mode": "SEND",
    "response_header_mode": "SKIP",
    "request_body_mode": "NONE",
    "response_body_mode": "NONE",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SKIP",
}


class UntranslatableFilter(ValueError):
    """envoy/filters.yaml holds something this module does not know how to give Envoy Gateway."""


def eg_extproc_name(
    namespace: str = NAMESPACE, policy: str = EXTPROC_POLICY, index: int = 0
) -> str:
    """EG's name for the ext_proc of an EnvoyExtensionPolicy: also its cluster's name."""
    return f"envoyextensionpolicy/{namespace}/{policy}/extproc/{index}".lower()


def eg_extproc_filter_name(namespace: str = NAMESPACE, policy: str = EXTPROC_POLICY) -> str:
    return f"{EXT_PROC_FILTER}/{eg_extproc_name(namespace, policy)}"


def eg_listener_name(
    namespace: str = NAMESPACE, gateway: str = GATEWAY, section: str = LISTENER
) -> str:
    """EG's xDS Listener name for a Gateway listener (the default name scheme, not XDSNameSchemeV2)."""
    return f"{namespace}/{gateway}/{section}"


def filter_at(name: str) -> str:
    """JSONPath to the HTTP filter called `name`, in every HTTP connection manager of a Listener."""
    return f"$..http_filters[?(@.name=='{name}')]"


HCM_AT = f"$..filters[?(@.name=='{HCM_FILTER}')].typed_config"


def _settings() -> EnvoySettings:
    return EnvoySettings(listen_port=0, admin_port=0, extproc_port=0)


def local_filters(settings: EnvoySettings | None = None) -> dict[str, dict[str, Any]]:
    """The local HTTP filter chain by filter name (envoy/filters.yaml, placeholders filled)."""
    return {f["name"]: f for f in http_filters(settings or _settings())}


def _duration_ms(value: str) -> str:
    """Envoy's "2.0s" as EG's duration pattern wants it ("2000ms")."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", value)
    if match is None:
        raise UntranslatableFilter(f"duration {value!r} is not in seconds")
    return f"{round(float(match.group(1)) * 1000)}ms"


def _status_code(envoy_code: str) -> int:
    """Envoy's StatusCode enum name ("ServiceUnavailable") as a number."""
    return int(HTTPStatus[re.sub(r"(?<!^)(?=[A-Z])", "_", envoy_code).upper()])


def extproc_spec(ext_proc: Mapping[str, Any]) -> dict[str, Any]:
    """The EnvoyExtensionPolicy `extProc` entry equivalent to the local ext_proc filter config."""
    config = dict(ext_proc["typed_config"])
    known = {
        "@type",
        "grpc_service",
        "message_timeout",
        "failure_mode_allow",
        "status_on_error",
        "allow_mode_override",
        "processing_mode",
        "metadata_options",
        *_PATCHED_EXTPROC_FIELDS,
    }
    unknown = sorted(set(config) - known)
    if unknown:
        raise UntranslatableFilter(
            f"ext_proc fields without an Envoy Gateway equivalent: {unknown}"
        )
    if config["processing_mode"] != _HEADERS_ONLY:
        raise UntranslatableFilter(
            f"ext_proc processing mode {config['processing_mode']} is not headers-only"
        )
    metadata = config["metadata_options"]
    return {
        "backendRefs": [{"name": EXTPROC_SERVICE, "port": EXTPROC_PORT}],
        "messageTimeout": _duration_ms(config["message_timeout"]),
        "failOpen": bool(config["failure_mode_allow"]),
        "statusOnError": _status_code(config["status_on_error"]["code"]),
        "processingMode": {"request": {}, "allowModeOverride": bool(config["allow_mode_override"])},
        "metadata": {
            "accessibleNamespaces": list(metadata["forwarding_namespaces"]["untyped"]),
            "writableNamespaces": list(metadata["receiving_namespaces"]["untyped"]),
        },
    }


def _metadata(name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": NAMESPACE,
        "labels": {"app.kubernetes.io/part-of": "arks", "app.kubernetes.io/component": component},
    }


def _gateway_ref() -> dict[str, Any]:
    return {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": GATEWAY}


def extension_policy(settings: EnvoySettings | None = None) -> dict[str, Any]:
    ext_proc = local_filters(settings)[EXT_PROC_FILTER]
    return {
        "apiVersion": EG_VERSION,
        "kind": "EnvoyExtensionPolicy",
        "metadata": _metadata(EXTPROC_POLICY, "gateway"),
        "spec": {"targetRefs": [_gateway_ref()], "extProc": [extproc_spec(ext_proc)]},
    }


def _patch(
    op: str,
    value: Any = None,
    *,
    json_path: str | None = None,
    path: str | None = None,
    name: str | None = None,
    kind: str = LISTENER_TYPE,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"op": op}
    if json_path is not None:
        operation["jsonPath"] = json_path
    if path is not None:
        operation["path"] = path
    if value is not None:
        operation["value"] = value
    return {
        "type": kind,
        "name": name if name is not None else eg_listener_name(),
        "operation": operation,
    }


def filter_patches(settings: EnvoySettings | None = None) -> list[dict[str, Any]]:
    """The JSON patches that turn EG's listener into the local filter chain, in order."""
    settings = settings or _settings()
    filters = local_filters(settings)
    ext_proc_at = filter_at(eg_extproc_filter_name())
    ext_proc = filters[EXT_PROC_FILTER]["typed_config"]
    early_auth = copy.deepcopy(filters[EARLY_AUTH_FILTER])  # asks EG's ext_proc cluster
    early_auth["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = eg_extproc_name()
    access_log = copy.deepcopy(usage_access_log(settings))
    access_log["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = (
        eg_extproc_name()
    )
    patches = [
        # on for every request, as locally (EG adds it disabled and enables it per route)
        _patch("add", False, json_path=ext_proc_at, path="/disabled"),
        # adding at an array element's pointer inserts before that element
        _patch("add", filters[REQUEST_FILTER], json_path=ext_proc_at),
        _patch("add", filters[FORM_FILTER], json_path=ext_proc_at),
        _patch("add", filters[CREDENTIALS_FILTER], json_path=filter_at(REQUEST_FILTER)),
        _patch("add", early_auth, json_path=filter_at(REQUEST_FILTER)),
        *[
            _patch("add", ext_proc[field], json_path=ext_proc_at, path=f"/typed_config/{field}")
            for field in _PATCHED_EXTPROC_FIELDS
            if field in ext_proc
        ],
        _patch("add", filters[USAGE_FILTER], json_path=filter_at(ROUTER_FILTER)),
        _patch("add", access_log, json_path=HCM_AT, path="/access_log/-"),
        _patch("add", local_reply_config(settings), json_path=HCM_AT, path="/local_reply_config"),
        # every answer names its request (ClientTrafficPolicy has no field for it)
        _patch("add", True, json_path=HCM_AT, path="/always_set_request_id_in_response"),
    ]
    return patches


def route_patches(settings: EnvoySettings | None = None) -> list[dict[str, Any]]:
    """Audio uploads as large as locally (arks.envoy_config): the route a request matches first
    sets the buffer json_to_metadata reads its body into, and before extproc named the model no
    endpoint's route matches (they match on the headers it sets), so the local upload route is
    appended to EG's route table; and the route extproc picks must keep that limit, so every
    route gets it (an endpoint's HTTPRoute has one rule for every path; a body of another path
    was buffered under the listener's smaller limit before it was routed). In a policy of its
    own: before any HTTPRoute, EG has no route table to patch, and the failure stays here."""
    settings = settings or _settings()
    return [
        _patch(
            "add",
            upload_route(settings),
            path="/virtual_hosts/0/routes/-",
            kind=ROUTE_CONFIG_TYPE,
        ),
        _patch(
            "add",
            settings.audio_body_limit_bytes,
            json_path=EVERY_ROUTE,
            path="/request_body_buffer_limit",
            kind=ROUTE_CONFIG_TYPE,
        ),
    ]


def ratelimit_cluster() -> dict[str, Any]:
    """Our rate-limit service; its Service is headless, so Envoy balances over every pod."""
    address = f"{RATELIMIT_SERVICE}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}"
    return {
        "name": RATELIMIT_CLUSTER,
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": RATELIMIT_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": address,
                                        "port_value": RATELIMIT_PORT,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


# Descriptors: one per tenant namespace, and one per namespace and model. The headers are the
# ones ext_proc sets after removing any a client sent, so they cannot be spoofed.
RATELIMIT_DESCRIPTORS = (
    ((NAMESPACE_HEADER, "namespace"),),
    ((NAMESPACE_HEADER, "namespace"), (MODEL_HEADER, "model")),
)


def ratelimit_filter() -> dict[str, Any]:
    return {
        "name": RATELIMIT_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": RATELIMIT_DOMAIN,
            "stage": RATELIMIT_STAGE,
            "timeout": RATELIMIT_TIMEOUT,
            "failure_mode_deny": False,
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "rate_limit_service": {
                "grpc_service": {"envoy_grpc": {"cluster_name": RATELIMIT_CLUSTER}},
                "transport_api_version": "V3",
            },
            "rate_limits": [
                {
                    "actions": [
                        {"request_headers": {"header_name": header, "descriptor_key": key}}
                        for header, key in entries
                    ]
                }
                for entries in RATELIMIT_DESCRIPTORS
            ],
        },
    }


def ratelimit_patches() -> list[dict[str, Any]]:
    return [
        _patch("add", ratelimit_cluster(), kind=CLUSTER_TYPE, name=RATELIMIT_CLUSTER),
        # after ext_proc (its headers are the descriptors), before the usage Lua
        _patch("add", ratelimit_filter(), json_path=filter_at(USAGE_FILTER)),
    ]


def patch_policy(name: str, priority: int, patches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": EG_VERSION,
        "kind": "EnvoyPatchPolicy",
        "metadata": _metadata(name, "gateway"),
        "spec": {
            "type": "JSONPatch",
            "targetRef": _gateway_ref(),
            "priority": priority,
            "jsonPatches": list(patches),
        },
    }


def client_traffic_policy(settings: EnvoySettings | None = None) -> dict[str, Any]:
    """The local listener's limits: the body buffer (json_to_metadata buffers the request; EG's
    default of 32 KiB would refuse long prompts with 413), the timeouts that bound what a slow or
    idle client holds, the connection cap and HTTP/2's streams and windows, and whose
    x-request-id a request carries (Envoy's own unless a trusted front proxy sets it)."""
    settings = settings or _settings()
    hcm = listener(settings)["filter_chains"][0]["filters"][0]["typed_config"]
    http2 = hcm["http2_protocol_options"]
    return {
        "apiVersion": EG_VERSION,
        "kind": "ClientTrafficPolicy",
        "metadata": _metadata("arks-clients", "gateway"),
        "spec": {
            "targetRefs": [_gateway_ref()],
            "connection": {
                "bufferLimit": f"{settings.body_limit_bytes // (1024 * 1024)}Mi",
                "connectionLimit": {"value": settings.max_connections},
            },
            "timeout": {
                "http": {
                    "streamIdleTimeout": hcm["stream_idle_timeout"],
                    "requestReceivedTimeout": hcm["request_timeout"],
                    "requestHeadersReceivedTimeout": hcm["request_headers_timeout"],
                    "idleTimeout": hcm["common_http_protocol_options"]["idle_timeout"],
                }
            },
            "headers": {
                "requestID": (
                    "PreserveOrGenerate" if hcm["preserve_external_request_id"] else "Generate"
                )
            },
            "http2": {
                "maxConcurrentStreams": http2["max_concurrent_streams"],
                "initialStreamWindowSize": f"{http2['initial_stream_window_size'] // 1024}Ki",
                "initialConnectionWindowSize": (
                    f"{http2['initial_connection_window_size'] // (1024 * 1024)}Mi"
                ),
            },
        },
    }


def backend_traffic_policy(settings: EnvoySettings | None = None) -> dict[str, Any]:
    """The local routes' timeout and retries, and EG's global per-client-IP rate limit."""
    settings = settings or _settings()
    rules = [
        {
            "clientSelectors": [{"sourceCIDR": {"type": "Distinct", "value": cidr}}],
            "limit": dict(CLIENT_IP_LIMIT),
        }
        for cidr in ("0.0.0.0/0", "::/0")
    ]
    return {
        "apiVersion": EG_VERSION,
        "kind": "BackendTrafficPolicy",
        "metadata": _metadata("arks-backends", "gateway"),
        "spec": {
            "targetRefs": [_gateway_ref()],
            "timeout": {"http": {"requestTimeout": f"{settings.upstream_timeout_s}s"}},
            # The local retry policy of a model's route (arks.envoy_config.retry_policy).
            "retry": {
                "numRetries": NUM_RETRIES,
                "retryOn": {
                    "triggers": list(RETRY_ON),
                    "httpStatusCodes": list(RETRIABLE_STATUS_CODES),
                },
            },
            "rateLimit": {"type": "Global", "global": {"rules": rules}},
            # The local clusters' circuit breakers (arks.envoy_config.CIRCUIT_BREAKERS); Envoy
            # Gateway has no retry budget, so parallel retries get the same cap as requests.
            "circuitBreaker": {
                "maxConnections": CIRCUIT_BREAKERS["max_connections"],
                "maxPendingRequests": CIRCUIT_BREAKERS["max_pending_requests"],
                "maxParallelRequests": CIRCUIT_BREAKERS["max_requests"],
                "maxParallelRetries": CIRCUIT_BREAKERS["max_requests"],
            },
        },
    }


CORS_POLICY = "arks-cors"
CORS_OUTPUT = ROOT / "manifests" / "gateway" / "cors.yaml"
CORS_EXAMPLE_ORIGINS = ("https://app.example.com",)


def cors_security_policy(origins: Sequence[str] = CORS_EXAMPLE_ORIGINS) -> dict[str, Any]:
    """The local CORS policy (`arks up --cors-origin`, arks.envoy_config.cors_policy) as Envoy
    Gateway's SecurityPolicy on the Gateway. EG's CORS filter runs before the credential check
    (its filter order), so a preflight, which carries no credential, is answered there."""

    def listed(header_list: str) -> list[str]:
        return [h.strip() for h in header_list.split(",")]

    return {
        "apiVersion": EG_VERSION,
        "kind": "SecurityPolicy",
        "metadata": _metadata(CORS_POLICY, "gateway"),
        "spec": {
            "targetRefs": [_gateway_ref()],
            "cors": {
                "allowOrigins": list(origins),
                "allowMethods": listed(CORS_METHODS),
                "allowHeaders": listed(CORS_ALLOW_HEADERS),
                "exposeHeaders": listed(CORS_EXPOSE_HEADERS),
                "maxAge": f"{CORS_MAX_AGE_S}s",
            },
        },
    }


CORS_HEADER = """\
# Generated by `python -m arks.manifests` from arks/envoy_config.py: browser access (CORS), off
# unless installed. Not in kustomization.yaml: set your origins in allowOrigins and add this file
# to it, or set the Helm chart's gateway.cors.allowOrigins. `arks up --cors-origin` locally.
"""


def documents(settings: EnvoySettings | None = None) -> list[dict[str, Any]]:
    return [
        extension_policy(settings),
        patch_policy("arks-filters", 0, filter_patches(settings)),
        patch_policy("arks-ratelimit", 10, ratelimit_patches()),
        patch_policy("arks-routes", 20, route_patches(settings)),
        client_traffic_policy(settings),
        backend_traffic_policy(settings),
    ]


HEADER = """\
# Generated by `python -m arks.manifests` from envoy/filters.yaml, envoy/usage.lua and
# arks/envoy_config.py: the local filter chain, given to Envoy Gateway. Do not edit by hand;
# `python -m arks.manifests --check` fails when this file is stale. See README.md here.
"""


class _Dumper(yaml.SafeDumper):
    pass


# Plain scalars that YAML 1.1 parsers in Go (gopkg.in/yaml.v2, hence sigs.k8s.io/yaml as in
# `kubectl apply -f` and Helm's fromYaml) read as booleans, while PyYAML reads them as strings
# and so would not quote them: `key: n` would arrive as `key: false`.
_GO_YAML_BOOLEANS = {"y", "Y", "n", "N"}


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else '"' if value in _GO_YAML_BOOLEANS else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(settings: EnvoySettings | None = None) -> str:
    body = "---\n".join(
        yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120) for doc in documents(settings)
    )
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m arks.manifests", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=OUTPUT)
    parser.add_argument(
        "--check", action="store_true", help="fail if the file differs from what would be written"
    )
    args = parser.parse_args(argv)
    cors = CORS_HEADER + yaml.dump(cors_security_policy(), Dumper=_Dumper, sort_keys=False)
    wanted = {args.out: render(), args.out.parent / CORS_OUTPUT.name: cors}
    if args.check:
        stale = [p for p, text in wanted.items() if (p.read_text() if p.exists() else "") != text]
        for path in stale:
            print(f"{path} is stale: run `python -m arks.manifests`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in wanted.items():
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
