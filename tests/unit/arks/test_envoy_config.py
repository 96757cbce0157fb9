"""Envoy's configuration rendered from a policy, checked by shape and by Envoy's own validator.

The bootstrap is fixed (admin, the extproc and xDS clusters, ADS); everything a policy decides
(the listener, the routes, one EDS cluster per routed ArksEndpoint and its engines) is an xDS
resource. Envoy validates both: the bootstrap as written, and the resources inlined into a
static bootstrap, since `--mode validate` does not fetch from an xDS server.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from arks.api import LEAST_LOAD, PREFIX_CACHE, STATIC, WEIGHTED, WEIGHTINGS, SocketAddress
from arks.envoy_config import (
    CLUSTER_TYPE,
    CORS_FILTER,
    CORS_NO_CLUSTER_HEADER,
    ENDPOINT_TYPE,
    EXTPROC_CLUSTER,
    LISTENER,
    LISTENER_TYPE,
    PICKED_WEIGHTINGS,
    ROUTE_CONFIG,
    ROUTE_TYPE,
    XDS_CLUSTER,
    EnvoySettings,
    bootstrap,
    http_filters,
    listener,
    picked_host_policy,
    retry_policy,
    route_configuration,
    routes,
    write_bootstrap,
    xds_resources,
)
from arks.policy import Policy, build_policy, load_policy_file
from tests.support.paths import DEMO_POLICY

ENVOY = Path(sys.executable).parent / "envoy"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
PLACEHOLDERS = ("{extproc_cluster}", "{message_timeout}", "{usage_lua}")
ADS = {"ads": {}, "resource_api_version": "V3"}


def _object(
    api_version: str, kind: str, name: str, namespace: str, spec: dict[str, Any]
) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _backend(name: str, namespace: str, *ports: int) -> dict[str, Any]:
    spec = {"endpoints": [{"ip": {"address": "127.0.0.1", "port": port}} for port in ports]}
    return _object("gateway.envoyproxy.io/v1alpha1", "Backend", name, namespace, spec)


def _endpoint(
    name: str, namespace: str, *refs: dict[str, Any], weighting: str | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"routeConfigs": list(refs)}
    if weighting is not None:
        spec["weighting"] = weighting
    return _object("arks.ai/v1", "ArksEndpoint", name, namespace, spec)


def _ref(name: str, weight: int = 1, kind: str = "Backend") -> dict[str, Any]:
    return {"group": "gateway.envoyproxy.io", "kind": kind, "name": name, "weight": weight}


def _policy(*objects: dict[str, Any]) -> Policy:
    return build_policy(((f"object {i}", obj) for i, obj in enumerate(objects)), version="v7")


def _engine(port: int) -> SocketAddress:
    return SocketAddress("127.0.0.1", port)


# Engines 18001 and 18002 are engine-a, 18003 engine-b, 18004 engine-c. 18003 has not been
# scraped yet (absent), 18002 is drained (0).
ENGINE_WEIGHTS = {_engine(18001): 7, _engine(18002): 0, _engine(18004): 9}


@pytest.fixture(scope="module")
def policy() -> Policy:
    return _policy(
        _backend("engine-a", "default", 18001, 18002),
        _backend("engine-b", "default", 18003),
        _backend("engine-c", "team-b", 18004),
        _endpoint("qwen", "default", _ref("engine-a", 1), _ref("engine-b", 3)),  # weighted
        # routed by Envoy Gateway in Kubernetes, not here
        _endpoint("llama", "default", _ref("a-service", kind="Service")),
        _endpoint("mistral", "default", _ref("engine-a", 0)),  # drained
        _endpoint("phi", "default", _ref("gone")),  # dangling (a warning in the policy)
        _endpoint("qwen", "team-b", _ref("engine-c"), weighting=STATIC),
        _endpoint("idle", "default"),
        # only engine-a is routed here: the Service and the weight-0 Backend are left out
        _endpoint(
            "mixed",
            "default",
            _ref("a-service", 4, kind="Service"),
            _ref("engine-a", 2),
            _ref("engine-b", 0),
        ),
    )


@pytest.fixture
def settings(tmp_path: Path) -> EnvoySettings:
    return EnvoySettings(
        listen_port=18000,
        admin_port=18100,
        extproc_port=18200,
        xds_port=18300,
        config_dir=tmp_path / "envoy",
    )


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def json_body(direct_response: dict[str, Any]) -> Any:
    return json.loads(direct_response["body"]["inline_string"])


def hcm_of(listener: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def clusters_of(resources: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return by_name(resources[CLUSTER_TYPE])


def assignments_of(resources: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {cla["cluster_name"]: cla for cla in resources[ENDPOINT_TYPE]}


def localities(
    policy: Policy,
    settings: EnvoySettings,
    cluster: str,
    weights: dict[SocketAddress, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """A cluster's localities by sub-zone (the Backend's namespace/name)."""
    assignment = assignments_of(xds_resources(policy, settings, weights))[cluster]
    return {loc["locality"]["sub_zone"]: loc for loc in assignment["endpoints"]}


def engines(locality: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """A locality's lb_endpoints by engine port, without the address."""
    out = {}
    for lb in locality["lb_endpoints"]:
        socket = lb["endpoint"]["address"]["socket_address"]
        assert socket["address"] == "127.0.0.1"
        out[socket["port_value"]] = {k: v for k, v in lb.items() if k != "endpoint"}
    return out


