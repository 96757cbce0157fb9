"""Upstream CRD schemas (vendored in tests/schemas, see SOURCES.md there) as strict JSON Schemas."""

from __future__ import annotations

import functools
from typing import Any

import yaml

from tests.support.paths import REPO

UPSTREAM_CRDS = REPO / "tests" / "schemas" / "crds"


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
    pattern = out.get("pattern")
    if isinstance(pattern, str) and "(?i)" in pattern[1:]:
        # Go's RE2 takes an inline flag anywhere (PrometheusRule: `^(?i)(abort|warn)?$`);
        # Python's re only at the start, where it means the same for the whole pattern.
        out["pattern"] = "(?i)" + pattern.replace("(?i)", "")
    if "properties" in out and "additionalProperties" not in out:
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def upstream_schema(file_name: str, version: str) -> dict[str, Any]:
    crd = yaml.safe_load((UPSTREAM_CRDS / file_name).read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema: dict[str, Any] = strict(served["schema"]["openAPIV3Schema"])
    return schema
