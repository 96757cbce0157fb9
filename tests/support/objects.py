"""Builders for the Kubernetes-style objects a policy holds, shared by unit and integration tests."""

from __future__ import annotations

from typing import Any

from controller.render.workload import RenderDefaults

# A controller started with the Dynamo platform's addresses (the dynamo-platform Helm chart's
# Services in dynamo-system): without them, Dynamo applications are refused.
RENDER_DEFAULTS = RenderDefaults(
    dynamo_etcd_endpoints="http://dynamo-platform-etcd.dynamo-system:2379",
    dynamo_nats_server="nats://dynamo-platform-nats.dynamo-system:4222",
)


def backend(name: str, port: int, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "Backend",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"endpoints": [{"ip": {"address": "127.0.0.1", "port": port}}]},
    }


def pool(name: str, ports: list[int], namespace: str = "default") -> dict[str, Any]:
    """One Backend holding several engines (loopback ports)."""
    doc = backend(name, ports[0], namespace)
    doc["spec"]["endpoints"] = [{"ip": {"address": "127.0.0.1", "port": p}} for p in ports]
    return doc


def endpoint(
    model: str,
    *backends: str,
    namespace: str = "default",
    weighting: str | None = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    refs = [
        {"group": "gateway.envoyproxy.io", "kind": "Backend", "name": b, "weight": 1}
        for b in backends
    ]
    spec: dict[str, Any] = {"routeConfigs": refs}
    if weighting is not None:
        spec["weighting"] = weighting
    if max_tokens is not None:
        spec["maxTokens"] = max_tokens
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksEndpoint",
        "metadata": {"name": model, "namespace": namespace},
        "spec": spec,
    }


def token(user: str, models: list[str], namespace: str = "default", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksToken",
        "metadata": {"name": user, "namespace": namespace},
        "spec": {**spec, "qos": [{"arksEndpoint": {"name": m}} for m in models]},
    }


def model_on_claim(
    claim: str, sub_path: str = "", name: str = "qwen2-5-7b-instruct", **spec: Any
) -> dict[str, Any]:
    """An ArksModel already on a PVC (`source.pvc`): engines mount that claim."""
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksModel",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"source": {"pvc": {"claimName": claim, "subPath": sub_path}}, **spec},
    }


def downloaded_model(name: str = "qwen2-5-7b-instruct", **spec: Any) -> dict[str, Any]:
    """An ArksModel downloaded from Hugging Face to a claim of its own."""
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksModel",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "source": {"huggingface": {"repo": "Qwen/Qwen2.5-7B-Instruct"}},
            "storage": {"size": "40Gi"},
            **spec,
        },
    }
