"""ArksEndpoint rendering: the HTTPRoute's matches, backends and weights, and schema validity."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest

from arks.adapters.kube.errors import PermanentError
from controller.render.endpoint import load_weight, render_httproute, route_status
from tests.support.crd_schema import upstream_schema

MODEL_MATCH = {"type": "Exact", "name": "x-arks-model", "value": "qwen-7b"}
NAMESPACE_MATCH = {"type": "Exact", "name": "x-arks-namespace", "value": "llm"}


def make_endpoint(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksEndpoint",
        "metadata": {"name": "qwen-7b", "namespace": "llm", "uid": "u-1"},
        "spec": spec,
    }


def make_app(name: str, runtime: str = "vllm", ns: str = "llm", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksApplication",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "runtime": runtime,
            "image": "img",
            "model": {"name": "qwen2-5-7b-instruct"},
            "servedModelName": "qwen-7b",
            **spec,
        },
    }


def rule(route: dict[str, Any]) -> dict[str, Any]:
    (only,) = route["spec"]["rules"]
    return dict(only)


def httproute_schema() -> dict[str, Any]:
    return upstream_schema("gateway.networking.k8s.io_httproutes.yaml", "v1")


def test_static_route_configs_only() -> None:
    endpoint = make_endpoint(
        gatewayRef={"name": "inference", "namespace": "gateways", "sectionName": "http"},
        routeConfigs=[
            {"name": "remote", "group": "gateway.envoyproxy.io", "kind": "Backend", "weight": 3},
            {"name": "legacy", "namespace": "old", "port": 8000},
        ],
    )
    route = render_httproute(endpoint, [])
    assert route == {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": "qwen-7b",
            "namespace": "llm",
            "labels": {
                "app.kubernetes.io/managed-by": "arks",
                "arks.ai/endpoint": "qwen-7b",
                "arks.ai/served-model-name": "qwen-7b",
            },
            "annotations": {"arks.ai/served-model-name": "qwen-7b"},
        },
        "spec": {
            "parentRefs": [{"name": "inference", "namespace": "gateways", "sectionName": "http"}],
            "rules": [
                {
                    "matches": [
                        {"path": {"type": "PathPrefix", "value": "/v1"}, "headers": [MODEL_MATCH, NAMESPACE_MATCH]}
                    ],
                    "backendRefs": [
                        {"kind": "Service", "name": "legacy", "namespace": "old", "port": 8000,
                         "weight": 1},
                        {"group": "gateway.envoyproxy.io", "kind": "Backend", "name": "remote",
                         "weight": 3},
                    ],
                }
            ],
        },
    }  # fmt: skip
    assert route_status(route) == [
        {"kind": "Service", "name": "legacy", "namespace": "old", "port": 8000, "weight": 1,
         "share": 25},
        {"group": "gateway.envoyproxy.io", "kind": "Backend", "name": "remote", "weight": 3,
         "share": 75},
    ]  # fmt: skip


def test_two_apps_on_different_hardware_serving_one_name_are_two_weighted_backends() -> None:
    l40s = make_app("qwen-7b-l40s", instanceSpec={"nodeSelector": {"gpu": "L40S"}})
    h100 = make_app(
        "qwen-7b-h100", runtime="sglang", instanceSpec={"nodeSelector": {"gpu": "H100"}}
    )
    others = [
        make_app("other-model", servedModelName="llama"),
        make_app("elsewhere", ns="other-ns"),
        {**make_app("going"), "metadata": {"name": "going", "namespace": "llm",
                                           "deletionTimestamp": "2025-01-01T00:00:00Z"}},
        make_app("unsupported", runtime="nonesuch"),
    ]  # fmt: skip
    endpoint = make_endpoint(defaultWeight=7, routeConfigs=[{"name": "spill", "port": 80}])
    route = render_httproute(endpoint, [l40s, *others, h100])
    assert route["spec"]["parentRefs"] == [{"name": "arks-gateway", "namespace": "arks-system"}]
    elsewhere = render_httproute(endpoint, [], default_gateway={"name": "gw", "namespace": "edge"})
    assert elsewhere["spec"]["parentRefs"] == [{"name": "gw", "namespace": "edge"}]
    assert rule(route)["backendRefs"] == [
        {"kind": "Service", "name": "qwen-7b-h100", "port": 30000, "weight": 7},
        {"kind": "Service", "name": "qwen-7b-l40s", "port": 8000, "weight": 7},
        {"kind": "Service", "name": "spill", "port": 80, "weight": 1},
    ]
    assert [(r["name"], r["share"]) for r in route_status(route)] == [
        ("qwen-7b-h100", 47),
        ("qwen-7b-l40s", 47),
        ("spill", 7),
    ]
    # The order of discovery does not matter, and the inputs are not changed.
    before = copy.deepcopy([h100, l40s])
    assert render_httproute(endpoint, [h100, l40s, *others]) == route
    assert [h100, l40s] == before


def test_unset_served_name_is_the_model_name_as_the_engine_is_told() -> None:
    app = make_app("qwen-app", servedModelName=None)
    endpoint = make_endpoint()
    endpoint["metadata"]["name"] = "qwen2-5-7b-instruct"
    (ref,) = rule(render_httproute(endpoint, [app]))["backendRefs"]
    assert ref == {"kind": "Service", "name": "qwen-app", "port": 8000, "weight": 5}


def test_custom_match_configs_get_the_routing_headers_and_keep_their_own() -> None:
    matches = [
        {"path": {"type": "Exact", "value": "/v1/chat/completions"}, "method": "POST"},
        {
            "path": {"type": "PathPrefix", "value": "/v1/completions"},
            "headers": [
                {"name": "X-Arks-Model", "value": "spoofed"},
                {"name": "x-arks-namespace", "value": "someone-else"},
                {"name": "x-tenant", "type": "RegularExpression", "value": "team-.*"},
            ],
        },
    ]
    endpoint = make_endpoint(matchConfigs=matches)
    original = copy.deepcopy(endpoint)
    assert rule(render_httproute(endpoint, [])) == {
        "matches": [
            {
                "path": {"type": "Exact", "value": "/v1/chat/completions"},
                "method": "POST",
                "headers": [MODEL_MATCH, NAMESPACE_MATCH],
            },
            {
                "path": {"type": "PathPrefix", "value": "/v1/completions"},
                "headers": [
                    MODEL_MATCH,
                    NAMESPACE_MATCH,
                    {"name": "x-tenant", "type": "RegularExpression", "value": "team-.*"},
                ],
            },
        ]
    }
    assert endpoint == original


def test_no_backends_still_renders_a_route() -> None:
    route = render_httproute(make_endpoint(), [make_app("x", servedModelName="other")])
    assert "backendRefs" not in rule(route)
    assert route_status(route) == []


def test_zero_weights_share_nothing() -> None:
    route = render_httproute(
        make_endpoint(routeConfigs=[{"name": "a", "port": 1, "weight": 0}]), []
    )
    assert route_status(route) == [
        {"kind": "Service", "name": "a", "port": 1, "weight": 0, "share": 0}
    ]


@pytest.mark.parametrize(
    ("default_weight", "capacity", "weight"),
    [
        (5, 100, 5),  # one free pod: the static weight
        (5, 200, 10),  # two free pods: twice that
        (5, 150, 8),  # a free pod and a half-busy one
        (5, 50, 2),  # rounds half to even
        (5, 1, 1),  # busy but alive never rounds to 0, which means drained
        (5, 0, 0),  # every pod drained
        (0, 100, 0),  # the user keeps discovered applications at 0
        (100, 37, 37),  # a larger defaultWeight gives finer steps
    ],
)
def test_load_weight_scales_default_weight_by_free_pods(
    default_weight: int, capacity: int, weight: int
) -> None:
    assert load_weight(default_weight, capacity) == weight


def test_live_capacities_weigh_discovered_applications_but_not_route_configs() -> None:
    apps = [make_app("busy"), make_app("idle"), make_app("new")]
    endpoint = make_endpoint(
        defaultWeight=10, routeConfigs=[{"name": "spill", "port": 80, "weight": 4}]
    )
    capacities = {"busy": 30, "idle": 200, "elsewhere": 0}  # "new": no pod seen yet
    route = render_httproute(endpoint, apps, capacities=capacities)
    assert [(r["name"], r["weight"], r["share"]) for r in route_status(route)] == [
        ("busy", 3, 8),
        ("idle", 20, 54),
        ("new", 10, 27),
        ("spill", 4, 11),
    ]
    assert render_httproute(make_endpoint(defaultWeight=10), apps, capacities={}) == (
        render_httproute(make_endpoint(defaultWeight=10), apps)
    )


@pytest.mark.parametrize("weighting", ["weighted", "least-load", "prefix-cache"])
def test_every_weighting_but_static_follows_load(weighting: str) -> None:
    route = render_httproute(
        make_endpoint(weighting=weighting), [make_app("a"), make_app("b")], capacities={"a": 40}
    )
    assert [r["weight"] for r in rule(route)["backendRefs"]] == [2, 5]


def test_static_weighting_keeps_default_weight_whatever_the_load() -> None:
    apps = [make_app("a"), make_app("b")]
    route = render_httproute(make_endpoint(weighting="static"), apps, capacities={"a": 0, "b": 300})
    assert [(r["name"], r["weight"]) for r in rule(route)["backendRefs"]] == [("a", 5), ("b", 5)]


def test_a_drained_application_gets_nothing_while_another_backend_serves() -> None:
    apps = [make_app("dead"), make_app("alive")]
    route = render_httproute(make_endpoint(), apps, capacities={"dead": 0, "alive": 100})
    assert [(r["name"], r["weight"]) for r in rule(route)["backendRefs"]] == [
        ("alive", 5),
        ("dead", 0),
    ]
    only_static = render_httproute(
        make_endpoint(routeConfigs=[{"name": "spill", "port": 80}]),
        apps,
        capacities={"dead": 0, "alive": 0},
    )
    assert [(r["name"], r["weight"]) for r in rule(only_static)["backendRefs"]] == [
        ("alive", 0),
        ("dead", 0),
        ("spill", 1),
    ]


def test_every_application_drained_and_nothing_else_fails_open_to_default_weight() -> None:
    apps = [make_app("a"), make_app("b")]
    for configs in ([], [{"name": "off", "port": 80, "weight": 0}]):
        route = render_httproute(
            make_endpoint(routeConfigs=configs), apps, capacities={"a": 0, "b": 0}
        )
        weights = {r["name"]: r["weight"] for r in rule(route)["backendRefs"]}
        assert weights == {"a": 5, "b": 5, **({"off": 0} if configs else {})}


def test_more_backends_than_a_rule_takes_is_permanent() -> None:
    configs = [{"name": f"b{i}", "port": 80} for i in range(17)]
    with pytest.raises(PermanentError, match="at most 16"):
        render_httproute(make_endpoint(routeConfigs=configs), [])


@pytest.mark.parametrize(
    "endpoint",
    [
        make_endpoint(),
        make_endpoint(
            gatewayRef={"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw",
                        "namespace": "gateways", "sectionName": "https", "port": 443},
            defaultWeight=2,
            matchConfigs=[{"path": {"type": "PathPrefix", "value": "/v1"},
                           "queryParams": [{"name": "tier", "value": "gold"}]}],
            routeConfigs=[{"group": "", "kind": "Service", "name": "s", "namespace": "ns",
                           "port": 80, "weight": 9},
                          {"group": "gateway.envoyproxy.io", "kind": "Backend", "name": "b"}],
        ),
    ],
    ids=["defaults", "everything"],
)  # fmt: skip
def test_httproute_validates_against_upstream_crd(endpoint: dict[str, Any]) -> None:
    route = render_httproute(endpoint, [make_app("a"), make_app("b", runtime="sglang")])
    jsonschema.validate(route, httproute_schema())


def test_strict_httproute_schema_rejects_unknown_fields() -> None:
    route = render_httproute(make_endpoint(), [make_app("a")])
    rule(route)["backendRefs"][0]["weigth"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(route, httproute_schema())