# --- routes -----------------------------------------------------------------------------------


def test_health_route_comes_first_and_asks_ext_proc(
    policy: Policy, settings: EnvoySettings
) -> None:
    """ext_proc answers /healthz: while it is away, Envoy's answer is 503, not "ok"."""
    health = routes(policy, settings)[0]

    assert health["match"] == {"path": "/healthz"}
    assert health["direct_response"]["status"] == 200
    assert "typed_per_filter_config" not in health


def test_one_route_per_endpoint_matching_model_and_namespace(
    policy: Policy, settings: EnvoySettings
) -> None:
    endpoint_routes = [
        route
        for route in routes(policy, settings)
        if route["name"].startswith("endpoint/") and not route["name"].endswith("/audio")
    ]

    assert [route["name"] for route in endpoint_routes] == [
        "endpoint/default/idle",
        "endpoint/default/llama",
        "endpoint/default/mistral",
        "endpoint/default/mixed",
        "endpoint/default/phi",
        "endpoint/default/qwen",
        "endpoint/team-b/qwen",
    ]
    assert endpoint_routes[-1]["match"] == {
        "prefix": "/",
        "headers": [
            {"name": "x-arks-model", "string_match": {"exact": "qwen"}},
            {"name": "x-arks-namespace", "string_match": {"exact": "team-b"}},
        ],
    }


@pytest.mark.parametrize(
    "namespace, model", [("default", "qwen"), ("default", "mixed"), ("team-b", "qwen")]
)
def test_routed_endpoint_goes_to_its_one_cluster_with_timeout_and_retries(
    policy: Policy, settings: EnvoySettings, namespace: str, model: str
) -> None:
    route = by_name(routes(policy, settings))[f"endpoint/{namespace}/{model}"]["route"]

    assert route == {
        "cluster": f"endpoint/{namespace}/{model}",
        "timeout": f"{settings.upstream_timeout_s}s",
        "retry_policy": retry_policy(),
    }
    assert "weighted_clusters" not in route


def test_retries_go_to_another_engine_on_failures_before_an_answer() -> None:
    policy = retry_policy()
    retry_on = policy["retry_on"].split(",")

    assert {"connect-failure", "refused-stream", "retriable-status-codes"} <= set(retry_on)
    # An engine resetting before it answers is retried ("reset" covers "reset-before-request").
    assert {"reset", "reset-before-request"} & set(retry_on)
    assert policy["retriable_status_codes"] == [503]
    assert policy["num_retries"] >= 1
    (predicate,) = policy["retry_host_predicate"]
    assert predicate["name"] == "envoy.retry_host_predicates.previous_hosts"
    assert predicate["typed_config"]["@type"].endswith(".PreviousHostsPredicate")
    assert policy["host_selection_retry_max_attempts"] >= 1


