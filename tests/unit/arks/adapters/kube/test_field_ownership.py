"""Reading managedFields: does our apply own a field (so dropping it would remove it)?"""

from __future__ import annotations

from typing import Any

from arks.adapters.kube.apply import applies


def obj(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "d", "managedFields": list(entries)}}


def entry(manager: str, operation: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "manager": manager,
        "operation": operation,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }


REPLICAS = ("spec", "replicas")


def test_our_apply_entry_owning_the_field() -> None:
    live = obj(entry("arks-controller", "Apply", {"f:spec": {"f:replicas": {}, "f:template": {}}}))
    assert applies(live, "arks-controller", REPLICAS)


def test_another_manager_or_an_update_entry_does_not_count() -> None:
    live = obj(
        entry("arks-controller", "Apply", {"f:spec": {"f:template": {}}}),
        entry("kube-controller-manager", "Update", {"f:spec": {"f:replicas": {}}}),
        entry("arks-controller", "Update", {"f:spec": {"f:replicas": {}}}),
    )
    assert not applies(live, "arks-controller", REPLICAS)
    assert not applies(live, "kube-controller-manager", REPLICAS)


def test_an_object_without_managed_fields_owns_nothing() -> None:
    assert not applies({"metadata": {"name": "d"}}, "arks-controller", REPLICAS)
    assert not applies(obj(entry("arks-controller", "Apply", {})), "arks-controller", REPLICAS)
