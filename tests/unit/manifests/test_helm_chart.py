"""charts/arks rendered by the real `helm template` (Helm 4, tests/support/tools.py): the same
objects as `kubectl kustomize manifests/` with the default values (but Helm's own labels and the
generated Redis Secret), each valid against the same schemas, and what each value changes."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from arks import manifests
from arks.chart import OUTPUT, drift, files
from controller.render.workload import RenderDefaults
from tests.support.manifests import AUTOSCALING, INSTALL, MONITORING, where
from tests.support.paths import REPO
from tests.support.tools import tool
from tests.unit.manifests.test_manifests import _parse, validate

CHART = REPO / "charts" / "arks"
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance")


def render(*values: str, namespace: str = "arks-system") -> list[dict[str, Any]]:
    args = [a for value in values for a in ("--set", value)]
    out = subprocess.run(
        [str(tool("helm")), "template", "arks", str(CHART), "-n", namespace, "--include-crds",
         *args],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def without_helm_labels(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CustomResourceDefinition":
        return doc  # Helm applies crds/ as the files are
    labels = doc["metadata"]["labels"]
    for label in HELM_LABELS:
        labels.pop(label)  # every templated object carries them
    return doc


def canonical(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(yaml.safe_dump(d) for d in docs)


def of(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (workload,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                   and d["metadata"]["name"] == name]  # fmt: skip
    first: dict[str, Any] = workload["spec"]["template"]["spec"]["containers"][0]
    return first


DEFAULT = render()


def test_the_charts_copies_of_the_manifests_are_current() -> None:
    assert drift(OUTPUT, files()) == [], "run `python -m arks.chart`"


def test_helm_lint_passes() -> None:
    result = subprocess.run(
        [str(tool("helm")), "lint", str(CHART), "-n", "arks-system", "--strict"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_defaults_render_what_kustomize_builds() -> None:
    rendered = [without_helm_labels(d) for d in render("namespace.create=true")]
    secrets = of(rendered, "Secret")
    assert canonical([d for d in rendered if d["kind"] != "Secret"]) == canonical(INSTALL)
    assert {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in secrets} == {
        ("arks-system", "arks-redis"),
        ("envoy-gateway-system", "arks-redis"),
    }


def test_with_monitoring_it_renders_the_monitors_too() -> None:
    rendered = [
        without_helm_labels(d) for d in render("namespace.create=true", "monitoring.enabled=true")
    ]
    others = [d for d in rendered if d["kind"] != "Secret"]
    assert canonical(others) == canonical(INSTALL + MONITORING)


@pytest.mark.parametrize("doc", DEFAULT, ids=[where(d) for d in DEFAULT])
def test_every_rendered_object_is_valid(doc: dict[str, Any]) -> None:
    validate(doc)


def test_the_namespace_object_is_left_to_helm_by_default() -> None:
    """The release namespace is Helm's (`--create-namespace`); the node cache's is the chart's."""
    assert [n["metadata"]["name"] for n in of(DEFAULT, "Namespace")] == ["arks-cache"]
    assert not of(render("cache.createNamespace=false"), "Namespace")


def test_only_arks_system() -> None:
    with pytest.raises(subprocess.CalledProcessError) as refused:
        render(namespace="arks")
    assert "install into the namespace arks-system" in refused.value.stderr


def test_the_generated_password_fits_redis_conf_and_is_the_same_in_both_namespaces() -> None:
    passwords = {base64.b64decode(s["data"]["password"]).decode() for s in of(DEFAULT, "Secret")}
    (password,) = passwords
    assert len(password) >= 32 and password.isalnum()
    (secret,) = [s for s in of(DEFAULT, "Secret") if s["metadata"]["namespace"] == "arks-system"]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_image_and_replicas() -> None:
    docs = render("image.repository=registry.example.com/arks", "image.tag=1.2.3",
                  "replicas.arks-extproc=5")  # fmt: skip
    for name in ("arks-extproc", "arks-ratelimit", "arks-controller"):
        assert container(docs, name)["image"] == "registry.example.com/arks:1.2.3"
    assert of(docs, "Deployment", "arks-extproc")[0]["spec"]["replicas"] == 5
    assert of(docs, "Deployment", "arks-controller")[0]["spec"]["replicas"] == 2
    assert container(docs, "arks-redis")["image"] == "redis:7.4"


def test_the_default_tag_is_the_one_kustomize_sets() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    images = yaml.safe_load((REPO / "manifests" / "base" / "kustomization.yaml").read_text())
    assert chart["appVersion"] == images["images"][0]["newTag"]