@pytest.mark.parametrize(
    "model",
    ["idle", "llama", "mistral", "phi"],
    ids=["no-refs", "service-only", "weight-0", "unknown-backend"],
)
def test_endpoint_without_a_routable_backend_answers_503_json_and_has_no_cluster(
    policy: Policy, settings: EnvoySettings, model: str
) -> None:
    route = by_name(routes(policy, settings))[f"endpoint/default/{model}"]
    resources = xds_resources(policy, settings, ENGINE_WEIGHTS)

    assert "route" not in route
    assert route["direct_response"]["status"] == 503
    assert json_body(route["direct_response"]) == {
        "error": {
            "message": f"model {model!r} has no ready backend",
            "type": "service_unavailable",
            "code": "no_backend",
        }
    }
    assert f"endpoint/default/{model}" not in clusters_of(resources)
    assert f"endpoint/default/{model}" not in assignments_of(resources)


def test_catch_all_route_comes_last_and_answers_404_json(
    policy: Policy, settings: EnvoySettings
) -> None:
    last = routes(policy, settings)[-1]

    assert last["name"] == "not_found"
    assert last["match"] == {"prefix": "/"}
    assert last["direct_response"]["status"] == 404
    assert json_body(last["direct_response"]) == {
        "error": {"message": "no such route", "type": "invalid_request_error", "code": "not_found"}
    }


def test_route_names_are_unique(policy: Policy, settings: EnvoySettings) -> None:
    names = [route["name"] for route in routes(policy, settings)]

    assert len(names) == len(set(names))


def test_audio_paths_get_their_own_body_limit_before_and_after_extproc_routed_them(
    policy: Policy, settings: EnvoySettings
) -> None:
    """The route Envoy picks first sets the buffer limit the body is read under: an upload not
    routed yet matches `audio` (a forwarding route: a direct response has no limit), a routed
    one its endpoint's audio route, ahead of the endpoint's other paths (the listener's limit)."""
    named = {route["name"]: route for route in routes(policy, settings)}
    names = list(named)
    audio = named["endpoint/default/qwen/audio"]

    assert audio["match"]["safe_regex"] == {"regex": "/v1/audio/(transcriptions|translations)"}
    assert audio["match"]["headers"] == named["endpoint/default/qwen"]["match"]["headers"]
    assert audio["route"] == named["endpoint/default/qwen"]["route"]
    assert names.index("endpoint/default/qwen/audio") < names.index("endpoint/default/qwen")
    assert (
        named["audio"]["match"] == audio["match"] | {"headers": []}
        or "headers" not in (named["audio"]["match"])
    )
    assert "cluster_header" in named["audio"]["route"]
    assert names.index("audio") == len(names) - 2  # after every endpoint, before not_found
    for route in (audio, named["audio"]):
        assert route["request_body_buffer_limit"] == settings.audio_body_limit_bytes == 25 * 2**20
    assert "request_body_buffer_limit" not in named["endpoint/default/qwen"]


def test_empty_policy_has_only_health_and_not_found_and_no_clusters(
    settings: EnvoySettings,
) -> None:
    resources = xds_resources(Policy(), settings)

    (route_config,) = resources[ROUTE_TYPE]
    (virtual_host,) = route_config["virtual_hosts"]
    assert [route["name"] for route in virtual_host["routes"]] == ["healthz", "audio", "not_found"]
    assert len(resources[LISTENER_TYPE]) == 1
    assert resources[CLUSTER_TYPE] == []
    assert resources[ENDPOINT_TYPE] == []


# --- xDS resources ----------------------------------------------------------------------------


def test_resources_are_keyed_by_envoy_v3_type_urls(policy: Policy, settings: EnvoySettings) -> None:
    resources = xds_resources(policy, settings, ENGINE_WEIGHTS)

    assert set(resources) == {
        "type.googleapis.com/envoy.config.listener.v3.Listener",
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    }
    assert {LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE} == set(resources)


