"""Reading an HTTPRoute's `status.parents` (Gateway API RouteParentStatus) for the Arks Gateway."""

from __future__ import annotations

from typing import Any

from controller.render.route_acceptance import RouteAcceptance, parent_key, route_acceptance

EG = "gateway.envoyproxy.io/gatewayclass-controller"
OURS = {"name": "arks-gateway", "namespace": "arks-system"}


def entry(
    accepted: tuple[str, str, str] | None,
    *,
    parent: dict[str, Any] | None = None,
    controller: str = EG,
    resolved: tuple[str, str, str] | None = None,
) -> dict[str, Any]:
    conditions = []
    for type_, condition in (("Accepted", accepted), ("ResolvedRefs", resolved)):
        if condition is not None:
            status, reason, message = condition
            conditions.append({"type": type_, "status": status, "reason": reason,
                               "message": message, "observedGeneration": 1,
                               "lastTransitionTime": "2026-12-05T00:00:00Z"})  # fmt: skip
    return {"parentRef": parent or dict(OURS), "controllerName": controller,
            "conditions": conditions}  # fmt: skip


def route(*parents: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"metadata": {"name": "qwen", "namespace": "team-a"}}
    if parents:
        out["status"] = {"parents": list(parents)}
    return out


REFUSED = ("False", "NotAllowedByListeners",
           "No listeners included by this parent ref allowed this attachment.")  # fmt: skip
ACCEPTED = ("True", "Accepted", "Route is accepted")


def test_a_route_without_status_is_pending_not_refused() -> None:
    acceptance = route_acceptance(route(), OURS)
    status, reason, message = acceptance.accepted
    assert (status, reason) == ("Unknown", "Pending") and EG in message
    assert acceptance.unresolved is None


def test_envoy_gateways_refusal_is_reported_with_its_reason_and_the_missing_label() -> None:
    status, reason, message = route_acceptance(route(entry(REFUSED)), OURS).accepted
    assert (status, reason) == ("False", "NotAllowedByListeners")
    assert message.startswith("Gateway arks-system/arks-gateway: No listeners included")
    assert "team-a labelled arks.ai/tenant=true" in message


def test_acceptance() -> None:
    assert route_acceptance(route(entry(ACCEPTED)), OURS) == RouteAcceptance(
        ("True", "Accepted", "Gateway arks-system/arks-gateway: Route is accepted")
    )


def test_another_controllers_entry_is_ignored() -> None:
    other = entry(ACCEPTED, controller="example.net/gateway-controller")
    assert route_acceptance(route(other), OURS).accepted[0] == "Unknown"
    both = route(entry(REFUSED, controller="example.net/gateway-controller"), entry(ACCEPTED))
    assert route_acceptance(both, OURS).accepted[0] == "True"


def test_an_entry_for_another_parent_is_ignored() -> None:
    elsewhere = entry(ACCEPTED, parent={"name": "arks-gateway", "namespace": "team-a"})
    assert route_acceptance(route(elsewhere), OURS).accepted[0] == "Unknown"
    listener = entry(REFUSED, parent={**OURS, "sectionName": "admin"})
    assert route_acceptance(route(listener), OURS).accepted[0] == "Unknown"


def test_parent_refs_compare_with_gateway_apis_defaults() -> None:
    spelled_out = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw",
                   "namespace": "team-a"}  # fmt: skip
    assert parent_key(spelled_out, "team-a") == parent_key({"name": "gw"}, "team-a")
    assert parent_key({"name": "gw"}, "team-b") != parent_key({"name": "gw"}, "team-a")
    # The Gateway's controller may echo the ref with defaults filled in, or as written.
    echoed = route(entry(ACCEPTED, parent=spelled_out))
    assert route_acceptance(echoed, {"name": "gw"}).accepted[0] == "True"


def test_an_accepted_route_with_a_missing_backend_says_which() -> None:
    missing = ("False", "BackendNotFound", "Failed to process route rule 0 backendRef 1: service team-a/spill not found.")  # fmt: skip
    acceptance = route_acceptance(route(entry(ACCEPTED, resolved=missing)), OURS)
    assert acceptance.accepted[0] == "True"
    assert acceptance.unresolved is not None
    assert acceptance.unresolved[:2] == ("False", "BackendNotFound")
    assert "spill not found" in acceptance.unresolved[2]


def test_an_entry_without_an_accepted_condition_is_pending() -> None:
    assert route_acceptance(route(entry(None)), OURS).accepted[:2] == ("Unknown", "Pending")
    pending = entry(("Unknown", "Pending", "waiting for the Gateway"))
    status, reason, message = route_acceptance(route(pending), OURS).accepted
    assert (status, reason) == ("Unknown", "Pending") and "waiting for the Gateway" in message


def test_the_gateways_word_on_an_older_route_generation_is_pending() -> None:
    # The controller changed the route (generation 2); Envoy Gateway has only judged generation
    # 1: its Accepted says nothing of the new spec, which may be refused.
    changed = route(entry(ACCEPTED, resolved=("False", "BackendNotFound", "gone")))
    changed["metadata"]["generation"] = 2
    acceptance = route_acceptance(changed, OURS)
    status, reason, message = acceptance.accepted
    assert (status, reason) == ("Unknown", "Pending")
    assert "generation 2" in message and "generation 1" in message
    assert acceptance.unresolved is None, "nor is an older ResolvedRefs reported"
    changed["metadata"]["generation"] = 1
    assert route_acceptance(changed, OURS).accepted[0] == "True"
