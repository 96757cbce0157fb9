"""The Kubernetes install (`manifests/`) as `kubectl kustomize` builds it, and lookups in it.

`build` is the subset of kustomize the manifests use (resources, namespace, images);
tests/unit/manifests/test_manifests.py checks that kubectl's kustomize prints the same objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.support.paths import REPO

MANIFESTS = REPO / "manifests"
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "GatewayClass",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


# --- a kustomize build of the subset the manifests use ----------------------------------------


def _set_image(doc: dict[str, Any], images: list[dict[str, str]]) -> None:
    pod = (doc.get("spec") or {}).get("template", {}).get("spec")
    if not pod:
        return
    for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
        name, _, tag = container["image"].partition(":")
        for image in images:
            if image["name"] == name:
                name = image.get("newName", name)
                tag = image.get("newTag", tag)
        container["image"] = f"{name}:{tag}" if tag else name


def build(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` prints: resources, namespace, images."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "namespace", "resources", "images"}, (
        directory
    )
    out: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        if path.is_dir():
            out.extend(build(path))
        else:
            out.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for doc in out:
        if "namespace" in kustomization and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = kustomization["namespace"]
        _set_image(doc, kustomization.get("images", []))
    return out


def where(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


INSTALL = build(MANIFESTS)
MONITORING = build(MANIFESTS / "monitoring")
AUTOSCALING = build(MANIFESTS / "autoscaling")
# manifests/monitoring includes manifests/autoscaling (the engine PodMonitor): counted once.
EVERYTHING = INSTALL + MONITORING + [d for d in AUTOSCALING if d not in MONITORING]


def of_kind(kind: str, docs: list[dict[str, Any]] = INSTALL) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(kind: str, name: str, docs: list[dict[str, Any]] = EVERYTHING) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from workload["spec"]["template"]["spec"]["containers"]


WORKLOADS = of_kind("Deployment") + of_kind("StatefulSet")
DEPLOYMENTS = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