def test_listener_takes_its_routes_from_ads(policy: Policy, settings: EnvoySettings) -> None:
    resources = xds_resources(policy, settings)
    (listener,) = resources[LISTENER_TYPE]
    (route_config,) = resources[ROUTE_TYPE]

    assert listener["name"] == LISTENER
    assert listener["address"]["socket_address"] == {
        "address": settings.listen_address,
        "port_value": settings.listen_port,
    }
    assert listener["per_connection_buffer_limit_bytes"] == settings.body_limit_bytes
    hcm = hcm_of(listener)
    assert hcm["rds"] == {"route_config_name": ROUTE_CONFIG, "config_source": ADS}
    assert "route_config" not in hcm
    assert route_config["name"] == ROUTE_CONFIG
    (virtual_host,) = route_config["virtual_hosts"]
    assert virtual_host["domains"] == ["*"]
    assert virtual_host["routes"] == routes(policy, settings)


def test_listener_filters_call_extproc_with_every_placeholder_filled(
    policy: Policy, settings: EnvoySettings
) -> None:
    (listener,) = xds_resources(policy, settings)[LISTENER_TYPE]
    hcm = hcm_of(listener)
    rendered = json.dumps(listener)

    for placeholder in PLACEHOLDERS:
        assert placeholder not in rendered
    filters = by_name(hcm["http_filters"])
    grpc = filters[EXT_PROC_FILTER]["typed_config"]["grpc_service"]
    assert grpc["envoy_grpc"]["cluster_name"] == EXTPROC_CLUSTER
    assert grpc["timeout"] == f"{settings.message_timeout_ms / 1000}s"
    assert hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"
    (access_log,) = hcm["access_log"]
    common = access_log["typed_config"]["common_config"]
    assert common["grpc_service"]["envoy_grpc"]["cluster_name"] == EXTPROC_CLUSTER


def test_one_eds_cluster_per_routed_endpoint(policy: Policy, settings: EnvoySettings) -> None:
    clusters = clusters_of(xds_resources(policy, settings, ENGINE_WEIGHTS))

    assert list(clusters) == [
        "endpoint/default/mixed",
        "endpoint/default/qwen",
        "endpoint/team-b/qwen",
    ]
    for name, cluster in clusters.items():
        assert cluster["type"] == "EDS"
        assert cluster["eds_cluster_config"] == {"eds_config": ADS, "service_name": name}
        # an engine extproc names first (a stored response's), else weighted least request
        assert "lb_policy" not in cluster
        assert cluster["load_balancing_policy"] == picked_host_policy()
        # drained engines get nothing, even when most are drained (no "panic" spreading)
        assert cluster["common_lb_config"] == {"healthy_panic_threshold": {"value": 0}}
        assert cluster["outlier_detection"]["consecutive_5xx"] >= 1
        assert "load_assignment" not in cluster


def test_every_route_cluster_exists_and_every_cluster_has_one_assignment(
    policy: Policy, settings: EnvoySettings
) -> None:
    resources = xds_resources(policy, settings, ENGINE_WEIGHTS)
    (route_config,) = resources[ROUTE_TYPE]
    clusters = {cluster["name"] for cluster in resources[CLUSTER_TYPE]}

    targets = {
        route["route"]["cluster"]
        for route in route_config["virtual_hosts"][0]["routes"]
        if "route" in route and "cluster" in route["route"]  # not the unrouted upload's
    }

    assert targets == clusters
    assert Counter(cla["cluster_name"] for cla in resources[ENDPOINT_TYPE]) == dict.fromkeys(
        clusters, 1
    )


# --- localities and weights -------------------------------------------------------------------


def test_a_locality_per_backend_weighted_by_its_route_config(
    policy: Policy, settings: EnvoySettings
) -> None:
    qwen = localities(policy, settings, "endpoint/default/qwen")

    assert list(qwen) == ["default/engine-a", "default/engine-b"]
    assert qwen["default/engine-a"]["load_balancing_weight"] == 1
    assert qwen["default/engine-b"]["load_balancing_weight"] == 3
    assert list(engines(qwen["default/engine-a"])) == [18001, 18002]
    assert list(engines(qwen["default/engine-b"])) == [18003]


