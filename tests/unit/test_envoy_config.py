"""Envoy's configuration rendered from a policy, checked by shape and by Envoy's own validator."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from arks.envoy_config import (
    EXTPROC_CLUSTER,
    ROUTE_CONFIG,
    EnvoySettings,
    backend_clusters,
    bootstrap,
    discovery_files,
    routes,
    write_config,
)
from arks.policy import Policy, build_policy, load_policy_file

ENVOY = Path(sys.executable).parent / "envoy"
DEMO_POLICY = Path(__file__).resolve().parents[2] / "arks" / "demo" / "policy.yaml"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"


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


def _endpoint(name: str, namespace: str, *refs: dict[str, Any]) -> dict[str, Any]:
    return _object("arks.ai/v1", "ArksEndpoint", name, namespace, {"routeConfigs": list(refs)})


def _ref(name: str, weight: int = 1, kind: str = "Backend") -> dict[str, Any]:
    return {"group": "gateway.envoyproxy.io", "kind": kind, "name": name, "weight": weight}


@pytest.fixture(scope="module")
def policy() -> Policy:
    objects = [
        _backend("engine-a", "default", 18001, 18002),
        _backend("engine-b", "default", 18003),
        _backend("engine-c", "team-b", 18004),
        _endpoint("qwen", "default", _ref("engine-a", 1), _ref("engine-b", 3)),
        _endpoint(
            "llama", "default", _ref("a-service", kind="Service")
        ),  # routed by Envoy Gateway, not here
        _endpoint("mistral", "default", _ref("engine-a", 0)),  # drained
        _endpoint("phi", "default", _ref("gone")),  # dangling (a warning in the policy)
        _endpoint("qwen", "team-b", _ref("engine-c")),
        _endpoint("idle", "default"),
    ]
    return build_policy(((f"object {i}", obj) for i, obj in enumerate(objects)), version="v7")


@pytest.fixture
def settings(tmp_path: Path) -> EnvoySettings:
    return EnvoySettings(
        listen_port=18000, admin_port=18100, extproc_port=18200, config_dir=tmp_path / "envoy"
    )


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def json_body(direct_response: dict[str, Any]) -> Any:
    return json.loads(direct_response["body"]["inline_string"])


def hcm_of(config: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][
        0
    ]["typed_config"]
    return hcm


# --- routes -----------------------------------------------------------------------------------


def test_health_route_comes_first_and_skips_ext_proc(
    policy: Policy, settings: EnvoySettings
) -> None:
    health = routes(policy, settings)[0]

    assert health["match"] == {"path": "/healthz"}
    assert health["direct_response"]["status"] == 200
    assert health["typed_per_filter_config"][EXT_PROC_FILTER]["disabled"] is True


def test_one_route_per_endpoint_matching_model_and_namespace(
    policy: Policy, settings: EnvoySettings
) -> None:
    endpoint_routes = [
        route for route in routes(policy, settings) if route["name"].startswith("endpoint/")
    ]

    assert [route["name"] for route in endpoint_routes] == [
        "endpoint/default/idle",
        "endpoint/default/llama",
        "endpoint/default/mistral",
        "endpoint/default/phi",
        "endpoint/default/qwen",
        "endpoint/team-b/qwen",
    ]
    team_b = endpoint_routes[-1]["match"]
    assert team_b == {
        "prefix": "/",
        "headers": [
            {"name": "x-arks-model", "string_match": {"exact": "qwen"}},
            {"name": "x-arks-namespace", "string_match": {"exact": "team-b"}},
        ],
    }


def test_endpoint_route_weights_its_backend_clusters(
    policy: Policy, settings: EnvoySettings
) -> None:
    route = by_name(routes(policy, settings))["endpoint/default/qwen"]["route"]

    assert route["weighted_clusters"]["clusters"] == [
        {"name": "backend/default/engine-a", "weight": 1},
        {"name": "backend/default/engine-b", "weight": 3},
    ]
    assert route["timeout"] == f"{settings.upstream_timeout_s}s"
    assert "connect-failure" in route["retry_policy"]["retry_on"]


def test_routes_point_only_at_clusters_that_exist(policy: Policy, settings: EnvoySettings) -> None:
    clusters = {cluster["name"] for cluster in backend_clusters(policy)}

    targets = {
        weighted["name"]
        for route in routes(policy, settings)
        if "route" in route
        for weighted in route["route"]["weighted_clusters"]["clusters"]
    }

    assert targets == {
        "backend/default/engine-a",
        "backend/default/engine-b",
        "backend/team-b/engine-c",
    }
    assert targets <= clusters


@pytest.mark.parametrize(
    "model",
    ["idle", "llama", "mistral", "phi"],
    ids=["no-refs", "service-only", "weight-0", "unknown-backend"],
)
def test_endpoint_without_a_backend_answers_503_json(
    policy: Policy, settings: EnvoySettings, model: str
) -> None:
    route = by_name(routes(policy, settings))[f"endpoint/default/{model}"]

    assert "route" not in route
    assert route["direct_response"]["status"] == 503
    assert json_body(route["direct_response"]) == {
        "error": {
            "message": f"model {model!r} has no ready backend",
            "type": "service_unavailable",
            "code": "no_backend",
        }
    }


def test_catch_all_route_comes_last_and_answers_404_json(
    policy: Policy, settings: EnvoySettings
) -> None:
    last = routes(policy, settings)[-1]

    assert last["match"] == {"prefix": "/"}
    assert "headers" not in last["match"]
    assert last["direct_response"]["status"] == 404
    assert json_body(last["direct_response"])["error"]["code"] == "not_found"


def test_route_names_are_unique(policy: Policy, settings: EnvoySettings) -> None:
    names = [route["name"] for route in routes(policy, settings)]

    assert len(names) == len(set(names))


def test_empty_policy_has_only_health_and_not_found(settings: EnvoySettings) -> None:
    assert [route["name"] for route in routes(Policy(), settings)] == ["healthz", "not_found"]
    assert backend_clusters(Policy()) == []


# --- clusters and discovery files -------------------------------------------------------------


def test_one_static_cluster_per_backend(policy: Policy) -> None:
    clusters = by_name(backend_clusters(policy))

    assert list(clusters) == [
        "backend/default/engine-a",
        "backend/default/engine-b",
        "backend/team-b/engine-c",
    ]
    engine_a = clusters["backend/default/engine-a"]
    assert engine_a["type"] == "STATIC"
    assert engine_a["load_assignment"]["cluster_name"] == "backend/default/engine-a"
    addresses = [
        lb["endpoint"]["address"]["socket_address"]
        for lb in engine_a["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert addresses == [
        {"address": "127.0.0.1", "port_value": 18001},
        {"address": "127.0.0.1", "port_value": 18002},
    ]


def test_discovery_files_are_typed_and_versioned_by_the_policy(
    policy: Policy, settings: EnvoySettings
) -> None:
    files = discovery_files(policy, settings)

    assert set(files) == {"cds.json", "rds.json"}
    assert {files["cds.json"]["version_info"], files["rds.json"]["version_info"]} == {"v7"}
    assert {c["@type"] for c in files["cds.json"]["resources"]} == {
        "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    }
    (route_config,) = files["rds.json"]["resources"]
    assert route_config["@type"] == "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
    assert route_config["name"] == ROUTE_CONFIG


def test_bootstrap_reads_routes_and_clusters_from_the_config_dir(settings: EnvoySettings) -> None:
    config = bootstrap(settings)

    assert hcm_of(config)["rds"]["config_source"]["path_config_source"]["path"] == str(
        settings.config_dir / "rds.json"
    )
    assert config["dynamic_resources"]["cds_config"]["path_config_source"]["path"] == str(
        settings.config_dir / "cds.json"
    )
    assert [c["name"] for c in config["static_resources"]["clusters"]] == [EXTPROC_CLUSTER]


def test_bootstrap_fills_every_filter_placeholder(settings: EnvoySettings) -> None:
    assert "{" + "extproc_cluster}" not in json.dumps(bootstrap(settings))
    assert "{" + "message_timeout}" not in json.dumps(bootstrap(settings))


def test_write_config_writes_the_bootstrap_and_discovery_files(
    policy: Policy, settings: EnvoySettings
) -> None:
    path = write_config(policy, settings)

    assert path == settings.config_dir / "bootstrap.json"
    assert sorted(p.name for p in settings.config_dir.iterdir()) == [
        "bootstrap.json",
        "cds.json",
        "rds.json",
    ]
    assert (
        json.loads((settings.config_dir / "rds.json").read_text())
        == discovery_files(policy, settings)["rds.json"]
    )


# --- Envoy's own validator --------------------------------------------------------------------


def envoy_validate(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(config_path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def inlined(policy: Policy, settings: EnvoySettings) -> dict[str, Any]:
    """The bootstrap with the discovery files inlined, so Envoy validates routes and clusters too."""
    config = copy.deepcopy(bootstrap(settings))
    files = discovery_files(policy, settings)
    hcm = hcm_of(config)
    del hcm["rds"]
    (route_config,) = files["rds.json"]["resources"]
    hcm["route_config"] = {k: v for k, v in route_config.items() if k != "@type"}
    config["static_resources"]["clusters"] += [
        {k: v for k, v in cluster.items() if k != "@type"}
        for cluster in files["cds.json"]["resources"]
    ]
    del config["dynamic_resources"]
    return config


def test_envoy_accepts_the_written_bootstrap(policy: Policy, settings: EnvoySettings) -> None:
    result = envoy_validate(write_config(policy, settings))

    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize("source", ["rich", "demo", "empty"])
def test_envoy_accepts_the_routes_and_clusters(
    policy: Policy, settings: EnvoySettings, source: str
) -> None:
    chosen = {"rich": policy, "demo": load_policy_file(DEMO_POLICY), "empty": Policy()}[source]
    path = settings.config_dir / "inlined.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(inlined(chosen, settings)))

    result = envoy_validate(path)

    assert result.returncode == 0, result.stderr + result.stdout


def test_envoy_validation_catches_a_route_to_a_missing_cluster(
    policy: Policy, settings: EnvoySettings
) -> None:
    config = inlined(policy, settings)
    qwen = by_name(hcm_of(config)["route_config"]["virtual_hosts"][0]["routes"])[
        "endpoint/default/qwen"
    ]
    qwen["route"]["weighted_clusters"]["clusters"][0]["name"] = "backend/default/nowhere"
    path = settings.config_dir / "broken.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(config))

    result = envoy_validate(path)

    assert result.returncode != 0
    assert "backend/default/nowhere" in result.stderr + result.stdout