def test_an_external_redis_with_its_own_secret() -> None:
    docs = render("redis.enabled=false", "redis.url=redis://redis.example:6380/2",
                  "redis.auth.existingSecret=my-redis")  # fmt: skip
    assert not [d for d in docs if d["metadata"]["name"] == "arks-redis"]  # no Redis, no Secret
    for name in ("arks-extproc", "arks-ratelimit"):
        c = container(docs, name)
        assert _parse(name, c).redis == "redis://redis.example:6380/2"
        pod = of(docs, "Deployment", name)[0]["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if "secret" in v and v["name"] == "redis-auth"]
        assert volume["secret"]["secretName"] == "my-redis"
    (policy,) = of(docs, "NetworkPolicy", "arks-ratelimit")
    assert policy["spec"]["policyTypes"] == ["Ingress"] and "egress" not in policy["spec"]
    for doc in docs:
        validate(doc)


def test_an_external_redis_needs_a_url_and_a_secret() -> None:
    with pytest.raises(subprocess.CalledProcessError) as refused:
        render("redis.enabled=false", "redis.auth.existingSecret=s")
    assert "redis.url" in refused.value.stderr
    with pytest.raises(subprocess.CalledProcessError) as refused:
        render("redis.enabled=false", "redis.url=redis://r:6379/0")
    assert "existingSecret" in refused.value.stderr


def test_an_existing_secret_for_the_internal_redis() -> None:
    docs = render("redis.auth.existingSecret=mine")
    assert not of(docs, "Secret")
    env = {e["name"]: e for e in container(docs, "arks-redis")["env"]}
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]["name"] == "mine"


def test_the_monitoring_namespace_is_the_one_allowed_to_scrape() -> None:
    docs = render("monitoring.namespace=observability")
    for name in ("arks-extproc", "arks-ratelimit", "arks-controller"):
        (policy,) = of(docs, "NetworkPolicy", name)
        namespaces = {
            peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            for rule in policy["spec"]["ingress"]
            for peer in rule["from"]
        }
        assert "observability" in namespaces and "monitoring" not in namespaces


def test_the_service_monitors_take_the_prometheus_releases_label() -> None:
    """kube-prometheus-stack's Prometheus picks ServiceMonitors by `release: <its release>`."""
    docs = render("monitoring.enabled=true", "monitoring.labels.release=kube-prometheus-stack")
    monitors = of(docs, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {
        "arks-extproc", "arks-ratelimit", "arks-controller"
    }  # fmt: skip
    for monitor in monitors:
        validate(monitor)
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert (
            monitor["metadata"]["labels"]["app.kubernetes.io/name"] == monitor["metadata"]["name"]
        )


def test_monitoring_renders_the_rules_and_both_pod_monitors_once() -> None:
    """The PrometheusRule and the Envoy PodMonitor take the Prometheus release's label; the
    Envoy pods are looked for where Envoy Gateway runs; the engine PodMonitor, which
    manifests/monitoring includes from manifests/autoscaling, is rendered once with both on."""
    docs = render("monitoring.enabled=true", "monitoring.labels.release=kps",
                  "envoyGateway.namespace=eg", "autoscaling.podMonitor.enabled=true")  # fmt: skip
    (rule,) = of(docs, "PrometheusRule", "arks")
    (envoy,) = of(docs, "PodMonitor", "arks-envoy")
    (engines,) = of(docs, "PodMonitor", "arks-engines")
    for doc in (rule, envoy, engines):
        validate(doc)
        assert doc["metadata"]["labels"]["release"] == "kps"
    assert envoy["spec"]["namespaceSelector"] == {"matchNames": ["eg"]}
    alone = render("monitoring.enabled=true")
    assert len(of(alone, "PodMonitor", "arks-engines")) == 1
    assert len(of(alone, "ConfigMap", "arks-prometheus-rules")) == 1


def test_envoy_gateway_elsewhere_is_the_one_admitted_and_given_the_secret() -> None:
    """Envoy Gateway in another namespace: its Envoy pods still reach the gateway and the
    rate-limit service, its rate limiter still reaches Redis, and it gets the Secret."""
    from dataclasses import replace

    from tests.support.netpol import allows
    from tests.unit.manifests.test_manifests_tenancy import (
        ARKS_ENVOY,
        EG_RATELIMIT,
        EXTPROC,
        RATELIMIT,
        REDIS,
    )

    docs = render("envoyGateway.namespace=eg")
    policies = of(docs, "NetworkPolicy")
    envoy, rate_limiter = (replace(pod, namespace="eg") for pod in (ARKS_ENVOY, EG_RATELIMIT))
    assert allows(policies, envoy, EXTPROC, 50051)
    assert allows(policies, envoy, RATELIMIT, 8081)
    assert allows(policies, rate_limiter, REDIS, 6379)
    assert not allows(policies, ARKS_ENVOY, EXTPROC, 50051)  # envoy-gateway-system no more
    assert {s["metadata"]["namespace"] for s in of(docs, "Secret")} == {"arks-system", "eg"}
    alone = render("redis.auth.envoyGatewaySecret=false")
    assert {s["metadata"]["namespace"] for s in of(alone, "Secret")} == {"arks-system"}


def test_without_the_gateway_wiring() -> None:
    docs = render("gateway.enabled=false")
    assert not of(docs, "Gateway") and not of(docs, "ValidatingAdmissionPolicy")
    assert of(docs, "Deployment", "arks-extproc")


def test_the_crds_are_the_generated_ones() -> None:
    crds = of(DEFAULT, "CustomResourceDefinition")
    assert canonical(crds) == canonical(
        [d for d in INSTALL if d["kind"] == "CustomResourceDefinition"]
    )
    assert Path(CHART / "crds").is_dir()


def test_with_the_pod_monitor_it_renders_manifests_autoscaling_too() -> None:
    rendered = [
        without_helm_labels(d)
        for d in render("namespace.create=true", "autoscaling.podMonitor.enabled=true")
    ]
    others = [d for d in rendered if d["kind"] != "Secret"]
    assert canonical(others) == canonical(INSTALL + AUTOSCALING)
    assert not of(DEFAULT, "PodMonitor")  # off by default: it needs Prometheus Operator's CRDs


def test_the_pod_monitor_takes_the_prometheus_releases_label_and_the_engine_namespaces() -> None:
    docs = render("autoscaling.podMonitor.enabled=true",
                  "autoscaling.podMonitor.labels.release=kube-prometheus-stack",
                  "autoscaling.podMonitor.namespaces={llm,team-a}")  # fmt: skip
    (monitor,) = of(docs, "PodMonitor", "arks-engines")
    validate(monitor)
    labels = monitor["metadata"]["labels"]
    assert labels["release"] == "kube-prometheus-stack"
    assert labels["app.kubernetes.io/name"] == "arks-engines"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["llm", "team-a"]}
    (kustomized,) = AUTOSCALING
    assert {k: v for k, v in monitor["spec"].items() if k != "namespaceSelector"} == {
        k: v for k, v in kustomized["spec"].items() if k != "namespaceSelector"
    }