def test_a_route_config_of_weight_0_or_a_service_is_not_routed_locally(
    policy: Policy, settings: EnvoySettings
) -> None:
    mixed = localities(policy, settings, "endpoint/default/mixed", ENGINE_WEIGHTS)

    assert list(mixed) == ["default/engine-a"]
    assert mixed["default/engine-a"]["load_balancing_weight"] == 2


def test_weighted_endpoint_applies_engine_weights(policy: Policy, settings: EnvoySettings) -> None:
    qwen = localities(policy, settings, "endpoint/default/qwen", ENGINE_WEIGHTS)

    assert engines(qwen["default/engine-a"]) == {
        18001: {"load_balancing_weight": 7},
        # drained: Envoy wants a weight >= 1, so health is what keeps traffic off it
        18002: {"load_balancing_weight": 1, "health_status": "UNHEALTHY"},
    }
    # not scraped yet: weight 1, as under static weighting
    assert engines(qwen["default/engine-b"]) == {18003: {"load_balancing_weight": 1}}


def test_when_every_engine_is_drained_the_endpoint_fails_open(
    policy: Policy, settings: EnvoySettings
) -> None:
    all_drained = {_engine(18001): 0, _engine(18002): 0, _engine(18003): 0}
    qwen = localities(policy, settings, "endpoint/default/qwen", all_drained)

    assert engines(qwen["default/engine-a"]) == {
        18001: {"load_balancing_weight": 1},
        18002: {"load_balancing_weight": 1},
    }
    assert engines(qwen["default/engine-b"]) == {18003: {"load_balancing_weight": 1}}


@pytest.mark.parametrize("weight", [0, 9])
def test_static_endpoint_ignores_engine_weights(
    policy: Policy, settings: EnvoySettings, weight: int
) -> None:
    team_b = localities(policy, settings, "endpoint/team-b/qwen", {_engine(18004): weight})

    assert engines(team_b["team-b/engine-c"]) == {18004: {"load_balancing_weight": 1}}


@pytest.mark.parametrize("weighting", [*WEIGHTINGS, None])
def test_every_weighting_but_static_applies_engine_weights(
    settings: EnvoySettings, weighting: str | None
) -> None:
    chosen = _policy(
        _backend("engine", "default", 18001, 18002),
        _endpoint("model", "default", _ref("engine"), weighting=weighting),
    )
    weights = {_engine(18001): 4, _engine(18002): 0}

    got = engines(localities(chosen, settings, "endpoint/default/model", weights)["default/engine"])

    if weighting == STATIC:
        assert got == {18001: {"load_balancing_weight": 1}, 18002: {"load_balancing_weight": 1}}
    else:  # None: the default, "weighted"
        assert got == {
            18001: {"load_balancing_weight": 4},
            18002: {"load_balancing_weight": 1, "health_status": "UNHEALTHY"},
        }


@pytest.mark.parametrize("weights", [None, {}], ids=["none", "empty"])
def test_without_engine_weights_every_engine_weighs_1(
    policy: Policy, settings: EnvoySettings, weights: dict[SocketAddress, int] | None
) -> None:
    resources = xds_resources(policy, settings, weights)

    lb_endpoints = [
        lb
        for cla in resources[ENDPOINT_TYPE]
        for locality in cla["endpoints"]
        for lb in locality["lb_endpoints"]
    ]
    assert len(lb_endpoints) == 6  # default/qwen: 3, default/mixed: 2, team-b/qwen: 1
    assert all(lb["load_balancing_weight"] == 1 for lb in lb_endpoints)
    assert not any("health_status" in lb for lb in lb_endpoints)


# --- endpoint picking: least-load and prefix-cache ---------------------------------------------


@pytest.fixture(scope="module")
def picking_policy() -> Policy:
    return _policy(
        _backend("pool", "default", 18001, 18002),
        _backend("other", "default", 18003),
        _endpoint("qwen", "default", _ref("pool", 2), _ref("other", 1), weighting=LEAST_LOAD),
        _endpoint("llama", "default", _ref("pool"), weighting=PREFIX_CACHE),
        _endpoint("mistral", "default", _ref("pool"), weighting=WEIGHTED),
    )


