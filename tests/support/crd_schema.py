"""Upstream CRD schemas (../shared/schemas/crds) as strict JSON Schemas for validating renders."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
# shared/ sits beside the checkout (in CI too); ARKS_SHARED points elsewhere if it does not.
_CANDIDATES = [Path(os.environ["ARKS_SHARED"])] if os.environ.get("ARKS_SHARED") else []
_CANDIDATES += [REPO.parent / "shared", Path("/work/shared")]


def upstream_crds() -> Path:
    for shared in _CANDIDATES:
        if (shared / "schemas" / "crds").is_dir():
            return shared / "schemas" / "crds"
    raise FileNotFoundError(f"no shared/schemas/crds in {', '.join(map(str, _CANDIDATES))}; set ARKS_SHARED")


def strict(schema: Any) -> Any:
    """openAPIV3Schema -> JSON Schema that rejects fields the CRD does not declare (as a real
    API server prunes them: a field we render but the CRD lacks would silently vanish)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and "additionalProperties" not in out:
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def upstream_schema(file_name: str, version: str) -> dict[str, Any]:
    crd = yaml.safe_load((upstream_crds() / file_name).read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema: dict[str, Any] = strict(served["schema"]["openAPIV3Schema"])
    return schema
