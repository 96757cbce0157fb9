"""A small declarative DSL for structural OpenAPI v3 schemas, as Kubernetes CRDs want them.

Each function returns a plain dict (the rendered schema node), so schemas compose by nesting
calls and the renderer has nothing left to translate. Only the keywords Kubernetes accepts in a
structural schema can be produced: every node gets a `type` (or is explicitly pass-through).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Schema = dict[str, Any]

# Kubernetes object names (RFC 1123 subdomain), the form `arks/api.py` also accepts.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# A resource.Quantity written as a string ("100Gi", "1.5T", "500M").
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?|[mkMGTPE])?$"


def _common(node: Schema, description: str, default: Any) -> Schema:
    if description:
        node["description"] = description
    if default is not None:
        node["default"] = default
    return node


def rule(expression: str, message: str, *, reason: str | None = None) -> Schema:
    """One `x-kubernetes-validations` CEL rule. `reason` is a machine-readable cause."""
    out: Schema = {"rule": expression, "message": message}
    if reason is not None:
        out["reason"] = reason
    return out


def string(
    description: str = "",
    *,
    pattern: str | None = None,
    enum: Sequence[str] | None = None,
    format: str | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
    default: str | None = None,
) -> Schema:
    node: Schema = {"type": "string"}
    if pattern is not None:
        node["pattern"] = pattern
    if enum is not None:
        node["enum"] = list(enum)
    if format is not None:
        node["format"] = format
    if min_length is not None:
        node["minLength"] = min_length
    if max_length is not None:
        node["maxLength"] = max_length
    return _common(node, description, default)


def name(description: str) -> Schema:
    """The name of a Kubernetes object."""
    return string(description, pattern=NAME_PATTERN, max_length=253)


def integer(
    description: str = "",
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    default: int | None = None,
    format: str = "int32",
    enum: Sequence[int] | None = None,
) -> Schema:
    node: Schema = {"type": "integer", "format": format}
    if enum is not None:
        node["enum"] = list(enum)
    if minimum is not None:
        node["minimum"] = minimum
    if maximum is not None:
        node["maximum"] = maximum
    return _common(node, description, default)


def number(
    description: str = "",
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    default: float | None = None,
) -> Schema:
    node: Schema = {"type": "number"}
    if minimum is not None:
        node["minimum"] = minimum
    if maximum is not None:
        node["maximum"] = maximum
    return _common(node, description, default)


def boolean(description: str = "", *, default: bool | None = None) -> Schema:
    return _common({"type": "boolean"}, description, default)


def array(
    items: Schema,
    description: str = "",
    *,
    min_items: int | None = None,
    max_items: int | None = None,
    map_keys: Sequence[str] | None = None,
    set_like: bool = False,
    rules: Iterable[Schema] = (),
    default: Sequence[Any] | None = None,
) -> Schema:
    """A list. `map_keys` makes it a list-map (entries unique by those keys, merged by SSA)."""
    node: Schema = {"type": "array", "items": items}
    if min_items is not None:
        node["minItems"] = min_items
    if max_items is not None:
        node["maxItems"] = max_items
    if map_keys:
        node["x-kubernetes-list-type"] = "map"
        node["x-kubernetes-list-map-keys"] = list(map_keys)
    elif set_like:
        node["x-kubernetes-list-type"] = "set"
    return _with_rules(
        _common(node, description, None if default is None else list(default)), rules
    )


def obj(
    properties: Mapping[str, Schema],
    description: str = "",
    *,
    required: Sequence[str] = (),
    rules: Iterable[Schema] = (),
    preserve_unknown: bool = False,
    default: Mapping[str, Any] | None = None,
) -> Schema:
    """An object with known fields; unknown fields are pruned unless `preserve_unknown`."""
    missing = [key for key in required if key not in properties]
    if missing:
        raise ValueError(f"required fields {missing} are not among the properties")
    node: Schema = {"type": "object", "properties": dict(properties)}
    if required:
        node["required"] = list(required)
    if preserve_unknown:
        node["x-kubernetes-preserve-unknown-fields"] = True
    return _with_rules(
        _common(node, description, None if default is None else dict(default)), rules
    )


def map_of(values: Schema, description: str = "", *, max_properties: int | None = None) -> Schema:
    """A map with free keys and typed values (labels, node selectors)."""
    node: Schema = {"type": "object", "additionalProperties": values}
    if max_properties is not None:
        node["maxProperties"] = max_properties
    return _common(node, description, None)


def passthrough(description: str) -> Schema:
    """An object kept as given (Kubernetes types we forward, such as pod affinity)."""
    return _common(
        {"type": "object", "x-kubernetes-preserve-unknown-fields": True}, description, None
    )


def _with_rules(node: Schema, rules: Iterable[Schema]) -> Schema:
    listed = list(rules)
    if listed:
        node["x-kubernetes-validations"] = listed
    return node


# --- Kubernetes building blocks shared by several kinds ------------------------------------


def conditions() -> Schema:
    """`status.conditions`, shaped as metav1.Condition."""
    condition = obj(
        {
            "type": string(
                "Type of condition in CamelCase, e.g. Ready.",
                pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
                max_length=316,
            ),
            "status": string("Status of the condition.", enum=["True", "False", "Unknown"]),
            "reason": string(
                "Programmatic identifier of the reason for the last transition, in CamelCase.",
                pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                min_length=1,
                max_length=1024,
            ),
            "message": string("Human-readable details of the transition.", max_length=32768),
            "lastTransitionTime": string(
                "When the condition last changed status.", format="date-time"
            ),
            "observedGeneration": integer(
                "The .metadata.generation the condition was set from.", minimum=0, format="int64"
            ),
        },
        "A condition of this object (metav1.Condition).",
        required=["type", "status", "lastTransitionTime", "reason", "message"],
    )
    return array(
        condition, "The latest observations of the object's state.", map_keys=["type"], max_items=32
    )


def observed_generation() -> Schema:
    return integer(
        "The .metadata.generation this status was computed from.", minimum=0, format="int64"
    )


def secret_key_ref(description: str, default_key: str) -> Schema:
    """A key of a Secret in the object's own namespace."""
    return obj(
        {
            "name": name("Name of the Secret, in the same namespace."),
            "key": string("Key inside the Secret.", min_length=1, default=default_key),
        },
        description,
        required=["name"],
    )


def object_ref(description: str) -> Schema:
    """A reference by name to another object in the same namespace."""
    return obj({"name": name("Name of the referenced object.")}, description, required=["name"])