def test_picking_weightings_are_least_load_and_prefix_cache() -> None:
    assert PICKED_WEIGHTINGS == {LEAST_LOAD, PREFIX_CACHE}


@pytest.mark.parametrize("model", ["qwen", "llama"])
def test_a_picking_endpoint_goes_to_the_picked_engines_then_weighted_least_request(
    picking_policy: Policy, settings: EnvoySettings, model: str
) -> None:
    cluster = clusters_of(xds_resources(picking_policy, settings))[f"endpoint/default/{model}"]

    assert "lb_policy" not in cluster  # load_balancing_policy replaces it
    (policy,) = cluster["load_balancing_policy"]["policies"]
    override = policy["typed_extension_config"]
    assert override["name"] == "envoy.load_balancing_policies.override_host"
    config = override["typed_config"]
    assert config["@type"].endswith("override_host.v3.OverrideHost")
    # metadata first: only extproc writes envoy.lb; the header is client input until stripped
    assert config["override_host_sources"] == [
        {"metadata": {"key": "envoy.lb", "path": [{"key": "x-gateway-destination-endpoint"}]}},
        {"header": "x-gateway-destination-endpoint"},
    ]
    (fallback,) = config["fallback_policy"]["policies"]
    least_request = fallback["typed_extension_config"]
    assert least_request["name"] == "envoy.load_balancing_policies.least_request"
    assert least_request["typed_config"]["locality_lb_config"] == {
        "locality_weighted_lb_config": {}
    }
    # the fallback still leaves drained engines alone (verified with Envoy: no panic spreading)
    assert cluster["common_lb_config"] == {"healthy_panic_threshold": {"value": 0}}
    assert cluster["outlier_detection"]["consecutive_gateway_failure"] >= 1
    assert cluster["type"] == "EDS"


def test_a_picking_endpoint_keeps_its_localities_and_engine_weights(
    picking_policy: Policy, settings: EnvoySettings
) -> None:
    weights = {_engine(18001): 5, _engine(18002): 0}
    qwen = localities(picking_policy, settings, "endpoint/default/qwen", weights)

    assert qwen["default/pool"]["load_balancing_weight"] == 2
    assert engines(qwen["default/pool"]) == {
        18001: {"load_balancing_weight": 5},
        18002: {"load_balancing_weight": 1, "health_status": "UNHEALTHY"},
    }


def test_weighted_endpoints_take_a_named_engine_too_then_least_request(
    picking_policy: Policy, settings: EnvoySettings
) -> None:
    """A stored response (the Responses API) lives on one engine, whatever the weighting."""
    cluster = clusters_of(xds_resources(picking_policy, settings))["endpoint/default/mistral"]

    assert "lb_policy" not in cluster
    assert cluster["load_balancing_policy"] == picked_host_policy()


def test_extproc_may_write_the_picked_engines_into_envoy_lb(settings: EnvoySettings) -> None:
    (listener,) = xds_resources(Policy(), settings)[LISTENER_TYPE]
    ext_proc = by_name(hcm_of(listener)["http_filters"])[EXT_PROC_FILTER]["typed_config"]

    assert ext_proc["metadata_options"]["receiving_namespaces"]["untyped"] == [
        "io.arks",
        "envoy.lb",
    ]


@pytest.mark.parametrize("weighted", [False, True])
def test_envoy_accepts_picking_clusters(
    picking_policy: Policy, settings: EnvoySettings, weighted: bool
) -> None:
    weights = {_engine(18001): 5, _engine(18002): 0} if weighted else None
    config = inlined(picking_policy, settings, weights)

    result = envoy_validate(write(config, settings.config_dir / "picking.json"))

    assert result.returncode == 0, result.stderr + result.stdout


# --- bootstrap --------------------------------------------------------------------------------


