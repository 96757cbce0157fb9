"""What `kubectl apply -k manifests/` installs: every object valid, and wired together.

Core kinds are validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: no
unknown fields); Envoy Gateway, Gateway API and Prometheus Operator kinds against their upstream
CRD schemas (vendored in tests/schemas), strictly; CRDs are core kinds. The container command lines are
parsed by the services' own argument parsers, so a flag that does not exist fails here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.crd_schema import upstream_schema
from tests.support.manifests import (
    AUTOSCALING,
    CLUSTER_SCOPED,
    DEPLOYMENTS,
    EVERYTHING,
    INSTALL,
    MANIFESTS,
    MONITORING,
    WORKLOADS,
    containers,
    of_kind,
    one,
    where,
)

# Envoy Gateway v1.9's Kubernetes range (its compatibility matrix), which the READMEs state: core
# kinds are validated against the schemas of both ends.
KUBERNETES = ("1.33", "1.36")
IMAGE = "ghcr.io/arks-ai/arks"

# Kinds of other projects, by apiVersion and kind: (upstream CRD file, version).
UPSTREAM = {
    ("gateway.networking.k8s.io/v1", "GatewayClass"): (
        "gateway.networking.k8s.io_gatewayclasses.yaml",
        "v1",
    ),
    ("gateway.networking.k8s.io/v1", "Gateway"): ("gateway.networking.k8s.io_gateways.yaml", "v1"),
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy"): (
        "gateway.envoyproxy.io_envoyproxies.yaml",
        "v1alpha1",
    ),
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"): (
        "gateway.envoyproxy.io_envoyextensionpolicies.yaml",
        "v1alpha1",
    ),
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyPatchPolicy"): (
        "gateway.envoyproxy.io_envoypatchpolicies.yaml",
        "v1alpha1",
    ),
    ("gateway.envoyproxy.io/v1alpha1", "BackendTrafficPolicy"): (
        "gateway.envoyproxy.io_backendtrafficpolicies.yaml",
        "v1alpha1",
    ),
    ("gateway.envoyproxy.io/v1alpha1", "ClientTrafficPolicy"): (
        "gateway.envoyproxy.io_clienttrafficpolicies.yaml",
        "v1alpha1",
    ),
    ("gateway.envoyproxy.io/v1alpha1", "SecurityPolicy"): (
        "gateway.envoyproxy.io_securitypolicies.yaml",
        "v1alpha1",
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): (
        "monitoring.coreos.com_servicemonitors.yaml",
        "v1",
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): ("monitoring.coreos.com_podmonitors.yaml", "v1"),
    ("monitoring.coreos.com/v1", "PrometheusRule"): (
        "monitoring.coreos.com_prometheusrules.yaml",
        "v1",
    ),
}


# --- every object valid --------------------------------------------------------------------


@pytest.mark.parametrize("doc", EVERYTHING, ids=[where(d) for d in EVERYTHING])
def test_every_object_is_valid(doc: dict[str, Any]) -> None:
    validate(doc)


def validate(doc: dict[str, Any]) -> None:
    """Strictly, against the upstream schema of its kind (also for charts/arks's renders)."""
    key = (doc["apiVersion"], doc["kind"])
    if key in UPSTREAM:
        jsonschema.validate(doc, upstream_schema(*UPSTREAM[key]))
    else:
        assert "." not in doc["apiVersion"].split("/")[0] or doc["apiVersion"].endswith(
            ".k8s.io/v1"
        ), f"{where(doc)}: a custom kind without a schema to validate it against"
        for version in KUBERNETES:
            kubernetes_validate.validate(doc, f"{version}.0", strict=True)


def test_the_readmes_state_the_supported_kubernetes_range() -> None:
    low, high = KUBERNETES
    for readme in (MANIFESTS / "README.md", MANIFESTS.parent / "README.md"):
        assert f"Kubernetes {low}\u2013{high}" in readme.read_text(), readme  # an en dash


def test_install_has_each_piece() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in INSTALL}
    for expected in [
        ("Namespace", "arks-system"),
        ("Deployment", "arks-extproc"),
        ("Deployment", "arks-ratelimit"),
        ("Deployment", "arks-controller"),
        ("StatefulSet", "arks-redis"),
        ("GatewayClass", "arks"),
        ("Gateway", "arks-gateway"),
        ("EnvoyExtensionPolicy", "arks-extproc"),
        ("EnvoyPatchPolicy", "arks-filters"),
        ("BackendTrafficPolicy", "arks-backends"),
    ]:
        assert expected in kinds
    assert len(of_kind("CustomResourceDefinition")) == 6


def test_namespaced_objects_land_in_arks_system() -> None:
    for doc in EVERYTHING:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == "arks-system", where(doc)


def test_names_are_unique_per_kind() -> None:
    keys = [(d["kind"], d["metadata"]["name"]) for d in EVERYTHING]
    assert len(keys) == len(set(keys))


