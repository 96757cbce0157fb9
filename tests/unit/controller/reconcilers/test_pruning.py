"""Which children a reconciler prunes: only those its owner controls that the render dropped."""

from __future__ import annotations

from typing import Any

from controller.reconcilers.pruning import controlled_by, stale_children

OWNER = "uid-app"


def child(
    kind: str, name: str, *, uid: str | None = OWNER, controller: bool = True, **meta: Any
) -> dict[str, Any]:
    refs = (
        [] if uid is None else [{"uid": uid, "controller": controller, "kind": "ArksApplication"}]
    )
    return {"kind": kind, "metadata": {"name": name, "ownerReferences": refs, **meta}}


def test_a_child_no_longer_rendered_is_stale() -> None:
    listed = {
        "Deployment": [child("Deployment", "chat")],
        "HorizontalPodAutoscaler": [child("HorizontalPodAutoscaler", "chat")],
    }
    rendered = [child("Deployment", "chat")]
    assert [(k, c["metadata"]["name"]) for k, c in stale_children(OWNER, listed, rendered)] == [
        ("HorizontalPodAutoscaler", "chat")
    ]


def test_the_same_name_of_another_kind_is_not_kept_by_the_render() -> None:
    """size 1 -> 2: the LeaderWorkerSet `chat` does not keep the Deployment `chat`."""
    listed = {"Deployment": [child("Deployment", "chat")]}
    rendered = [child("LeaderWorkerSet", "chat")]
    assert [k for k, _ in stale_children(OWNER, listed, rendered)] == ["Deployment"]


def test_what_the_owner_does_not_control_is_never_stale() -> None:
    listed = {
        "Deployment": [
            child("Deployment", "users", uid=None),  # a user's, with our labels copied
            child("Deployment", "others", uid="uid-other-app"),  # another app's
            child("Deployment", "adopted", controller=False),  # ours only as a plain owner
        ]
    }
    assert stale_children(OWNER, listed, []) == []


def test_a_child_already_being_deleted_is_left_to_finish() -> None:
    listed = {"Deployment": [child("Deployment", "old", deletionTimestamp="2026-12-05T03:00:00Z")]}
    assert stale_children(OWNER, listed, []) == []


def test_controlled_by_needs_the_controller_flag_and_the_uid() -> None:
    assert controlled_by(child("Service", "s"), OWNER)
    assert not controlled_by(child("Service", "s", controller=False), OWNER)
    assert not controlled_by(child("Service", "s"), "uid-someone-else")
    assert not controlled_by({"metadata": {}}, OWNER)
