"""Builders for the Kubernetes-style objects a policy holds, shared by unit and integration tests."""

from __future__ import annotations

from typing import Any


def backend(name: str, port: int, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "Backend",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"endpoints": [{"ip": {"address": "127.0.0.1", "port": port}}]},
    }


def endpoint(model: str, *backends: str, namespace: str = "default") -> dict[str, Any]:
    refs = [{"group": "gateway.envoyproxy.io", "kind": "Backend", "name": b, "weight": 1} for b in backends]
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksEndpoint",
        "metadata": {"name": model, "namespace": namespace},
        "spec": {"routeConfigs": refs},
    }


def token(user: str, models: list[str], namespace: str = "default", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksToken",
        "metadata": {"name": user, "namespace": namespace},
        "spec": {**spec, "qos": [{"arksEndpoint": {"name": m}} for m in models]},
    }
