"""Render an ArksEndpoint into the Gateway API HTTPRoute that publishes it: pure.

Matches are AND'ed with the `x-arks-model` and `x-arks-namespace` headers the gateway sets; the
backends are the applications serving the name (weighted by live load unless `static`) and the
static `routeConfigs`. Why: docs/architecture.md, section 9 (HTTPRoute weights).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from arks.adapters.kube.errors import PermanentError
from arks.api import STATIC, WEIGHTED
from arks.wire import (
    ANNOTATION_SERVED_NAME,
    LABEL_ENDPOINT,
    LABEL_MANAGED_BY,
    LABEL_SERVED_NAME,
    MANAGED_BY,
    MODEL_HEADER,
    NAMESPACE_HEADER,
    label_value,
)
from controller.render.engines import UnsupportedApplication, engine_for, served_model_name

HTTPROUTE_API_VERSION = "gateway.networking.k8s.io/v1"
# Where routes of endpoints without a gatewayRef attach: the Gateway manifests/ installs.
DEFAULT_GATEWAY: Mapping[str, str] = {"name": "arks-gateway", "namespace": "arks-system"}
DEFAULT_MATCH: Mapping[str, Any] = {"path": {"type": "PathPrefix", "value": "/v1"}}
DEFAULT_WEIGHT = 5  # the ArksEndpoint CRD's default for spec.defaultWeight
STATIC_WEIGHT = 1  # the CRD's default for routeConfigs[].weight
MAX_BACKENDS = 16  # HTTPRoute rules[].backendRefs maxItems
FULL_CAPACITY = 100  # one pod as free as the freest of its model (controller.load.cluster.FULL)

_BACKEND_FIELDS = ("group", "kind", "name", "namespace", "port", "weight")


class UnroutableEndpoint(PermanentError):
    """The endpoint cannot be expressed as an HTTPRoute; retrying will not help."""


def _model_match(match: Mapping[str, Any], model: str, namespace: str) -> dict[str, Any]:
    """`match` AND'ed with exact `x-arks-model: model` and `x-arks-namespace` header matches.

    The namespace match keeps tenants apart: endpoints of the same name in two namespaces
    attach routes to one Gateway, and the gateway's request processing sets both headers from
    the token's grant. Headers of those names (compared case-insensitively) in `match` are
    replaced: for equivalent names only the first counts, and routing is not the user's to choose.
    """
    out = copy.deepcopy(dict(match))
    routing = (MODEL_HEADER, NAMESPACE_HEADER)
    others = [h for h in out.get("headers") or [] if str(h.get("name", "")).lower() not in routing]
    out["headers"] = [
        {"type": "Exact", "name": MODEL_HEADER, "value": model},
        {"type": "Exact", "name": NAMESPACE_HEADER, "value": namespace},
        *others,
    ]
    return out


def served_name(app: Mapping[str, Any]) -> str:
    """The name an application serves: what the application renderer passes to the engine
    (`spec.servedModelName`, else the model's name), else the application's own name."""
    spec = app.get("spec") or {}
    if spec.get("servedModelName") or (spec.get("model") or {}).get("name"):
        return served_model_name(spec)
    return str(app["metadata"]["name"])


def _serves(app: Mapping[str, Any], namespace: str, model: str) -> bool:
    meta = app.get("metadata") or {}
    if meta.get("namespace", namespace) != namespace or meta.get("deletionTimestamp"):
        return False
    return served_name(app) == model


def load_weight(default_weight: int, capacity: int) -> int:
    """An application's backend weight from its live capacity (see the module doc)."""
    if capacity <= 0 or default_weight <= 0:
        return 0
    return max(1, round(default_weight * capacity / FULL_CAPACITY))


def _discovered(
    applications: Sequence[Mapping[str, Any]],
    namespace: str,
    model: str,
    weight: int,
    capacities: Mapping[str, int],
) -> list[dict[str, Any]]:
    refs = []
    for app in applications:
        if not _serves(app, namespace, model):
            continue
        try:
            port = engine_for(app["spec"]).default_port
        except UnsupportedApplication:
            continue  # the application renders nothing, so there is no Service to route to
        name = str(app["metadata"]["name"])
        capacity = capacities.get(name)
        live = weight if capacity is None else load_weight(weight, capacity)
        refs.append({"kind": "Service", "name": name, "port": port, "weight": live})
    return refs


def _static(route_config: Mapping[str, Any]) -> dict[str, Any]:
    ref = {k: copy.deepcopy(route_config[k]) for k in _BACKEND_FIELDS if k in route_config}
    ref.setdefault("kind", "Service")
    ref.setdefault("weight", STATIC_WEIGHT)
    return ref


def _sort_key(ref: Mapping[str, Any]) -> tuple[str, str, str, str, int, int]:
    return (
        str(ref.get("group", "")),
        str(ref.get("kind", "Service")),
        str(ref.get("namespace", "")),
        str(ref["name"]),
        int(ref.get("port", 0)),
        int(ref.get("weight", STATIC_WEIGHT)),
    )


def backend_refs(
    endpoint: Mapping[str, Any],
    applications: Sequence[Mapping[str, Any]],
    capacities: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """The route's backendRefs: discovered applications plus static routeConfigs, sorted.

    `capacities` (application name -> live capacity, see the module doc) weighs the
    discovered applications unless the endpoint's weighting is `static`."""
    meta, spec = endpoint["metadata"], endpoint.get("spec") or {}
    weight = int(spec.get("defaultWeight", DEFAULT_WEIGHT))
    dynamic = spec.get("weighting", WEIGHTED) != STATIC
    live = (capacities or {}) if dynamic else {}
    discovered = _discovered(applications, str(meta["namespace"]), str(meta["name"]), weight, live)
    static = [_static(rc) for rc in spec.get("routeConfigs") or []]
    drained = all(int(ref["weight"]) == 0 for ref in discovered)
    if discovered and drained and not any(int(ref["weight"]) > 0 for ref in static):
        for ref in discovered:  # fail open: nothing else would take the traffic
            ref["weight"] = weight
    return sorted(discovered + static, key=_sort_key)


def render_httproute(
    endpoint: Mapping[str, Any],
    applications: Sequence[Mapping[str, Any]],
    default_gateway: Mapping[str, str] = DEFAULT_GATEWAY,
    capacities: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The desired HTTPRoute for ArksEndpoint `endpoint` given the `applications` around it
    and their live `capacities` (by application name; see the module doc).

    An endpoint without `gatewayRef` attaches to `default_gateway` (a parentRef).
    """
    meta, spec = endpoint["metadata"], endpoint.get("spec") or {}
    name, namespace = str(meta["name"]), str(meta["namespace"])
    parent = copy.deepcopy(dict(spec.get("gatewayRef") or default_gateway))
    matches = [
        _model_match(m, name, namespace) for m in spec.get("matchConfigs") or [DEFAULT_MATCH]
    ]
    refs = backend_refs(endpoint, applications, capacities)
    if len(refs) > MAX_BACKENDS:
        raise UnroutableEndpoint(
            f"{len(refs)} backends for {name!r}; an HTTPRoute rule takes at most {MAX_BACKENDS}"
        )
    rule: dict[str, Any] = {"matches": matches}
    if refs:  # without backends the Gateway answers 500, which is what an empty route means
        rule["backendRefs"] = refs
    return {
        "apiVersion": HTTPROUTE_API_VERSION,
        "kind": "HTTPRoute",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                LABEL_MANAGED_BY: MANAGED_BY,
                LABEL_ENDPOINT: label_value(name),
                LABEL_SERVED_NAME: label_value(name),
            },
            "annotations": {ANNOTATION_SERVED_NAME: name},
        },
        "spec": {"parentRefs": [parent], "rules": [rule]},
    }


def route_status(rendered: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The backends of a rendered HTTPRoute with their weights, for `status.routes`.

    One entry per backendRef, in the route's order, with `share`: its percentage of the
    traffic (0 for every backend when all weights are 0).
    """
    refs = [
        ref
        for rule in (rendered.get("spec") or {}).get("rules") or []
        for ref in rule.get("backendRefs") or []
    ]
    total = sum(int(ref.get("weight", STATIC_WEIGHT)) for ref in refs)
    out = []
    for ref in refs:
        entry = {k: ref[k] for k in _BACKEND_FIELDS if k in ref and ref[k] != ""}
        entry.setdefault("weight", STATIC_WEIGHT)
        entry["share"] = round(100 * int(entry["weight"]) / total) if total else 0
        out.append(entry)
    return out