def test_bootstrap_takes_everything_else_from_ads(settings: EnvoySettings) -> None:
    config = bootstrap(settings)
    dynamic = config["dynamic_resources"]

    assert dynamic["lds_config"] == ADS
    assert dynamic["cds_config"] == ADS
    ads = dynamic["ads_config"]
    assert ads["api_type"] == "DELTA_GRPC"  # one changed resource per push
    assert (
        bootstrap(dataclasses.replace(settings, xds_delta=False))["dynamic_resources"][
            "ads_config"
        ]["api_type"]
        == "GRPC"
    )
    assert ads["transport_api_version"] == "V3"
    (grpc_service,) = ads["grpc_services"]
    assert grpc_service["envoy_grpc"]["cluster_name"] == XDS_CLUSTER
    assert "listeners" not in config["static_resources"]
    assert config["admin"]["address"]["socket_address"]["port_value"] == settings.admin_port


def test_bootstrap_holds_only_the_extproc_and_xds_grpc_clusters(settings: EnvoySettings) -> None:
    clusters = by_name(bootstrap(settings)["static_resources"]["clusters"])

    assert list(clusters) == [EXTPROC_CLUSTER, XDS_CLUSTER]
    for name, port in ((EXTPROC_CLUSTER, settings.extproc_port), (XDS_CLUSTER, settings.xds_port)):
        cluster = clusters[name]
        assert cluster["type"] == "STATIC"
        (options,) = cluster["typed_extension_protocol_options"].values()
        assert "http2_protocol_options" in options["explicit_http_config"]  # gRPC
        (locality,) = cluster["load_assignment"]["endpoints"]
        (lb,) = locality["lb_endpoints"]
        assert lb["endpoint"]["address"]["socket_address"] == {
            "address": "127.0.0.1",
            "port_value": port,
        }


def test_bootstrap_fills_every_filter_placeholder(settings: EnvoySettings) -> None:
    rendered = json.dumps(bootstrap(settings))

    for placeholder in PLACEHOLDERS:
        assert placeholder not in rendered


def test_write_bootstrap_writes_the_bootstrap_as_json(settings: EnvoySettings) -> None:
    path = write_bootstrap(settings)

    assert path == settings.config_dir / "bootstrap.json"
    assert json.loads(path.read_text()) == bootstrap(settings)
    assert [p.name for p in settings.config_dir.iterdir()] == ["bootstrap.json"]  # no temp file


def test_write_bootstrap_replaces_the_previous_file_whole(settings: EnvoySettings) -> None:
    path = write_bootstrap(settings)
    changed = EnvoySettings(
        listen_port=1, admin_port=2, extproc_port=3, xds_port=4, config_dir=settings.config_dir
    )

    assert write_bootstrap(changed) == path
    assert json.loads(path.read_text()) == bootstrap(changed)
    assert [p.name for p in settings.config_dir.iterdir()] == ["bootstrap.json"]


