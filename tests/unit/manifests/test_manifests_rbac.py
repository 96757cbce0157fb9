"""Least privilege: what each service account may do, read from the installed RBAC objects."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.manifests import DEPLOYMENTS, INSTALL, of_kind, one

WRITE = {"create", "update", "patch", "delete", "deletecollection"}
READ = {"get", "list", "watch"}


def bindings_of(account: str) -> Iterator[dict[str, Any]]:
    for binding in of_kind("ClusterRoleBinding") + of_kind("RoleBinding"):
        for subject in binding.get("subjects", []):
            if subject["kind"] == "ServiceAccount" and subject["name"] == account:
                assert subject["namespace"] == "arks-system"
                yield binding


def rules_of(account: str) -> list[tuple[str, dict[str, Any]]]:
    """(scope, rule) for every rule granted to `account`: scope is "cluster" or a namespace."""
    out: list[tuple[str, dict[str, Any]]] = []
    for binding in bindings_of(account):
        ref = binding["roleRef"]
        role = one(ref["kind"], ref["name"], INSTALL)
        scope = (
            "cluster"
            if binding["kind"] == "ClusterRoleBinding"
            else binding["metadata"]["namespace"]
        )
        out.extend((scope, rule) for rule in role["rules"])
    return out


def verbs(account: str, group: str, resource: str, scope: str | None = None) -> set[str]:
    granted: set[str] = set()
    for where, rule in rules_of(account):
        if scope is not None and where != scope:
            continue
        if group in rule["apiGroups"] and resource in rule["resources"]:
            granted |= set(rule["verbs"])
    return granted


ROLES = of_kind("ClusterRole") + of_kind("Role")


@pytest.mark.parametrize("role", ROLES, ids=[r["metadata"]["name"] for r in ROLES])
def test_no_wildcards(role: dict[str, Any]) -> None:
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(field, []), f"{role['metadata']['name']}: {field}"
        assert not rule.get("nonResourceURLs")
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


@pytest.mark.parametrize("role", ROLES, ids=[r["metadata"]["name"] for r in ROLES])
def test_nobody_writes_secrets(role: dict[str, Any]) -> None:
    for rule in role["rules"]:
        if "" in rule["apiGroups"] and "secrets" in rule["resources"]:
            assert set(rule["verbs"]) <= READ


def test_each_service_runs_as_its_own_account() -> None:
    accounts = {
        name: d["spec"]["template"]["spec"]["serviceAccountName"] for name, d in DEPLOYMENTS.items()
    }
    assert accounts == {n: n for n in ("arks-extproc", "arks-ratelimit", "arks-controller")}
    for account in accounts.values():
        one("ServiceAccount", account, INSTALL)


def test_ratelimit_has_no_rights_and_no_token() -> None:
    assert not list(bindings_of("arks-ratelimit"))
    assert one("ServiceAccount", "arks-ratelimit", INSTALL)["automountServiceAccountToken"] is False


def test_extproc_reads_its_policy_and_writes_only_quota_status() -> None:
    for resource in ("arkstokens", "arksquotas", "arksendpoints"):
        assert verbs("arks-extproc", "arks.ai", resource) == READ
    assert verbs("arks-extproc", "arks.ai", "arksquotas/status") == {"get", "patch", "update"}
    assert verbs("arks-extproc", "gateway.envoyproxy.io", "backends") == READ
    assert verbs("arks-extproc", "", "secrets") == set()  # the gateway reads no Secrets
    written = {
        (group, resource)
        for _, rule in rules_of("arks-extproc")
        if WRITE & set(rule["verbs"])
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert written == {("arks.ai", "arksquotas/status")}


def test_controller_can_do_what_it_reconciles() -> None:
    for resource in (
        "arksmodels",
        "arksapplications",
        "arksdisaggregatedapplications",
        "arksendpoints",
        "arkstokens",
    ):
        assert READ <= verbs("arks-controller", "arks.ai", resource)
        assert WRITE & verbs("arks-controller", "arks.ai", resource) <= {
            "patch",
            "update",
        }  # finalizers only
        assert "create" not in verbs("arks-controller", "arks.ai", resource)
        assert {"patch", "update"} <= verbs("arks-controller", "arks.ai", f"{resource}/status")
        assert "update" in verbs("arks-controller", "arks.ai", f"{resource}/finalizers")
    assert verbs("arks-controller", "arks.ai", "arksquotas") == READ
    owned = [
        ("apps", "deployments"),
        ("apps", "daemonsets"),
        ("", "services"),
        ("", "persistentvolumeclaims"),
        ("", "serviceaccounts"),
        ("batch", "jobs"),
        ("autoscaling", "horizontalpodautoscalers"),
        ("leaderworkerset.x-k8s.io", "leaderworkersets"),
        ("keda.sh", "scaledobjects"),
        ("gateway.networking.k8s.io", "httproutes"),
        ("rbac.authorization.k8s.io", "roles"),
        ("rbac.authorization.k8s.io", "rolebindings"),
    ]
    for group, resource in owned:
        assert READ | {"create", "patch", "update", "delete"} <= verbs(
            "arks-controller", group, resource
        ), resource
    assert verbs("arks-controller", "", "pods") == READ
    assert verbs("arks-controller", "", "secrets") == set()  # only where a tenant opts in
    assert {"create", "patch"} <= verbs("arks-controller", "", "events")
    assert {"create", "patch"} <= verbs("arks-controller", "events.k8s.io", "events")


def test_controller_may_grant_the_routers_role_because_it_holds_it() -> None:
    """Kubernetes refuses a Role granting more than its creator holds: the SGLang router's
    pods get/list/watch must be the controller's own, cluster-wide."""
    assert READ <= verbs("arks-controller", "", "pods", scope="cluster")


