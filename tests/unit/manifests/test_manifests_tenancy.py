"""Tenants stay apart on the shared Gateway: who may attach routes to it (the listener's
allowedRoutes and the ValidatingAdmissionPolicy, its CEL evaluated by cel-python), what the
tenant roles grant, which pods may reach Redis and the services (NetworkPolicies, evaluated by
tests/support/netpol.py), and Redis's password kept out of command lines."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from arks.resources import ENDPOINTS, TOKENS
from arks.wire import ENVOY_GATEWAY_CONTROLLER, LABEL_TENANT
from controller.render.endpoint import render_httproute
from tests.support.manifests import DEPLOYMENTS, INSTALL, containers, of_kind, one
from tests.support.netpol import Pod, allows
from tests.support.paths import REPO
from tests.support.rbac import allows as rbac_allows

GATEWAY = one("Gateway", "arks-gateway", INSTALL)
POLICY = one("ValidatingAdmissionPolicy", "arks-gateway-routes", INSTALL)
BINDING = one("ValidatingAdmissionPolicyBinding", "arks-gateway-routes", INSTALL)
CONTROLLER_SA = DEPLOYMENTS["arks-controller"]["spec"]["template"]["spec"]["serviceAccountName"]
CONTROLLER = f"system:serviceaccount:arks-system:{CONTROLLER_SA}"
TENANT = "alice@example.com"
TENANT_SA = "system:serviceaccount:team-a:default"


# --- the listener -------------------------------------------------------------------------


def test_the_endpoint_status_trusts_the_controller_of_the_arks_gatewayclass_and_its_label() -> None:
    """RouteAccepted reads only the status entries of this GatewayClass's controller, and names
    the namespace label this listener selects on when it refuses a route."""
    gateway_class = one("GatewayClass", GATEWAY["spec"]["gatewayClassName"], INSTALL)
    assert gateway_class["spec"]["controllerName"] == ENVOY_GATEWAY_CONTROLLER
    (listener,) = GATEWAY["spec"]["listeners"]
    assert listener["allowedRoutes"]["namespaces"]["selector"]["matchLabels"] == {
        LABEL_TENANT: "true"
    }


def test_the_listener_takes_httproutes_only_from_labelled_namespaces() -> None:
    (listener,) = GATEWAY["spec"]["listeners"]
    allowed = listener["allowedRoutes"]
    assert allowed["kinds"] == [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}]
    assert allowed["namespaces"] == {
        "from": "Selector",
        "selector": {"matchLabels": {"arks.ai/tenant": "true"}},
    }
    # ListenerSets may add listeners (with their own allowedRoutes) only where the Gateway
    # allows them; its default is none.
    assert "allowedListeners" not in GATEWAY["spec"]


# --- the admission policy: CEL as the API server evaluates it -------------------------------


def _admit(
    route: dict[str, Any],
    user: str,
    operation: str = "CREATE",
    old: dict[str, Any] | None = None,
) -> bool:
    """Evaluate the policy's variables, then its validations, on one admission request."""
    env = celpy.Environment()
    activation: dict[str, Any] = {
        "object": celpy.json_to_cel(route),
        "oldObject": celpy.json_to_cel(old) if old is not None else None,
        "request": celpy.json_to_cel(
            {
                "operation": operation,
                "namespace": route["metadata"]["namespace"],
                "userInfo": {"username": user},
            }
        ),
    }
    variables = celpy.celtypes.MapType({})  # each variable sees the ones before it
    for variable in POLICY["spec"]["variables"]:
        program = env.program(env.compile(variable["expression"]))
        value = program.evaluate({**activation, "variables": variables})
        assert isinstance(value, celpy.celtypes.BoolType), (variable, value)
        variables[celpy.celtypes.StringType(variable["name"])] = value
    for validation in POLICY["spec"]["validations"]:
        program = env.program(env.compile(validation["expression"]))
        verdict = program.evaluate({**activation, "variables": variables})
        assert isinstance(verdict, celpy.celtypes.BoolType), (validation, verdict)
        if not verdict:
            return False
    return True