def test_a_failed_write_leaves_the_previous_bootstrap_intact(
    settings: EnvoySettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_bootstrap(settings)
    before = path.read_text()
    real_write_text = Path.write_text

    def write_half_then_fail(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)

    with pytest.raises(OSError, match="disk full"):
        write_bootstrap(settings)

    assert path.read_text() == before


# --- Envoy's own validator --------------------------------------------------------------------


def envoy_validate(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(config_path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def write(config: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def inlined(
    policy: Policy, settings: EnvoySettings, weights: dict[SocketAddress, int] | None = None
) -> dict[str, Any]:
    """A static bootstrap holding what ADS would serve, so Envoy validates those resources too:
    the route configuration inlined into the listener, each EDS cluster made STATIC with its
    ClusterLoadAssignment."""
    config = copy.deepcopy(bootstrap(settings))
    resources = copy.deepcopy(xds_resources(policy, settings, weights))
    (listener,) = resources[LISTENER_TYPE]
    (route_config,) = resources[ROUTE_TYPE]
    hcm = hcm_of(listener)
    del hcm["rds"]
    hcm["route_config"] = route_config
    assignments = assignments_of(resources)
    clusters = []
    for cluster in resources[CLUSTER_TYPE]:
        del cluster["eds_cluster_config"]
        cluster["type"] = "STATIC"
        cluster["load_assignment"] = assignments.pop(cluster["name"])
        clusters.append(cluster)
    assert assignments == {}  # no assignment without its cluster
    config["static_resources"]["listeners"] = [listener]
    config["static_resources"]["clusters"] += clusters
    del config["dynamic_resources"]
    return config


def test_envoy_accepts_the_written_ads_bootstrap(settings: EnvoySettings) -> None:
    result = envoy_validate(write_bootstrap(settings))

    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize("source", ["rich", "rich-unweighted", "demo", "empty"])
def test_envoy_accepts_the_xds_resources(
    policy: Policy, settings: EnvoySettings, source: str
) -> None:
    chosen, weights = {
        "rich": (policy, ENGINE_WEIGHTS),
        "rich-unweighted": (policy, None),
        "demo": (load_policy_file(DEMO_POLICY), None),
        "empty": (Policy(), None),
    }[source]
    config = inlined(chosen, settings, weights)

    result = envoy_validate(write(config, settings.config_dir / "inlined.json"))

    assert result.returncode == 0, result.stderr + result.stdout


def test_envoy_validation_catches_a_route_to_a_missing_cluster(
    policy: Policy, settings: EnvoySettings
) -> None:
    config = inlined(policy, settings, ENGINE_WEIGHTS)
    listener = config["static_resources"]["listeners"][0]
    qwen = by_name(hcm_of(listener)["route_config"]["virtual_hosts"][0]["routes"])[
        "endpoint/default/qwen"
    ]
    qwen["route"]["cluster"] = "endpoint/default/nowhere"

    result = envoy_validate(write(config, settings.config_dir / "broken.json"))

    assert result.returncode != 0
    assert "endpoint/default/nowhere" in result.stderr + result.stdout


# --- request ids and CORS ---------------------------------------------------------------------


def test_every_answer_names_its_request_and_a_clients_id_is_replaced(
    settings: EnvoySettings,
) -> None:
    hcm = hcm_of(listener(settings))

    assert hcm["generate_request_id"] is True
    assert hcm["always_set_request_id_in_response"] is True
    assert hcm["preserve_external_request_id"] is False


def test_a_trusted_front_proxys_request_id_is_kept(settings: EnvoySettings) -> None:
    trusted = dataclasses.replace(settings, trust_client_request_id=True)

    assert hcm_of(listener(trusted))["preserve_external_request_id"] is True


def test_no_cors_by_default(policy: Policy, settings: EnvoySettings) -> None:
    (host,) = route_configuration(policy, settings)["virtual_hosts"]

    assert CORS_FILTER not in [f["name"] for f in http_filters(settings)]
    assert "typed_per_filter_config" not in host
    assert "cors" not in by_name(host["routes"])


def test_cors_origins_get_envoys_cors_filter_first_and_a_policy(
    policy: Policy, settings: EnvoySettings
) -> None:
    browsers = dataclasses.replace(settings, cors_origins=("https://app.example.com", "*"))
    (host,) = route_configuration(policy, browsers)["virtual_hosts"]

    assert http_filters(browsers)[0]["name"] == CORS_FILTER  # before the credential check
    cors = host["typed_per_filter_config"][CORS_FILTER]
    assert cors["allow_origin_string_match"] == [
        {"exact": "https://app.example.com"},
        {"safe_regex": {"regex": ".*"}},
    ]
    assert "authorization" in cors["allow_headers"]
    assert "x-request-id" in cors["expose_headers"]
    # a forwarding route for browsers' requests, before the catch-all 404
    assert [r["name"] for r in host["routes"]][-2:] == ["cors", "not_found"]
    assert host["routes"][-2]["route"] == {"cluster_header": CORS_NO_CLUSTER_HEADER}


def test_envoy_accepts_the_cors_configuration(policy: Policy, settings: EnvoySettings) -> None:
    browsers = dataclasses.replace(
        settings, cors_origins=("https://app.example.com",), trust_client_request_id=True
    )
    config = inlined(policy, browsers, ENGINE_WEIGHTS)

    result = envoy_validate(write(config, settings.config_dir / "cors.json"))

    assert result.returncode == 0, result.stderr + result.stdout
