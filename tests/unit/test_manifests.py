"""Every manifest validates against the Kubernetes OpenAPI schemas (strict: no unknown fields)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

BASE = Path(__file__).resolve().parents[2] / "manifests" / "base"
KUBERNETES = "1.33.0"


def documents() -> list[tuple[str, dict]]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    out = []
    for resource in kustomization["resources"]:
        for i, doc in enumerate(yaml.safe_load_all((BASE / resource).read_text())):
            if doc:
                out.append((f"{resource}#{i} {doc['kind']}/{doc['metadata']['name']}", doc))
    return out


@pytest.mark.parametrize(("where", "doc"), documents(), ids=[w for w, _ in documents()])
def test_manifest_is_valid_kubernetes(where: str, doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_redis_persists_every_second() -> None:
    config = next(doc for _, doc in documents() if doc["kind"] == "ConfigMap")["data"]["redis.conf"]
    assert "appendonly yes" in config and "appendfsync everysec" in config
    statefulset = next(doc for _, doc in documents() if doc["kind"] == "StatefulSet")
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
