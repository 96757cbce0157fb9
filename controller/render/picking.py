"""Render what Envoy Gateway needs to honour extproc's engine picks: pure.

An ArksEndpoint on `weighting: least-load` or `prefix-cache` has extproc pick the engine pod of
each request and name it in `x-gateway-destination-endpoint` and metadata `envoy.lb` (see
`arks.envoy_config`); on any weighting, a request about a stored response (the Responses API:
`GET /v1/responses/{id}`, `previous_response_id`) names the engine that holds it. Envoy Gateway
builds one cluster per HTTPRoute rule, named `httproute/<namespace>/<route>/rule/<index>`, over
the ready endpoints of the rule's Services, balanced by least request; it reads neither the
header nor the metadata. So each endpoint gets an EnvoyPatchPolicy that sets that cluster's `load_balancing_policy` to the one the local
stack's clusters use: `override_host` (the picked host, if it is one of the cluster's own),
falling back to Envoy Gateway's default, locality-weighted least request (the route's weights).

Envoy Gateway takes an EnvoyPatchPolicy only in the namespace of the Gateway it targets, so
the policy lives there, not beside the endpoint: no owner reference can tie the two together,
and the reconciler deletes it through a finalizer. The `arks.ai/endpoint-uid` label finds the
policies of one endpoint. Requires Envoy Gateway's `enableEnvoyPatchPolicy` (set in
manifests/gateway/envoy-gateway-values.yaml), and per-rule clusters: the EnvoyProxy setting
that merges backend clusters across routes must stay off (it is off by default).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from arks.envoy_config import picked_host_policy
from arks.manifests import CLUSTER_TYPE, EG_VERSION
from arks.wire import (
    ANNOTATION_ENDPOINT,
    LABEL_ENDPOINT,
    LABEL_ENDPOINT_NAMESPACE,
    LABEL_ENDPOINT_UID,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    label_value,
)
from controller.render.endpoint import DEFAULT_GATEWAY

_MAX_NAME = 253


def gateway_of(
    endpoint: Mapping[str, Any], default_gateway: Mapping[str, str] = DEFAULT_GATEWAY
) -> tuple[str, str]:
    """(namespace, name) of the Gateway the endpoint's route attaches to; a gatewayRef without
    a namespace means the endpoint's own (Gateway API ParentReference semantics)."""
    ref = (endpoint.get("spec") or {}).get("gatewayRef")
    if ref:
        return str(ref.get("namespace") or endpoint["metadata"]["namespace"]), str(ref["name"])
    return str(default_gateway["namespace"]), str(default_gateway["name"])


def eg_route_cluster_name(namespace: str, route: str, rule: int = 0) -> str:
    """Envoy Gateway's cluster for rule `rule` of HTTPRoute `namespace/route`."""
    return f"httproute/{namespace}/{route}/rule/{rule}"


def picking_policy_name(namespace: str, name: str) -> str:
    """`arks-pick-<namespace>-<name>-<hash>`: readable, and distinct for every (namespace, name)
    (the hash tells `a-b/c` from `a/b-c`), within the 253 characters of an object name."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:8]
    readable = f"arks-pick-{namespace}-{name}"[: _MAX_NAME - len(digest) - 1].rstrip("-.")
    return f"{readable}-{digest}"


def render_picking_policy(
    endpoint: Mapping[str, Any], default_gateway: Mapping[str, str] = DEFAULT_GATEWAY
) -> dict[str, Any]:
    """The EnvoyPatchPolicy giving the endpoint's route cluster the host override. Every
    endpoint has one: a stored response (the Responses API) lives on the engine that made it,
    and extproc names that engine whatever the endpoint's weighting; with no engine named the
    cluster balances as Envoy Gateway made it. The HTTPRoute has the endpoint's name and one
    rule (`controller.render.endpoint.render_httproute`)."""
    meta = endpoint["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    gateway_namespace, gateway = gateway_of(endpoint, default_gateway)
    labels = {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_ENDPOINT: label_value(name),
        LABEL_ENDPOINT_NAMESPACE: label_value(namespace),
    }
    if meta.get("uid"):
        labels[LABEL_ENDPOINT_UID] = str(meta["uid"])
    return {
        "apiVersion": EG_VERSION,
        "kind": "EnvoyPatchPolicy",
        "metadata": {
            "name": picking_policy_name(namespace, name),
            "namespace": gateway_namespace,
            "labels": labels,
            "annotations": {ANNOTATION_ENDPOINT: f"{namespace}/{name}"},
        },
        "spec": {
            "type": "JSONPatch",
            "targetRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway},
            "jsonPatches": [
                {
                    "type": CLUSTER_TYPE,
                    "name": eg_route_cluster_name(namespace, name),
                    # `add` on a member replaces it when present (RFC 6902): Envoy Gateway sets
                    # load_balancing_policy today, and this works should it ever leave it out.
                    "operation": {
                        "op": "add",
                        "path": "/load_balancing_policy",
                        "value": picked_host_policy(),
                    },
                }
            ],
        },
    }