def _route(namespace: str, parent: dict[str, str], **match: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": namespace},
        "spec": {
            "parentRefs": [parent],
            "rules": [{"matches": [match or {"path": {"type": "PathPrefix", "value": "/"}}]}],
        },
    }


VICTIM_HEADERS = {
    "path": {"type": "PathPrefix", "value": "/v1"},
    "headers": [
        {"name": "x-arks-namespace", "value": "victim"},
        {"name": "x-arks-model", "value": "llama"},
        {"name": "x-anything", "value": "more-specific"},
    ],
}
ARKS_GATEWAY = {"name": "arks-gateway", "namespace": "arks-system"}


def test_the_controllers_rendered_route_is_admitted() -> None:
    endpoint = {"metadata": {"name": "llama", "namespace": "team-a"}, "spec": {}}
    route = render_httproute(endpoint, [])
    assert _admit(route, CONTROLLER)
    changed = copy.deepcopy(route)
    changed["spec"]["rules"][0]["matches"][0]["path"]["value"] = "/v2"
    assert _admit(changed, CONTROLLER, "UPDATE", route)


@pytest.mark.parametrize(
    "parent",
    [
        ARKS_GATEWAY,
        {**ARKS_GATEWAY, "group": "gateway.networking.k8s.io", "kind": "Gateway"},
        {**ARKS_GATEWAY, "sectionName": "http"},
        {**ARKS_GATEWAY, "port": 80},
    ],
)
@pytest.mark.parametrize("user", [TENANT, TENANT_SA])
def test_a_tenants_route_to_the_arks_gateway_is_refused(parent: dict[str, Any], user: str) -> None:
    assert not _admit(_route("team-b", parent, **VICTIM_HEADERS), user)


def test_a_route_in_arks_system_without_a_namespace_still_names_the_arks_gateway() -> None:
    assert not _admit(_route("arks-system", {"name": "arks-gateway"}), TENANT)


def test_a_second_parent_does_not_smuggle_the_arks_gateway_in() -> None:
    route = _route("team-b", {"name": "own", "namespace": "team-b"})
    route["spec"]["parentRefs"].append(ARKS_GATEWAY)
    assert not _admit(route, TENANT)


@pytest.mark.parametrize(
    "parent",
    [
        {"name": "own-gateway"},
        {"name": "arks-gateway"},  # a Gateway of that name in the tenant's own namespace
        {"name": "arks-gateway", "namespace": "elsewhere"},
        {**ARKS_GATEWAY, "kind": "Service", "group": ""},  # a mesh route, not a Gateway
    ],
)
def test_routes_to_other_parents_are_none_of_its_business(parent: dict[str, str]) -> None:
    assert _admit(_route("team-b", parent), TENANT)


def test_a_tenant_may_not_change_the_spec_of_a_controller_route() -> None:
    endpoint = {"metadata": {"name": "llama", "namespace": "team-a"}, "spec": {}}
    route = render_httproute(endpoint, [])
    hijacked = copy.deepcopy(route)
    hijacked["spec"]["rules"][0]["backendRefs"] = [{"name": "evil", "port": 80}]
    assert not _admit(hijacked, TENANT, "UPDATE", route)
    # Metadata only (labels, owner references: the garbage collector) passes.
    relabelled = copy.deepcopy(route)
    relabelled["metadata"]["labels"]["x"] = "y"
    assert _admit(
        relabelled, "system:serviceaccount:kube-system:generic-garbage-collector", "UPDATE", route
    )


def test_the_refusal_says_who_and_why() -> None:
    (validation,) = POLICY["spec"]["validations"]
    env = celpy.Environment()
    message = env.program(env.compile(validation["messageExpression"])).evaluate(
        {"request": celpy.json_to_cel({"userInfo": {"username": TENANT}})}
    )
    assert TENANT in message and "ArksEndpoints" in message


