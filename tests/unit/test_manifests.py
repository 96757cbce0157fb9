"""Every manifest validates against the Kubernetes OpenAPI schemas (strict: no unknown fields)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

BASE = Path(__file__).resolve().parents[2] / "manifests" / "base"
KUBERNETES = "1.33.0"


def documents(directory: Path = BASE) -> list[tuple[str, dict]]:
    """Every object `kubectl apply -k` would send, following nested kustomizations."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    out = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        if path.is_dir():
            out.extend(documents(path))
            continue
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                out.append((f"{path.name}#{i} {doc['kind']}/{doc['metadata']['name']}", doc))
    return out


@pytest.mark.parametrize(("where", "doc"), documents(), ids=[w for w, _ in documents()])
def test_manifest_is_valid_kubernetes(where: str, doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_redis_persists_every_second() -> None:
    config = next(doc for _, doc in documents() if doc["kind"] == "ConfigMap")["data"]["redis.conf"]
    assert "appendonly yes" in config and "appendfsync everysec" in config
    statefulset = next(doc for _, doc in documents() if doc["kind"] == "StatefulSet")
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