def test_rendering_agrees_with_real_kustomize() -> None:
    """tests.support.manifests.build() is the subset of kustomize the manifests use; kubectl's kustomize
    must print the same objects (kubectl is on these machines; without it this check fails)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to check `kubectl apply -k`"
    for directory, mine in (
        (MANIFESTS, INSTALL),
        (MANIFESTS / "monitoring", MONITORING),
        (MANIFESTS / "autoscaling", AUTOSCALING),
    ):
        out = subprocess.run(
            [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True
        )
        theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
        assert sorted(map(yaml.safe_dump, theirs)) == sorted(map(yaml.safe_dump, mine))


# --- the services: command lines, ports, probes, selectors ------------------------------------


def _parse(workload: str, container: dict[str, Any]) -> Any:
    command = [*container["command"], *container["args"]]
    assert command[:2] == ["python", "-m"], workload
    module, args = command[2], command[3:]
    if module == "extproc":
        from extproc.server import Settings as ExtprocSettings

        return ExtprocSettings.from_args(args)
    if module == "ratelimit":
        from ratelimit.server import Settings as RateLimitSettings

        return RateLimitSettings.from_args(args)
    assert module == "controller"
    from controller.server import build_parser

    return build_parser().parse_args(args)


def test_service_command_lines_parse_with_the_services_own_flags() -> None:
    extproc = _parse("extproc", next(containers(DEPLOYMENTS["arks-extproc"])))
    assert extproc.kube_host == "in-cluster" and extproc.redis == "redis://arks-redis:6379/0"
    assert extproc.grpc_address == "0.0.0.0:50051" and extproc.metrics_address == "0.0.0.0"
    ratelimit = _parse("ratelimit", next(containers(DEPLOYMENTS["arks-ratelimit"])))
    assert ratelimit.config == (Path("/etc/ratelimit/config.yaml"),)
    assert (
        ratelimit.redis == "redis://arks-redis:6379/0" and ratelimit.grpc_address == "0.0.0.0:8081"
    )
    controller = _parse("controller", next(containers(DEPLOYMENTS["arks-controller"])))
    assert controller.kube_host == "in-cluster" and controller.identity == "$(POD_NAME)"
    assert controller.default_gateway == "arks-system/arks-gateway"


def test_listening_ports_are_the_declared_container_ports() -> None:
    """What each process binds (from its parsed flags) is a declared, named container port."""
    for name, attrs in {
        "arks-extproc": ("grpc_address", "metrics_port"),
        "arks-ratelimit": ("grpc_address", "metrics_port"),
        "arks-controller": (None, "metrics_port"),
    }.items():
        container = next(containers(DEPLOYMENTS[name]))
        settings = _parse(name, container)
        declared = {p["containerPort"] for p in container["ports"]}
        grpc_attr, metrics_attr = attrs
        if grpc_attr:
            assert int(getattr(settings, grpc_attr).rsplit(":", 1)[1]) in declared, name
        assert getattr(settings, metrics_attr) in declared, name


def test_controller_lease_namespace_comes_from_the_downward_api() -> None:
    container = next(containers(DEPLOYMENTS["arks-controller"]))
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert DEPLOYMENTS["arks-controller"]["spec"]["replicas"] == 2


def _port_names(workload: dict[str, Any]) -> dict[str | int, int]:
    ports: dict[str | int, int] = {}
    for container in containers(workload):
        for port in container.get("ports", []):
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


@pytest.mark.parametrize("workload", WORKLOADS, ids=[where(w) for w in WORKLOADS])
def test_probes_point_at_declared_ports(workload: dict[str, Any]) -> None:
    ports = _port_names(workload)
    for container in containers(workload):
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            spec = container.get(probe)
            if not spec:
                continue
            for handler in ("grpc", "httpGet", "tcpSocket"):
                if handler in spec:
                    assert spec[handler]["port"] in ports, f"{where(workload)} {probe}"


def test_services_have_probes_on_what_they_serve() -> None:
    for name in ("arks-extproc", "arks-ratelimit"):
        container = next(containers(DEPLOYMENTS[name]))
        assert "grpc" in container["readinessProbe"] and "grpc" in container["livenessProbe"]
    controller = next(containers(DEPLOYMENTS["arks-controller"]))
    assert controller["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert controller["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("service", of_kind("Service"), ids=[where(s) for s in of_kind("Service")])
def test_service_selects_a_workloads_pods_and_targets_its_ports(service: dict[str, Any]) -> None:
    selector = service["spec"]["selector"]
    matching = [
        w
        for w in WORKLOADS
        if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(matching) == 1, where(service)
    (workload,) = matching
    assert (
        workload["spec"]["selector"]["matchLabels"].items()
        <= workload["spec"]["template"]["metadata"]["labels"].items()
    )
    ports = _port_names(workload)
    for port in service["spec"]["ports"]:
        assert port.get("targetPort", port["port"]) in ports, f"{where(service)} {port['name']}"


def test_workload_selectors_match_their_own_pods() -> None:
    for workload in WORKLOADS:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items(), where(
            workload
        )


# --- production habits ---------------------------------------------------------------------


@pytest.mark.parametrize("workload", WORKLOADS, ids=[where(w) for w in WORKLOADS])
def test_pods_are_locked_down(workload: dict[str, Any]) -> None:
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in containers(workload):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert (
            container["resources"]["requests"]["cpu"]
            and container["resources"]["requests"]["memory"]
        )
        assert container["resources"]["limits"]["memory"]


def test_our_services_run_the_one_overridable_image() -> None:
    images = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())["images"]
    assert [i["name"] for i in images] == [IMAGE]
    for name, deployment in DEPLOYMENTS.items():
        (container,) = containers(deployment)
        assert container["image"] == f"{IMAGE}:{images[0]['newTag']}", name
    raw = [
        d
        for d in yaml.safe_load_all((MANIFESTS / "base" / "extproc.yaml").read_text())
        if d["kind"] == "Deployment"
    ]
    assert (
        raw[0]["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    )  # the tag comes from images:


@pytest.mark.parametrize(
    "deployment", of_kind("Deployment"), ids=[where(d) for d in of_kind("Deployment")]
)
def test_replicated_deployments_have_a_disruption_budget_and_spread(
    deployment: dict[str, Any],
) -> None:
    if deployment["spec"]["replicas"] < 2:
        return
    labels = deployment["spec"]["selector"]["matchLabels"]
    budgets = [
        p for p in of_kind("PodDisruptionBudget") if p["spec"]["selector"]["matchLabels"] == labels
    ]
    assert len(budgets) == 1, where(deployment)
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread[0]["labelSelector"]["matchLabels"] == labels


def test_the_gateway_runs_replicated_on_shared_redis_and_rolls_without_a_gap() -> None:
    """Replicas share counters and reported-elsewhere marks in Redis (extproc/reported.py)."""
    extproc = DEPLOYMENTS["arks-extproc"]
    assert extproc["spec"]["replicas"] >= 2
    assert _parse("extproc", next(containers(extproc))).redis
    assert extproc["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_ratelimit_reads_its_config_map_without_an_api_token() -> None:
    pod = DEPLOYMENTS["arks-ratelimit"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/ratelimit")
    config_map = one("ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    assert "config.yaml" in config_map["data"]


def test_redis_persists_every_second() -> None:
    config = one("ConfigMap", "arks-redis")["data"]["redis.conf"]
    assert "appendonly yes" in config and "appendfsync everysec" in config
    statefulset = one("StatefulSet", "arks-redis")
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"][
        "storage"
    ]


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (Mi, Gi) or a redis.conf size (mb, gb), in bytes."""
    units = {"Mi": 2**20, "Gi": 2**30, "mb": 2**20, "gb": 2**30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def test_redis_refuses_writes_before_the_kubelet_kills_it() -> None:
    """noeviction needs a maxmemory; kept at half the memory limit for an AOF rewrite's fork."""
    lines = one("ConfigMap", "arks-redis")["data"]["redis.conf"].splitlines()
    config = dict(line.split(None, 1) for line in lines if line and not line.startswith("#"))
    assert config["maxmemory-policy"] == "noeviction"
    (container,) = containers(one("StatefulSet", "arks-redis"))
    limit = _bytes(container["resources"]["limits"]["memory"])
    assert 0 < _bytes(config["maxmemory"]) <= limit // 2


def test_services_reach_redis_by_its_service() -> None:
    redis = one("Service", "arks-redis")
    port = redis["spec"]["ports"][0]["port"]
    for name in ("arks-extproc", "arks-ratelimit"):
        settings = _parse(name, next(containers(DEPLOYMENTS[name])))
        assert settings.redis == f"redis://{redis['metadata']['name']}:{port}/0"


# --- monitoring ------------------------------------------------------------------------------


def test_a_service_monitor_scrapes_each_services_metrics_port() -> None:
    monitors = of_kind("ServiceMonitor", MONITORING)
    assert {m["metadata"]["name"] for m in monitors} == set(DEPLOYMENTS)
    for monitor in monitors:
        service = one("Service", monitor["metadata"]["name"])
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= service["metadata"]["labels"].items()
        )
        port_names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"


def test_monitoring_is_not_part_of_the_default_install() -> None:
    assert not of_kind("ServiceMonitor")


def test_the_dockerfile_builds_what_the_deployments_run() -> None:
    """The image runs as the uid the pods demand, and ships every package of pyproject.toml."""
    dockerfile = (MANIFESTS.parent / "Dockerfile").read_text()
    (user,) = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    uid, gid = (int(x) for x in user.split(":"))
    for name, deployment in DEPLOYMENTS.items():
        if next(containers(deployment))["image"].startswith(IMAGE):
            context = deployment["spec"]["template"]["spec"]["securityContext"]
            assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid), name
    pyproject = (MANIFESTS.parent / "pyproject.toml").read_text()
    packages = re.search(r"include = \[(.*?)\]", pyproject)
    assert packages
    for package in re.findall(r'"(\w+)\*"', packages.group(1)):
        assert f"COPY {package} {package}" in dockerfile, package
