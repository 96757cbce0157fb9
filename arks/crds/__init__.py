"""The `arks.ai/v1` CustomResourceDefinitions, written once in Python (see `schema.py`)."""

from __future__ import annotations

from arks.crds.application import APPLICATION, DISAGGREGATED_APPLICATION
from arks.crds.gateway import ENDPOINT, QUOTA, TOKEN
from arks.crds.model import KIND as MODEL
from arks.crds.render import Kind, kustomization, render, to_yaml

KINDS: tuple[Kind, ...] = (MODEL, APPLICATION, DISAGGREGATED_APPLICATION, ENDPOINT, TOKEN, QUOTA)


def files() -> dict[str, str]:
    """Every file of `manifests/crds/`, by name, as the Python declares it."""
    out = {kind.file_name: to_yaml(render(kind)) for kind in KINDS}
    out["kustomization.yaml"] = kustomization(KINDS)
    return out


def chart_files() -> dict[str, str]:
    """Every file of the Helm chart's `crds/` (charts/arks/crds): the CRDs alone, as Helm
    applies every file there."""
    return {kind.file_name: to_yaml(render(kind)) for kind in KINDS}


__all__ = ["KINDS", "Kind", "chart_files", "files", "render"]
