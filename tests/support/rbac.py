"""RBAC as the API server evaluates it, for holding a client's requests against its Roles.

https://kubernetes.io/docs/reference/access-authn-authz/rbac/ : a request is allowed when some
rule of a bound role lists its API group, its resource (a subresource as `resource/sub`), its
verb, and, when the rule has `resourceNames`, its object's name (`create` and `list` carry no
name, so such rules cannot allow them). `*` matches anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.support.paths import REPO

RBAC_FILE = REPO / "manifests" / "base" / "rbac.yaml"


def _has(values: Iterable[str], value: str) -> bool:
    values = list(values)
    return "*" in values or value in values


def allows(
    rules: Iterable[Mapping[str, Any]], verb: str, group: str, resource: str, name: str | None
) -> bool:
    for rule in rules:
        if not (
            _has(rule.get("apiGroups", []), group) and _has(rule.get("resources", []), resource)
        ):
            continue
        if not _has(rule.get("verbs", []), verb):
            continue
        names = rule.get("resourceNames")
        if names and (name is None or name not in names):
            continue
        return True
    return False


def roles_of(
    service_account: str, path: Path = RBAC_FILE
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(cluster-wide rules, rules in the service account's own namespace) bound to it."""
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    roles = {
        (d["kind"], d["metadata"]["name"]): d
        for d in documents
        if d["kind"] in ("ClusterRole", "Role")
    }
    cluster: list[dict[str, Any]] = []
    local: list[dict[str, Any]] = []
    for binding in documents:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if not any(
            s.get("kind") == "ServiceAccount" and s["name"] == service_account
            for s in binding["subjects"]
        ):
            continue
        role = roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]
        (cluster if binding["kind"] == "ClusterRoleBinding" else local).extend(role["rules"])
    return cluster, local


def authorizer(
    service_account: str,
    user_agent: str,
    role_bindings: Iterable[Mapping[str, Any]] = (),
    path: Path = RBAC_FILE,
) -> Callable[[tuple[str, str, str, str, str | None, str | None]], bool]:
    """An authorizer for the API emulator (`KubeEmulator.authorize`): the requests that carry
    `user_agent` are held against what `path` grants `service_account` cluster-wide (its
    ClusterRoleBindings) and what each of `role_bindings` (RoleBindings, as an operator would add
    them, e.g. a tenant's opt-in) grants it in that binding's namespace. Other clients pass."""
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    roles = {
        (d["kind"], d["metadata"]["name"]): d
        for d in documents
        if d["kind"] in ("ClusterRole", "Role")
    }
    bound = [b for b in documents if b["kind"] in ("ClusterRoleBinding", "RoleBinding")]

    def binds(binding: Mapping[str, Any]) -> bool:
        return any(
            s.get("kind") == "ServiceAccount" and s["name"] == service_account
            for s in binding["subjects"]
        )

    cluster: list[dict[str, Any]] = []
    local: dict[str, list[dict[str, Any]]] = {}
    for binding in [*bound, *role_bindings]:
        if not binds(binding):
            continue
        rules = roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]["rules"]
        if binding["kind"] == "ClusterRoleBinding":
            cluster.extend(rules)
        else:
            # the install's own RoleBindings get their namespace from kustomize
            where = binding["metadata"].get("namespace", "arks-system")
            local.setdefault(where, []).extend(rules)

    def authorize(entry: tuple[str, str, str, str, str | None, str | None]) -> bool:
        agent, verb, group, resource, namespace, name = entry
        if agent != user_agent:
            return True
        if allows(cluster, verb, group, resource, name):
            return True
        return namespace is not None and allows(
            local.get(namespace, []), verb, group, resource, name
        )

    return authorize