def test_leases_only_in_its_own_namespace_and_only_its_own() -> None:
    assert not verbs("arks-controller", "coordination.k8s.io", "leases", scope="cluster")
    lease_rules = [r for _, r in rules_of("arks-controller") if "leases" in r["resources"]]
    assert {v for r in lease_rules for v in r["verbs"]} == {"get", "create", "update", "patch"}
    for rule in lease_rules:
        if set(rule["verbs"]) != {"create"}:  # create cannot be limited by name
            assert rule["resourceNames"] == ["arks-controller"]
    from controller.server import build_parser

    assert build_parser().parse_args([]).lease_name == "arks-controller"
    role_binding = [b for b in bindings_of("arks-controller") if b["kind"] == "RoleBinding"]
    assert [b["metadata"]["namespace"] for b in role_binding] == ["arks-system"]


def test_nothing_else_is_granted_to_anyone() -> None:
    accounts = {
        s["name"]
        for b in of_kind("ClusterRoleBinding") + of_kind("RoleBinding")
        for s in b["subjects"]
    }
    assert accounts == {"arks-controller", "arks-extproc"}


def test_the_rbac_evaluator_used_against_the_controller_process_refuses_what_it_should() -> None:
    from tests.support.rbac import allows, roles_of

    cluster, own = roles_of("arks-controller")
    assert allows(cluster, "patch", "arks.ai", "arksmodels/status", "m")
    assert not allows(cluster, "create", "", "secrets", None)
    assert not allows(cluster, "delete", "arks.ai", "arksquotas", "q")
    assert allows(own, "update", "coordination.k8s.io", "leases", "arks-controller")
    assert not allows(own, "update", "coordination.k8s.io", "leases", "someone-elses")
    assert not allows(own, "list", "coordination.k8s.io", "leases", None)
    assert roles_of("arks-ratelimit") == ([], [])


def test_no_cluster_role_bound_cluster_wide_reads_secrets() -> None:
    """RBAC cannot limit a list or watch to a label: a cluster-wide read of Secrets would be all
    of them. Neither service holds one; the controller reads a namespace's only where that
    namespace binds it arks-token-secret-reader."""
    for binding in of_kind("ClusterRoleBinding"):
        role = one("ClusterRole", binding["roleRef"]["name"], INSTALL)
        for rule in role["rules"]:
            if "" in rule["apiGroups"] and "secrets" in rule["resources"]:
                raise AssertionError(f"{role['metadata']['name']} reads Secrets cluster-wide")


def test_the_secret_reader_role_is_shipped_unbound_and_reads_only() -> None:
    role = one("ClusterRole", "arks-token-secret-reader", INSTALL)
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}
    ]
    bound = of_kind("ClusterRoleBinding") + of_kind("RoleBinding")
    assert not [b for b in bound if b["roleRef"]["name"] == "arks-token-secret-reader"]
    from controller.reconcilers.token import SECRET_READER_ROLE

    assert SECRET_READER_ROLE == "arks-token-secret-reader"
