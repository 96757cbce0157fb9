"""The Kubernetes API emulator keeps the API semantics the controller relies on.

Every test talks to it over HTTP through the real `kubernetes` client, as the controller does.
"""

from __future__ import annotations

import datetime
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, watch

from tests.support.kube import RunningKubeEmulator, running_kube_emulator

ARKS = ("arks.ai", "v1", "arksapplications")


@pytest.fixture(scope="module")
def kube() -> Iterator[RunningKubeEmulator]:
    with running_kube_emulator() as running:
        yield running


@pytest.fixture
def api_client(kube: RunningKubeEmulator) -> Iterator[client.ApiClient]:
    with kube.api_client() as api:
        yield api


@pytest.fixture
def ns() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def arks_app(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksApplication",
        "metadata": {"name": name},
        "spec": spec,
    }


def deployment(name: str, replicas: int = 1) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "engine", "image": "vllm:latest"}]},
            },
        },
    }


def api_error(call: Any, *args: Any, **kwargs: Any) -> client.ApiException:
    with pytest.raises(client.ApiException) as info:
        call(*args, **kwargs)
    return info.value


def test_create_returns_the_object_with_server_assigned_metadata(
    api_client: client.ApiClient, ns: str
) -> None:
    first = core(api_client).create_namespaced_config_map(
        ns, {"metadata": {"name": "a"}, "data": {"k": "v"}}
    )
    second = core(api_client).create_namespaced_config_map(ns, {"metadata": {"name": "b"}})

    assert first.data == {"k": "v"}
    assert first.metadata.uid and first.metadata.uid != second.metadata.uid
    assert first.metadata.generation == 1
    assert first.metadata.creation_timestamp is not None
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)


def test_duplicate_create_is_409_already_exists(api_client: client.ApiClient, ns: str) -> None:
    core(api_client).create_namespaced_secret(
        ns, {"metadata": {"name": "s"}, "stringData": {"k": "v"}}
    )

    error = api_error(core(api_client).create_namespaced_secret, ns, {"metadata": {"name": "s"}})

    assert error.status == 409
    status = json.loads(error.body)
    assert (status["kind"], status["reason"], status["code"]) == ("Status", "AlreadyExists", 409)


def test_get_of_a_missing_object_is_404_not_found(api_client: client.ApiClient, ns: str) -> None:
    error = api_error(core(api_client).read_namespaced_service, "missing", ns)

    assert error.status == 404
    assert '"reason": "NotFound"' in error.body


def test_update_with_a_stale_resource_version_is_409_conflict(
    api_client: client.ApiClient, ns: str
) -> None:
    api = client.AppsV1Api(api_client)
    stale = api.create_namespaced_deployment(ns, deployment("d"))
    fresh = api.read_namespaced_deployment("d", ns)
    fresh.spec.replicas = 2
    api.replace_namespaced_deployment("d", ns, fresh)

    stale.spec.replicas = 3
    error = api_error(api.replace_namespaced_deployment, "d", ns, stale)

    assert error.status == 409
    assert '"reason": "Conflict"' in error.body
    assert api.read_namespaced_deployment("d", ns).spec.replicas == 2


def test_an_update_keeps_the_namespace_of_its_path_and_refuses_another(
    api_client: client.ApiClient, ns: str
) -> None:
    api = client.AppsV1Api(api_client)
    api.create_namespaced_deployment(ns, deployment("d"))
    body = deployment("d", replicas=4)  # no namespace in the body: the path's applies
    assert api.replace_namespaced_deployment("d", ns, body).metadata.namespace == ns
    assert api.read_namespaced_deployment("d", ns).spec.replicas == 4

    elsewhere = deployment("d")
    elsewhere["metadata"]["namespace"] = "other"
    error = api_error(api.replace_namespaced_deployment, "d", ns, elsewhere)
    assert error.status == 400 and '"reason": "BadRequest"' in error.body


def test_generation_bumps_only_on_spec_changes(api_client: client.ApiClient, ns: str) -> None:
    api = client.AppsV1Api(api_client)
    created = api.create_namespaced_deployment(ns, deployment("d"))

    labelled = api.patch_namespaced_deployment("d", ns, {"metadata": {"labels": {"tier": "gpu"}}})
    status_only = api.patch_namespaced_deployment_status("d", ns, {"status": {"readyReplicas": 1}})
    scaled = api.patch_namespaced_deployment("d", ns, {"spec": {"replicas": 4}})

    assert (labelled.metadata.generation, status_only.metadata.generation) == (1, 1)
    assert scaled.metadata.generation == 2
    versions = [o.metadata.resource_version for o in (created, labelled, status_only, scaled)]
    assert len(set(versions)) == 4


