"""The EnvoyPatchPolicy of an ArksEndpoint against the Kubernetes API emulator: written beside
the endpoint's Gateway, moved with it, kept whatever the weighting (a stored response names its
engine), and deleted with the endpoint through the finalizer (no owner reference crosses
namespaces)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp.web
import kmock
import pytest
from kubernetes.client import ApiClient

from arks.adapters.kube import rest
from arks.adapters.kube.conditions import find_condition
from arks.resources import ENDPOINTS, HTTPROUTES, PATCH_POLICIES
from arks.wire import PICKING_FINALIZER
from controller.reconcilers.endpoint import endpoint_controller, reconcile_endpoint
from controller.render.picking import picking_policy_name
from tests.support.kube import FAST_INFORMERS, KubeEmulator, eventually, running_kube_emulator
from tests.support.kube import get_object as get

pytestmark = pytest.mark.timeout(60)

MODEL = "qwen-7b"


def create_endpoint(api: ApiClient, ns: str, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksEndpoint",
        "metadata": {"name": MODEL},
        "spec": spec,
    }
    return rest.request(api, "POST", ENDPOINTS.path(ns), body=body)


def patch_spec(api: ApiClient, ns: str, **spec: Any) -> None:
    rest.request(
        api, "PATCH", ENDPOINTS.path(ns, MODEL), body={"spec": spec}, content_type=rest.MERGE_PATCH
    )


def policies(api: ApiClient, ns: str) -> list[tuple[str, str]]:
    """Every EnvoyPatchPolicy made for the endpoint in `ns`, in any namespace, as (namespace, name)."""
    items = rest.request(api, "GET", PATCH_POLICIES.path())["items"]
    return sorted(
        (i["metadata"]["namespace"], i["metadata"]["name"])
        for i in items
        if i["metadata"].get("annotations", {}).get("arks.ai/endpoint") == f"{ns}/{MODEL}"
    )


def picking_condition(api: ApiClient, ns: str) -> dict[str, Any] | None:
    endpoint = get(api, ENDPOINTS, ns, MODEL)
    assert endpoint is not None
    return find_condition((endpoint.get("status") or {}).get("conditions"), "Picking")


def finalizers(api: ApiClient, ns: str) -> list[str]:
    endpoint = get(api, ENDPOINTS, ns, MODEL)
    assert endpoint is not None
    return list(endpoint["metadata"].get("finalizers") or [])


def test_a_picking_endpoint_gets_its_policy_beside_the_gateway_and_keeps_it_steady(
    api: ApiClient, ns: str
) -> None:
    create_endpoint(
        api, ns, weighting="least-load", gatewayRef={"name": "edge", "namespace": f"{ns}-gw"}
    )
    reconcile_endpoint(api, (ns, MODEL))
    name = picking_policy_name(ns, MODEL)
    assert policies(api, ns) == [(f"{ns}-gw", name)]
    policy = get(api, PATCH_POLICIES, f"{ns}-gw", name)
    assert policy is not None and policy["spec"]["targetRef"]["name"] == "edge"
    assert policy["spec"]["jsonPatches"][0]["name"] == f"httproute/{ns}/{MODEL}/rule/0"
    assert PICKING_FINALIZER in finalizers(api, ns)
    condition = picking_condition(api, ns)
    assert condition is not None and (condition["status"], condition["reason"]) == (
        "True",
        "HostOverridePatched",
    )
    assert name in condition["message"]

    def versions() -> list[str]:
        objs = [get(api, PATCH_POLICIES, f"{ns}-gw", name), get(api, ENDPOINTS, ns, MODEL)]
        return [str(o["metadata"]["resourceVersion"]) for o in objs if o is not None]

    before = versions()
    reconcile_endpoint(api, (ns, MODEL))
    assert len(before) == 2 and versions() == before  # a second pass writes nothing


def test_the_policy_moves_with_the_gateway_and_stays_whatever_the_weighting(
    api: ApiClient, ns: str
) -> None:
    create_endpoint(
        api, ns, weighting="prefix-cache", gatewayRef={"name": "edge", "namespace": f"{ns}-a"}
    )
    reconcile_endpoint(api, (ns, MODEL))
    patch_spec(api, ns, gatewayRef={"name": "edge", "namespace": f"{ns}-b"})
    reconcile_endpoint(api, (ns, MODEL))
    assert policies(api, ns) == [(f"{ns}-b", picking_policy_name(ns, MODEL))]

    # Balanced by weight, it keeps the host override: a stored response names its engine.
    patch_spec(api, ns, weighting="weighted")
    reconcile_endpoint(api, (ns, MODEL))
    assert policies(api, ns) == [(f"{ns}-b", picking_policy_name(ns, MODEL))]
    assert PICKING_FINALIZER in finalizers(api, ns)
    assert get(api, HTTPROUTES, ns, MODEL) is not None


def test_deleting_the_endpoint_deletes_its_policy_first(api: ApiClient, ns: str) -> None:
    controller = endpoint_controller(api, ns, informer_options=FAST_INFORMERS)
    controller.start()
    try:
        create_endpoint(api, ns, weighting="least-load")
        eventually(lambda: policies(api, ns) == [("arks-system", picking_policy_name(ns, MODEL))])
        rest.request(api, "DELETE", ENDPOINTS.path(ns, MODEL))
        eventually(lambda: get(api, ENDPOINTS, ns, MODEL) is None)
        assert policies(api, ns) == []

        # Deleted by someone else while the endpoint lives: put back at the next pass.
        create_endpoint(api, ns, weighting="least-load")
        eventually(lambda: len(policies(api, ns)) == 1)
        rest.request(
            api, "DELETE", PATCH_POLICIES.path("arks-system", picking_policy_name(ns, MODEL))
        )
        patch_spec(
            api, ns, defaultWeight=7
        )  # any change re-runs the reconcile (so does the resync)
        eventually(lambda: len(policies(api, ns)) == 1)
    finally:
        controller.stop()


class WithoutEnvoyGateway(KubeEmulator):
    """An API server where Envoy Gateway's CRDs are not installed: its kinds answer 404."""

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if "/gateway.envoyproxy.io/" in request.url.path:
            status = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "NotFound",
                "code": 404,
                "message": "the server could not find the requested resource",
            }
            return aiohttp.web.json_response(status, status=404)
        return await super()._handle(request)


@pytest.fixture(scope="module")
def bare() -> Iterator[Any]:
    with running_kube_emulator(WithoutEnvoyGateway()) as running, running.api_client() as api:
        yield api


def test_without_envoy_gateway_the_endpoint_says_so_and_can_still_be_deleted(
    bare: ApiClient,
) -> None:
    ns = "no-eg"
    create_endpoint(bare, ns, weighting="least-load")
    reconcile_endpoint(bare, (ns, MODEL))
    condition = picking_condition(bare, ns)
    assert condition is not None and (condition["status"], condition["reason"]) == (
        "False",
        "PatchPolicyNotApplied",
    )
    assert "enableEnvoyPatchPolicy" in condition["message"]
    assert get(bare, HTTPROUTES, ns, MODEL) is not None  # the route still balances by weight

    rest.request(bare, "DELETE", ENDPOINTS.path(ns, MODEL))
    reconcile_endpoint(bare, (ns, MODEL))
    assert get(bare, ENDPOINTS, ns, MODEL) is None
