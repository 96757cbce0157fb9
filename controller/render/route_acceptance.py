"""Whether the Gateway took an ArksEndpoint's HTTPRoute, from the route's status: pure.

Gateway API has the Gateway's controller write one `status.parents[]` entry per parentRef it
manages (RouteParentStatus: `parentRef`, `controllerName`, `conditions`). Only the entry for the
route's own parentRef written by `controller_name` (Envoy Gateway's, `arks.wire`) counts: any
other controller may write entries of its own. Its `Accepted` condition becomes the endpoint's
`RouteAccepted`; `ResolvedRefs` False (a backend missing or not permitted) is reported too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from arks.wire import ENVOY_GATEWAY_CONTROLLER, LABEL_TENANT

GATEWAY_GROUP = "gateway.networking.k8s.io"
# Gateway API's RouteConditionType / RouteConditionReason values (apis/v1/shared_types.go).
ACCEPTED = "Accepted"
RESOLVED_REFS = "ResolvedRefs"
NOT_ALLOWED_BY_LISTENERS = "NotAllowedByListeners"  # e.g. the namespace is not a tenant's
PENDING = "Pending"  # RouteReasonPending: the Gateway's controller has not reconciled it yet

Condition = tuple[str, str, str]
"""(status, reason, message)."""


@dataclass(frozen=True)
class RouteAcceptance:
    accepted: Condition  # the endpoint's RouteAccepted condition
    unresolved: Condition | None = None  # ResolvedRefs False, as the Gateway wrote it


def parent_key(ref: Mapping[str, Any], route_namespace: str) -> tuple[str, str, str, str, str, str]:
    """A ParentReference with Gateway API's defaults filled in, for comparing two of them
    (group gateway.networking.k8s.io, kind Gateway, the route's namespace)."""
    return (
        str(ref.get("group") if ref.get("group") is not None else GATEWAY_GROUP),
        str(ref.get("kind") or "Gateway"),
        str(ref.get("namespace") or route_namespace),
        str(ref.get("name") or ""),
        str(ref.get("sectionName") or ""),
        str(ref.get("port") or ""),
    )


def _named(ref: Mapping[str, Any], route_namespace: str) -> str:
    _group, _kind, namespace, name, section, port = parent_key(ref, route_namespace)
    where = f"{namespace}/{name}"
    if section:
        where += f" listener {section}"
    if port:
        where += f" port {port}"
    return where


MAX_MESSAGE = 1024  # of the Gateway's message quoted in ours (a condition message is <= 32768)


def _said(condition: Mapping[str, Any]) -> str:
    return str(condition.get("message") or condition.get("reason") or "")[:MAX_MESSAGE]


def _condition(entry: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for condition in entry.get("conditions") or []:
        if condition.get("type") == type_:
            return dict(condition)
    return None


def _stale(condition: Mapping[str, Any] | None, generation: Any) -> int | None:
    """The older route generation `condition` is about, or None when it is current (or either
    generation is unknown). The Gateway's word on an earlier spec says nothing of this one:
    a route changed to a listener that refuses it would still read Accepted."""
    if condition is None or generation is None or condition.get("observedGeneration") is None:
        return None
    observed = int(condition["observedGeneration"])
    return observed if observed < int(generation) else None


def route_acceptance(
    route: Mapping[str, Any],
    parent: Mapping[str, Any],
    controller_name: str = ENVOY_GATEWAY_CONTROLLER,
) -> RouteAcceptance:
    """What `controller_name` says in `route`'s status about its parentRef `parent`."""
    meta = route.get("metadata") or {}
    namespace = str(meta.get("namespace") or "")
    wanted = parent_key(parent, namespace)
    gateway = f"Gateway {_named(parent, namespace)}"
    entries = [
        entry
        for entry in (route.get("status") or {}).get("parents") or []
        if entry.get("controllerName") == controller_name
        and parent_key(entry.get("parentRef") or {}, namespace) == wanted
    ]
    accepted = _condition(entries[0], ACCEPTED) if entries else None
    stale = _stale(accepted, meta.get("generation"))
    if stale is not None:
        message = (
            f"{controller_name} has not yet looked at generation {meta.get('generation')} of "
            f"HTTPRoute {meta.get('name')} in {gateway} (its word is about generation {stale})"
        )
        return RouteAcceptance(("Unknown", PENDING, message))
    if accepted is None or accepted.get("status") not in ("True", "False"):
        message = f"no word from {controller_name} on HTTPRoute {meta.get('name')} in {gateway} yet"
        if accepted is not None and accepted.get("message"):
            message += f": {_said(accepted)}"
        reason = str((accepted or {}).get("reason") or PENDING)
        return RouteAcceptance(("Unknown", reason, message))
    reason = str(accepted.get("reason") or ACCEPTED)
    message = f"{gateway}: {_said(accepted) or reason}"
    if reason == NOT_ALLOWED_BY_LISTENERS:
        message += f" (is the namespace {namespace} labelled {LABEL_TENANT}=true?)"
    resolved = _condition(entries[0], RESOLVED_REFS)
    unresolved = None
    if resolved is not None and resolved.get("status") == "False":
        unresolved = (
            "False",
            str(resolved.get("reason") or RESOLVED_REFS),
            f"{gateway}: {_said(resolved)}",
        )
    return RouteAcceptance((str(accepted["status"]), reason, message), unresolved)