def test_status_subresource_changes_only_status(api_client: client.ApiClient, ns: str) -> None:
    api = custom(api_client)
    api.create_namespaced_custom_object(*ARKS[:2], ns, ARKS[2], arks_app("app", replicas=1))

    after_status = api.patch_namespaced_custom_object_status(
        *ARKS[:2],
        ns,
        ARKS[2],
        "app",
        {
            "spec": {"replicas": 9},
            "metadata": {"labels": {"x": "y"}},
            "status": {"phase": "Running"},
        },
    )
    after_main = api.patch_namespaced_custom_object(
        *ARKS[:2],
        ns,
        ARKS[2],
        "app",
        {"status": {"phase": "Hacked"}, "spec": {"replicas": 2}},
    )

    assert after_status["status"] == {"phase": "Running"}
    assert after_status["spec"] == {"replicas": 1}
    assert "labels" not in after_status["metadata"]
    assert after_status["metadata"]["generation"] == 1
    assert after_main["status"] == {"phase": "Running"}
    assert after_main["spec"] == {"replicas": 2}


def test_server_side_apply_creates_then_merges(api_client: client.ApiClient, ns: str) -> None:
    api = client.AppsV1Api(api_client)
    apply = {"_content_type": "application/apply-patch+yaml", "field_manager": "arks-controller"}

    created = api.patch_namespaced_deployment("d", ns, deployment("d", replicas=1), **apply)
    merged = api.patch_namespaced_deployment(
        "d",
        ns,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "d", "annotations": {"a": "b"}},
            "spec": {"replicas": 3},
        },
        **apply,
    )
    unchanged = api.patch_namespaced_deployment("d", ns, deployment("d", replicas=3), **apply)

    assert created.metadata.generation == 1 and created.metadata.uid
    assert merged.metadata.uid == created.metadata.uid
    assert merged.spec.replicas == 3 and merged.metadata.annotations == {"a": "b"}
    assert merged.spec.template.spec.containers[0].image == "vllm:latest"
    assert merged.metadata.generation == 2
    assert unchanged.metadata.resource_version == merged.metadata.resource_version


def test_server_side_apply_needs_a_field_manager(api_client: client.ApiClient, ns: str) -> None:
    error = api_error(
        client.AppsV1Api(api_client).patch_namespaced_deployment,
        "d",
        ns,
        deployment("d"),
        _content_type="application/apply-patch+yaml",
    )
    assert error.status == 400


def test_finalizers_hold_deletion_until_removed(api_client: client.ApiClient, ns: str) -> None:
    api = custom(api_client)
    body = arks_app("app")
    body["metadata"]["finalizers"] = ["arks.ai/cleanup"]
    api.create_namespaced_custom_object(*ARKS[:2], ns, ARKS[2], body)

    api.delete_namespaced_custom_object(*ARKS[:2], ns, ARKS[2], "app")
    held = api.get_namespaced_custom_object(*ARKS[:2], ns, ARKS[2], "app")
    api.patch_namespaced_custom_object(
        *ARKS[:2], ns, ARKS[2], "app", {"metadata": {"finalizers": None}}
    )

    assert held["metadata"]["deletionTimestamp"]
    error = api_error(api.get_namespaced_custom_object, *ARKS[:2], ns, ARKS[2], "app")
    assert error.status == 404


def test_delete_without_finalizers_removes_the_object(
    api_client: client.ApiClient, ns: str
) -> None:
    core(api_client).create_namespaced_persistent_volume_claim(
        ns, {"metadata": {"name": "models"}, "spec": {}}
    )

    core(api_client).delete_namespaced_persistent_volume_claim("models", ns)

    assert (
        api_error(core(api_client).read_namespaced_persistent_volume_claim, "models", ns).status
        == 404
    )


def test_deleting_an_owner_deletes_its_dependents(api_client: client.ApiClient, ns: str) -> None:
    owner = custom(api_client).create_namespaced_custom_object(
        *ARKS[:2], ns, ARKS[2], arks_app("app")
    )
    ref = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksApplication",
        "name": "app",
        "uid": owner["metadata"]["uid"],
        "controller": True,
    }
    dependent = deployment("app-engine")
    dependent["metadata"]["ownerReferences"] = [ref]
    client.AppsV1Api(api_client).create_namespaced_deployment(ns, dependent)
    core(api_client).create_namespaced_service(
        ns, {"metadata": {"name": "app", "ownerReferences": [ref]}, "spec": {}}
    )
    core(api_client).create_namespaced_service(ns, {"metadata": {"name": "unrelated"}, "spec": {}})

    custom(api_client).delete_namespaced_custom_object(*ARKS[:2], ns, ARKS[2], "app")

    assert client.AppsV1Api(api_client).list_namespaced_deployment(ns).items == []
    assert [s.metadata.name for s in core(api_client).list_namespaced_service(ns).items] == [
        "unrelated"
    ]