def test_the_policy_covers_every_route_kind_an_http_listener_takes_and_denies() -> None:
    (rule,) = POLICY["spec"]["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == ["gateway.networking.k8s.io"]
    assert set(rule["resources"]) == {"httproutes", "grpcroutes"}
    assert set(rule["operations"]) == {"CREATE", "UPDATE"}
    assert POLICY["spec"]["failurePolicy"] == "Fail"
    assert BINDING["spec"] == {"policyName": "arks-gateway-routes", "validationActions": ["Deny"]}


def test_the_policy_names_the_gateway_the_controller_attaches_to() -> None:
    from controller.server import build_parser

    namespace, name = build_parser().parse_args([]).default_gateway.split("/")
    expressions = " ".join(v["expression"] for v in POLICY["spec"]["variables"])
    assert f"'{name}'" in expressions and f"'{namespace}'" in expressions
    assert (GATEWAY["metadata"]["namespace"], GATEWAY["metadata"]["name"]) == (namespace, name)
    assert f"'{CONTROLLER}'" in expressions


# --- tenant roles ---------------------------------------------------------------------------

ARKS_KINDS = ["arksmodels", "arksapplications", "arksdisaggregatedapplications", "arksendpoints"]


def _rules(name: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = one("ClusterRole", name, INSTALL)["rules"]
    return rules


def test_the_roles_aggregate_into_kubernetes_standard_roles() -> None:
    """`view` is aggregated into `edit` and `edit` into `admin` (Kubernetes' bootstrap policy),
    so one label each reaches all the roles above."""
    labels = {
        n: one("ClusterRole", n, INSTALL)["metadata"]["labels"] for n in ("arks-edit", "arks-view")
    }
    assert labels["arks-edit"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["arks-view"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"


def test_edit_writes_the_tenants_own_kinds() -> None:
    rules = _rules("arks-edit")
    for resource in [*ARKS_KINDS, "arkstokens"]:
        for verb in ("get", "list", "watch", "create", "update", "patch", "delete"):
            assert rbac_allows(rules, verb, "arks.ai", resource, "x"), (verb, resource)


@pytest.mark.parametrize("role", ["arks-edit", "arks-view"])
def test_no_tenant_role_writes_quotas_status_routes_or_backends(role: str) -> None:
    rules = _rules(role) + (_rules("arks-view") if role == "arks-edit" else [])
    for verb in ("create", "update", "patch", "delete"):
        assert not rbac_allows(rules, verb, "arks.ai", "arksquotas", "q")
        for kind in [*ARKS_KINDS, "arkstokens", "arksquotas"]:
            assert not rbac_allows(rules, verb, "arks.ai", f"{kind}/status", "x")
        assert not rbac_allows(rules, verb, "gateway.networking.k8s.io", "httproutes", "r")
        assert not rbac_allows(rules, verb, "gateway.networking.k8s.io", "referencegrants", "r")
        assert not rbac_allows(rules, verb, "gateway.envoyproxy.io", "backends", "b")
    groups = {g for rule in _rules(role) for g in rule["apiGroups"]}
    assert groups == {"arks.ai"}


def test_view_reads_without_writing_and_without_tokens() -> None:
    """The deprecated ArksToken spec.token is a token in plain text: `view`, which Kubernetes
    keeps away from Secrets, does not read ArksTokens."""
    rules = _rules("arks-view")
    for resource in [*ARKS_KINDS, "arksquotas"]:
        assert rbac_allows(rules, "list", "arks.ai", resource, None)
    assert {v for rule in rules for v in rule["verbs"]} == {"get", "list", "watch"}
    assert not any("arkstokens" in r for rule in rules for r in rule["resources"])


# --- NetworkPolicies ------------------------------------------------------------------------

POLICIES = of_kind("NetworkPolicy")


def _pod(name: str) -> Pod:
    workload = (
        one("Deployment", name, INSTALL)
        if name in DEPLOYMENTS
        else one("StatefulSet", name, INSTALL)
    )
    return Pod("arks-system", workload["spec"]["template"]["metadata"]["labels"])


REDIS, EXTPROC, RATELIMIT, CONTROLLER_POD = (
    _pod(n) for n in ("arks-redis", "arks-extproc", "arks-ratelimit", "arks-controller")
)
# Envoy Gateway v1.9's labels (internal/infrastructure/kubernetes/proxy/resource.go and
# ratelimit/resource.go; internal/gatewayapi/translator.go for the owning-gateway pair).
ENVOY_LABELS = {
    "app.kubernetes.io/name": "envoy",
    "app.kubernetes.io/component": "proxy",
    "app.kubernetes.io/managed-by": "envoy-gateway",
}
ARKS_ENVOY = Pod(
    "envoy-gateway-system",
    {
        **ENVOY_LABELS,
        "gateway.envoyproxy.io/owning-gateway-name": "arks-gateway",
        "gateway.envoyproxy.io/owning-gateway-namespace": "arks-system",
    },
)
OTHER_ENVOY = Pod(
    "envoy-gateway-system",
    {
        **ENVOY_LABELS,
        "gateway.envoyproxy.io/owning-gateway-name": "tenant-gateway",
        "gateway.envoyproxy.io/owning-gateway-namespace": "team-a",
    },
)
EG_RATELIMIT = Pod(
    "envoy-gateway-system",
    {
        "app.kubernetes.io/name": "envoy-ratelimit",
        "app.kubernetes.io/component": "ratelimit",
        "app.kubernetes.io/managed-by": "envoy-gateway",
    },
)
PROMETHEUS = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
TENANT_POD = Pod("team-a", {"app.kubernetes.io/name": "arks-extproc"})  # labels are free to fake
IMPOSTOR = Pod("envoy-gateway-system", {"app.kubernetes.io/name": "arks-extproc"})
DNS = Pod("kube-system", {"k8s-app": "kube-dns"})
# NodeLocal DNSCache: a hostNetwork pod answering on a link-local address (169.254.20.10 in the
# Kubernetes add-on's manifest and on GKE), which pods reach instead of kube-dns.
NODE_LOCAL_DNS = Pod("kube-system", {"k8s-app": "node-local-dns"}, "169.254.20.10", True)


@pytest.mark.parametrize(
    ("source", "destination", "port", "allowed"),
    [
        (EXTPROC, REDIS, 6379, True),
        (RATELIMIT, REDIS, 6379, True),
        (EG_RATELIMIT, REDIS, 6379, True),
        (CONTROLLER_POD, REDIS, 6379, False),
        (TENANT_POD, REDIS, 6379, False),
        (IMPOSTOR, REDIS, 6379, False),
        (ARKS_ENVOY, REDIS, 6379, False),
        (PROMETHEUS, REDIS, 6379, False),
        (ARKS_ENVOY, EXTPROC, 50051, True),
        (ARKS_ENVOY, RATELIMIT, 8081, True),
        (OTHER_ENVOY, EXTPROC, 50051, False),
        (OTHER_ENVOY, RATELIMIT, 8081, False),
        (TENANT_POD, EXTPROC, 50051, False),
        (TENANT_POD, RATELIMIT, 8081, False),
        (ARKS_ENVOY, EXTPROC, 9101, False),
        (PROMETHEUS, EXTPROC, 9101, True),
        (PROMETHEUS, RATELIMIT, 9102, True),
        (PROMETHEUS, CONTROLLER_POD, 9103, True),
        (PROMETHEUS, EXTPROC, 50051, False),
        (TENANT_POD, CONTROLLER_POD, 9103, False),
        (TENANT_POD, EXTPROC, 9101, False),
        (RATELIMIT, DNS, 53, True),
        (RATELIMIT, TENANT_POD, 8000, False),
        (REDIS, DNS, 53, False),
        (EXTPROC, TENANT_POD, 8000, True),  # it scrapes engines (least-load picking)
    ],
)
def test_network_policies_allow_exactly_the_intended_flows(
    source: Pod, destination: Pod, port: int, allowed: bool
) -> None:
    assert allows(POLICIES, source, destination, port) is allowed


def test_dns_is_allowed_over_udp_too() -> None:
    assert allows(POLICIES, RATELIMIT, DNS, 53, "UDP")


@pytest.mark.parametrize("protocol", ["UDP", "TCP"])
def test_a_node_local_dns_cache_answers_the_rate_limit_service(protocol: str) -> None:
    """Without it the rate-limit service cannot resolve arks-redis and fails open."""
    assert allows(POLICIES, RATELIMIT, NODE_LOCAL_DNS, 53, protocol)
    assert not allows(POLICIES, RATELIMIT, NODE_LOCAL_DNS, 8080)
    assert not allows(POLICIES, RATELIMIT, replace(NODE_LOCAL_DNS, ip="169.254.169.254"), 53)


def test_every_arks_pod_is_isolated_for_ingress() -> None:
    for pod in (REDIS, EXTPROC, RATELIMIT, CONTROLLER_POD):
        assert not allows(POLICIES, TENANT_POD, pod, 12345)


def test_the_policies_target_the_ports_the_services_listen_on() -> None:
    declared = {
        p["containerPort"]
        for workload in of_kind("Deployment") + of_kind("StatefulSet")
        for c in containers(workload)
        for p in c.get("ports", [])
    }
    for policy in POLICIES:
        for rule in policy["spec"].get("ingress", []):
            for port in rule["ports"]:
                assert port["port"] in declared, policy["metadata"]["name"]


# --- Redis's password -----------------------------------------------------------------------


def _command_line(container: dict[str, Any]) -> str:
    return " ".join([*container.get("command", []), *container.get("args", [])])


def test_redis_takes_its_password_from_the_secret_and_not_from_its_command_line() -> None:
    (redis,) = containers(one("StatefulSet", "arks-redis", INSTALL))
    env = {e["name"]: e for e in redis["env"]}
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == {
        "name": "arks-redis",
        "key": "password",
    }
    assert "requirepass $REDISCLI_AUTH" in _command_line(redis)
    assert "redis-server /etc/redis/redis.conf -" in _command_line(redis)
    # REDISCLI_AUTH; -e: an error reply fails the probe
    assert redis["readinessProbe"]["exec"]["command"] == ["redis-cli", "-e", "ping"]


@pytest.mark.parametrize("name", ["arks-extproc", "arks-ratelimit"])
def test_the_redis_clients_read_the_password_from_the_mounted_secret(name: str) -> None:
    from tests.unit.manifests.test_manifests import _parse

    pod = DEPLOYMENTS[name]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = _parse(name, container)
    path: Path = settings.redis_password_file
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "arks-redis"
    assert {"key": "password", "path": path.name} in volume["secret"]["items"]
    assert "env" not in container  # nothing of the password in the environment either


# --- how many objects a tenant may create ------------------------------------------------------


def test_the_tenant_sample_caps_the_count_of_every_kind_a_tenant_writes_and_the_gateway_holds() -> (
    None
):
    """The gateway holds every ArksToken and ArksEndpoint of every namespace in memory; without
    an object-count quota one tenant's million tokens would run it out of memory for all. The
    sample ResourceQuota names each kind `arks-edit` lets a tenant create, in the API server's
    `count/<plural>.<group>` syntax, with a positive whole number."""
    path = REPO / "manifests" / "samples" / "tenant" / "object-counts-quota.yaml"
    (quota,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert (quota["apiVersion"], quota["kind"]) == ("v1", "ResourceQuota")
    edit = one("ClusterRole", "arks-edit", INSTALL)
    written = {
        f"{resource}.{rule_group}"
        for rule in edit["rules"]
        if "create" in rule["verbs"]
        for rule_group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    for resource in (TOKENS, ENDPOINTS):  # the ones the gateway watches
        assert f"{resource.plural}.{resource.group}" in written
    hard = quota["spec"]["hard"]
    assert set(hard) == {f"count/{w}" for w in written}
    assert all(isinstance(v, str) and v.isdigit() and int(v) > 0 for v in hard.values())