def test_the_controller_points_keda_at_the_prometheus_the_values_name() -> None:
    default = _parse("arks-controller", container(DEFAULT, "arks-controller"))
    assert default.prometheus_url == RenderDefaults.prometheus_url
    docs = render("autoscaling.prometheusUrl=https://prometheus.observability.svc:9091")
    args = container(docs, "arks-controller")["args"]
    assert len([a for a in args if a.startswith("--prometheus-url=")]) == 1
    controller = _parse("arks-controller", container(docs, "arks-controller"))
    assert controller.prometheus_url == "https://prometheus.observability.svc:9091"
    assert not of(docs, "PodMonitor")  # the one does not need the other


def test_the_chart_ships_prometheus_adapters_rules_aimed_at_the_same_prometheus() -> None:
    shipped = CHART / "files" / "autoscaling" / "prometheus-adapter-values.yaml"
    source = REPO / "manifests" / "autoscaling" / "prometheus-adapter-values.yaml"
    assert shipped.read_text() == source.read_text()
    values = yaml.safe_load(shipped.read_text())
    chart = yaml.safe_load((CHART / "values.yaml").read_text())
    prometheus = f"{values['prometheus']['url']}:{values['prometheus']['port']}"
    assert prometheus == chart["autoscaling"]["prometheusUrl"] == RenderDefaults.prometheus_url
    notes = render_notes("autoscaling.podMonitor.enabled=true")
    assert "-f charts/arks/files/autoscaling/prometheus-adapter-values.yaml" in notes


def render_notes(*values: str) -> str:
    args = [a for value in values for a in ("--set", value)]
    out = subprocess.run(
        [str(tool("helm")), "install", "arks", str(CHART), "-n", "arks-system", "--dry-run=client",
         *args],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return out.stdout.split("NOTES:", 1)[1]


@pytest.mark.parametrize(
    "value",
    [
        "replica.arks-extproc=3",  # a misspelt key
        "replicas.arks-extproc=0",
        "redis.url=redis://:hunter2@redis:6379/0",  # the password belongs in a Secret
        "autoscaling.prometheusUrl=http://admin:hunter2@prometheus:9090",  # likewise
        "autoscaling.prometheusUrl=prometheus:9090",  # KEDA's serverAddress is a URL
        "autoscaling.provider=keda",  # each ArksApplication's own (spec.autoscaling.provider)
        "autoscaling.podMonitor.enable=true",  # a misspelt key
    ],
)
def test_helm_refuses_values_the_schema_does_not_allow(value: str) -> None:
    with pytest.raises(subprocess.CalledProcessError) as refused:
        render(value)
    assert "values don't meet the specifications of the schema" in refused.value.stderr


# --- CORS -------------------------------------------------------------------------------------


def test_cors_is_off_by_default() -> None:
    assert of(DEFAULT, "SecurityPolicy") == []


def test_cors_origins_render_the_security_policy_of_the_manifests() -> None:
    """The origins the values give, the rest as manifests/gateway/cors.yaml (the local CORS
    policy's methods, headers and max age); valid against Envoy Gateway's schema."""
    docs = render("gateway.cors.allowOrigins={https://app.example.com,https://*.example.com,*}")
    (policy,) = of(docs, "SecurityPolicy", "arks-cors")
    validate(policy)
    cors = policy["spec"]["cors"]
    assert cors["allowOrigins"] == ["https://app.example.com", "https://*.example.com", "*"]
    expected = manifests.cors_security_policy(cors["allowOrigins"])
    assert without_helm_labels(policy) == expected
    assert (
        of(render("gateway.enabled=false", "gateway.cors.allowOrigins={*}"), "SecurityPolicy") == []
    )