def test_watch_sees_added_modified_deleted_for_a_custom_resource(
    api_client: client.ApiClient, ns: str
) -> None:
    api = custom(api_client)
    api.create_namespaced_custom_object(*ARKS[:2], ns, ARKS[2], arks_app("before"))
    listed = api.list_namespaced_custom_object(*ARKS[:2], ns, ARKS[2])
    seen: list[tuple[str, str]] = []
    done = threading.Event()

    def consume() -> None:
        stream = watch.Watch().stream(
            api.list_namespaced_custom_object,
            *ARKS[:2],
            ns,
            ARKS[2],
            resource_version=listed["metadata"]["resourceVersion"],
            timeout_seconds=5,
        )
        for event in stream:
            seen.append((event["type"], event["object"]["metadata"]["name"]))
            if event["type"] == "DELETED":
                break
        done.set()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    api.create_namespaced_custom_object(*ARKS[:2], ns, ARKS[2], arks_app("app", replicas=1))
    api.patch_namespaced_custom_object(*ARKS[:2], ns, ARKS[2], "app", {"spec": {"replicas": 2}})
    api.delete_namespaced_custom_object(*ARKS[:2], ns, ARKS[2], "app")

    assert done.wait(timeout=5)
    assert seen == [("ADDED", "app"), ("MODIFIED", "app"), ("DELETED", "app")]


def test_watch_without_resource_version_starts_with_existing_objects(
    api_client: client.ApiClient, ns: str
) -> None:
    custom(api_client).create_namespaced_custom_object(*ARKS[:2], ns, ARKS[2], arks_app("existing"))

    events = list(
        watch.Watch().stream(
            custom(api_client).list_namespaced_custom_object,
            *ARKS[:2],
            ns,
            ARKS[2],
            timeout_seconds=1,
        )
    )

    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "existing")]


def test_lease_renewal_uses_optimistic_concurrency(api_client: client.ApiClient, ns: str) -> None:
    api = client.CoordinationV1Api(api_client)
    api.create_namespaced_lease(
        ns,
        {
            "metadata": {"name": "arks-controller"},
            "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
        },
    )
    mine = api.read_namespaced_lease("arks-controller", ns)
    theirs = api.read_namespaced_lease("arks-controller", ns)

    mine.spec.renew_time = datetime.datetime.now(datetime.UTC)
    renewed = api.replace_namespaced_lease("arks-controller", ns, mine)
    theirs.spec.holder_identity = "b"
    error = api_error(api.replace_namespaced_lease, "arks-controller", ns, theirs)

    assert renewed.metadata.resource_version != mine.metadata.resource_version
    assert error.status == 409
    assert api.read_namespaced_lease("arks-controller", ns).spec.holder_identity == "a"


def test_list_carries_a_resource_version_and_filters_by_label(
    api_client: client.ApiClient, ns: str
) -> None:
    api = client.BatchV1Api(api_client)
    for name, role in (("a", "download"), ("b", "other")):
        api.create_namespaced_job(
            ns,
            {
                "metadata": {"name": name, "labels": {"role": role}},
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [{"name": "c", "image": "i"}],
                            "restartPolicy": "Never",
                        }
                    }
                },
            },
        )

    listed = api.list_namespaced_job(ns, label_selector="role=download")

    assert [j.metadata.name for j in listed.items] == ["a"]
    assert int(listed.metadata.resource_version) >= int(listed.items[0].metadata.resource_version)


def test_other_builtin_kinds_round_trip(api_client: client.ApiClient, ns: str) -> None:
    hpa = client.AutoscalingV2Api(api_client).create_namespaced_horizontal_pod_autoscaler(
        ns,
        {
            "metadata": {"name": "h"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "d"},
                "maxReplicas": 3,
            },
        },
    )
    event = core(api_client).create_namespaced_event(
        ns,
        {
            "metadata": {"name": "e"},
            "involvedObject": {"kind": "ArksApplication", "name": "app"},
            "reason": "Ready",
        },
    )
    route = custom(api_client).create_namespaced_custom_object(
        "gateway.networking.k8s.io",
        "v1",
        ns,
        "httproutes",
        {"metadata": {"name": "r"}, "spec": {}},
    )
    lws = custom(api_client).create_namespaced_custom_object(
        "leaderworkerset.x-k8s.io",
        "v1",
        ns,
        "leaderworkersets",
        {"metadata": {"name": "l"}, "spec": {}},
    )

    assert hpa.kind == "HorizontalPodAutoscaler" and event.reason == "Ready"
    assert (route["kind"], lws["kind"]) == ("HTTPRoute", "LeaderWorkerSet")
