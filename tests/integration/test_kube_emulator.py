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

from arks.adapters.kube import rest
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
    annotate = {"_content_type": "application/apply-patch+yaml", "field_manager": "someone"}

    created = api.patch_namespaced_deployment("d", ns, deployment("d", replicas=1), **apply)
    merged = api.patch_namespaced_deployment(
        "d",
        ns,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "d", "annotations": {"a": "b"}},
        },
        **annotate,
    )
    scaled = api.patch_namespaced_deployment("d", ns, deployment("d", replicas=3), **apply)
    unchanged = api.patch_namespaced_deployment("d", ns, deployment("d", replicas=3), **apply)

    assert created.metadata.generation == 1 and created.metadata.uid
    assert merged.metadata.uid == created.metadata.uid
    assert merged.metadata.annotations == {"a": "b"} and merged.metadata.generation == 1
    assert merged.spec.template.spec.containers[0].image == "vllm:latest"
    assert scaled.spec.replicas == 3 and scaled.metadata.annotations == {"a": "b"}
    assert scaled.metadata.generation == 2
    assert unchanged.metadata.resource_version == scaled.metadata.resource_version


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


# --- server-side apply's field ownership, on the examples of
# https://kubernetes.io/docs/reference/using-api/server-side-apply/ -----------------------------

APPLY_TYPE = "application/apply-patch+yaml"
DEPLOYMENTS_PATH = "/apis/apps/v1/namespaces/{ns}/deployments"
# The HPA controller's client: kube-controller-manager's user agent, so its manager is
# `kube-controller-manager` (the User-Agent up to its first "/").
HPA_AGENT = (
    "kube-controller-manager/v1.33.0 (linux/amd64) kubernetes/abcdef0/horizontal-pod-autoscaler"
)


def ssa(
    api: client.ApiClient, ns: str, body: dict[str, Any], manager: str, force: bool = False
) -> dict[str, Any]:
    name = body["metadata"]["name"]
    query = {"fieldManager": manager, **({"force": "true"} if force else {})}
    return rest.request(
        api,
        "PATCH",
        f"{DEPLOYMENTS_PATH.format(ns=ns)}/{name}",
        query=query,
        body=body,
        content_type=APPLY_TYPE,
    )


def replicas_only(name: str, replicas: int) -> dict[str, Any]:
    """The doc's `nginx-deployment-replicas-only.yaml`."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas},
    }


def without_replicas(name: str) -> dict[str, Any]:
    body = deployment(name)
    del body["spec"]["replicas"]
    return body


def managers(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """managedFields by manager name (with the subresource, if any, after a slash)."""
    return {
        e["manager"] + (f"/{e['subresource']}" if e.get("subresource") else ""): e
        for e in obj["metadata"].get("managedFields") or []
    }


@pytest.fixture
def hpa(kube: RunningKubeEmulator) -> Iterator[client.ApiClient]:
    """A client acting as the HPA controller, which scales through the scale subresource."""
    with kube.api_client() as api:
        api.user_agent = HPA_AGENT
        yield api


def scale_to(hpa: client.ApiClient, ns: str, name: str, replicas: int) -> dict[str, Any]:
    path = f"{DEPLOYMENTS_PATH.format(ns=ns)}/{name}/scale"
    scale = rest.request(hpa, "GET", path)
    scale["spec"]["replicas"] = replicas
    return rest.request(hpa, "PUT", path, body=scale)


def test_managed_fields_record_what_each_manager_applied(
    api_client: client.ApiClient, ns: str
) -> None:
    live = ssa(api_client, ns, deployment("d", replicas=3), "arks-controller")
    entry = managers(live)["arks-controller"]
    assert entry["operation"] == "Apply" and entry["fieldsType"] == "FieldsV1"
    assert entry["fieldsV1"]["f:spec"]["f:replicas"] == {}
    assert entry["fieldsV1"]["f:metadata"]["f:labels"] == {"f:app": {}}
    assert "f:name" not in entry["fieldsV1"]["f:metadata"]  # identity is nobody's field


def test_a_field_the_manager_stops_applying_is_removed(
    api_client: client.ApiClient, ns: str
) -> None:
    """'If you remove a field from a manifest and apply that manifest, ... it is either deleted
    from the live object or reset to its default value, if it has one.'"""
    body = deployment("d", replicas=3)
    body["metadata"]["annotations"] = {"note": "x"}
    ssa(api_client, ns, body, "arks-controller")

    live = ssa(api_client, ns, without_replicas("d"), "arks-controller")

    assert "annotations" not in live["metadata"]  # deleted
    assert live["spec"]["replicas"] == 1  # reset to the Deployment default
    assert "f:replicas" not in managers(live)["arks-controller"]["fieldsV1"]["f:spec"]


def test_handing_replicas_over_to_the_hpa_keeps_them(
    api_client: client.ApiClient, hpa: client.ApiClient, ns: str
) -> None:
    """The doc's 'Transferring ownership' sequence, step by step."""
    ssa(api_client, ns, deployment("d", replicas=3), "arks-controller")

    shared = ssa(api_client, ns, replicas_only("d", 3), "handover-to-hpa")
    assert set(managers(shared)) == {"arks-controller", "handover-to-hpa"}
    kept = ssa(api_client, ns, without_replicas("d"), "arks-controller")
    assert kept["spec"]["replicas"] == 3  # still owned by the handover manager

    scaled = scale_to(hpa, ns, "d", 5)
    assert scaled["spec"]["replicas"] == 5
    live = rest.request(api_client, "GET", f"{DEPLOYMENTS_PATH.format(ns=ns)}/d")
    assert live["spec"]["replicas"] == 5
    owners = managers(live)
    # "whenever the HPA controller sets the replicas field to a new value, the temporary field
    # manager will no longer own any fields and will be automatically deleted"
    assert "handover-to-hpa" not in owners
    scale_entry = owners["kube-controller-manager/scale"]
    assert scale_entry["operation"] == "Update"
    assert scale_entry["fieldsV1"] == {"f:spec": {"f:replicas": {}}}

    again = ssa(api_client, ns, without_replicas("d"), "arks-controller")
    assert again["spec"]["replicas"] == 5  # the HPA's field: the controller's apply keeps it


def test_applying_another_managers_field_conflicts_unless_forced(
    api_client: client.ApiClient, hpa: client.ApiClient, ns: str
) -> None:
    ssa(api_client, ns, without_replicas("d"), "arks-controller")
    scale_to(hpa, ns, "d", 4)

    error = api_error(ssa, api_client, ns, deployment("d", replicas=2), "arks-controller")
    assert error.status == 409
    status = json.loads(error.body)
    assert status["reason"] == "Conflict"
    assert 'conflict with "kube-controller-manager"' in status["message"]
    assert [c["field"] for c in status["details"]["causes"]] == [".spec.replicas"]

    same = ssa(api_client, ns, deployment("d", replicas=4), "arks-controller")  # same value: shared
    assert {"arks-controller", "kube-controller-manager/scale"} <= set(managers(same))

    forced = ssa(api_client, ns, deployment("d", replicas=2), "arks-controller", force=True)
    assert forced["spec"]["replicas"] == 2
    assert "kube-controller-manager/scale" not in managers(forced)  # it owned nothing else


def test_an_update_takes_the_fields_it_changes(api_client: client.ApiClient, ns: str) -> None:
    """'Whenever a field's value does change, ownership moves from its current manager to the
    manager making the change' (an update never conflicts)."""
    ssa(api_client, ns, deployment("d", replicas=1), "arks-controller")
    live = rest.request(api_client, "GET", f"{DEPLOYMENTS_PATH.format(ns=ns)}/d")
    live["metadata"]["labels"]["app"] = "edited"
    updated = rest.request(
        api_client,
        "PUT",
        f"{DEPLOYMENTS_PATH.format(ns=ns)}/d",
        query={"fieldManager": "kubectl-edit"},
        body=live,
    )
    owners = managers(updated)
    assert owners["kubectl-edit"]["operation"] == "Update"
    assert owners["kubectl-edit"]["fieldsV1"] == {"f:metadata": {"f:labels": {"f:app": {}}}}
    assert "f:metadata" not in owners["arks-controller"]["fieldsV1"]  # its only label went


def test_the_scale_subresource_reads_and_writes_replicas(
    kube: RunningKubeEmulator, api_client: client.ApiClient, hpa: client.ApiClient, ns: str
) -> None:
    ssa(api_client, ns, deployment("d", replicas=2), "arks-controller")
    path = f"{DEPLOYMENTS_PATH.format(ns=ns)}/d/scale"
    scale = rest.request(hpa, "GET", path)
    assert (scale["apiVersion"], scale["kind"]) == ("autoscaling/v1", "Scale")
    assert scale["spec"] == {"replicas": 2} and scale["status"]["selector"] == "app=d"

    scale["metadata"]["resourceVersion"] = "1"  # stale
    assert api_error(rest.request, hpa, "PUT", path, body=scale).status == 409
    assert (HPA_AGENT, "update", "apps", "deployments/scale", ns, "d") in kube.emulator.audit


def test_a_shared_owner_gives_up_a_field_without_changing_it(
    api_client: client.ApiClient, ns: str
) -> None:
    """'When two or more appliers set a field to the same value, they share ownership ...
    Shared field owners may give up ownership of a field by making a Server-Side Apply patch
    request that doesn't include that field.'"""
    labelled = deployment("d")
    labelled["metadata"]["labels"]["team"] = "a"
    ssa(api_client, ns, labelled, "first")
    ssa(api_client, ns, labelled, "second")

    kept = ssa(api_client, ns, deployment("d"), "first")  # drops the label

    assert kept["metadata"]["labels"] == {"app": "d", "team": "a"}
    assert "f:team" not in managers(kept)["first"]["fieldsV1"]["f:metadata"]["f:labels"]
    assert "f:team" in managers(kept)["second"]["fieldsV1"]["f:metadata"]["f:labels"]

    gone = ssa(api_client, ns, deployment("d"), "second")  # the last owner drops it
    assert gone["metadata"]["labels"] == {"app": "d"}


def test_a_leaderworkerset_without_replicas_gets_the_crd_default(
    api_client: client.ApiClient, ns: str
) -> None:
    lws = {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": "l"},
        "spec": {"replicas": 3, "leaderWorkerTemplate": {"size": 2}},
    }
    path = f"/apis/leaderworkerset.x-k8s.io/v1/namespaces/{ns}/leaderworkersets/l"
    query = {"fieldManager": "arks-controller", "force": "true"}
    rest.request(api_client, "PATCH", path, query=query, body=lws, content_type=APPLY_TYPE)
    del lws["spec"]["replicas"]
    live = rest.request(api_client, "PATCH", path, query=query, body=lws, content_type=APPLY_TYPE)
    assert live["spec"]["replicas"] == 1
    scale = rest.request(api_client, "GET", f"{path}/scale")
    assert scale["spec"]["replicas"] == 1


def test_names_and_labels_the_api_server_refuses_are_422_invalid(
    api_client: client.ApiClient, ns: str
) -> None:
    # A Service's name is a DNS-1035 label; most kinds' a DNS-1123 subdomain; a label value at
    # most 63 characters of [A-Za-z0-9_.-] (k8s.io/apimachinery/pkg/util/validation).
    service = {"metadata": {"name": "qwen2.5-7b"}, "spec": {"ports": [{"port": 80}]}}
    error = api_error(core(api_client).create_namespaced_service, ns, service)
    assert error.status == 422 and "DNS-1035" in json.loads(error.body)["message"]
    service["metadata"]["name"] = "qwen2-5-7b"
    core(api_client).create_namespaced_service(ns, service)

    apps = client.AppsV1Api(api_client)
    assert api_error(apps.create_namespaced_deployment, ns, deployment("Qwen")).status == 422
    apps.create_namespaced_deployment(ns, deployment("qwen2.5-7b"))  # a subdomain may have dots
    long = deployment("long")
    long["spec"]["template"]["metadata"]["labels"] = {"app": "long", "x": "v" * 64}
    error = api_error(apps.create_namespaced_deployment, ns, long)
    assert (
        error.status == 422 and "spec.template.metadata.labels" in json.loads(error.body)["message"]
    )
    apply = {"_content_type": "application/apply-patch+yaml", "field_manager": "arks-controller"}
    apps.patch_namespaced_deployment("d", ns, deployment("d"), **apply)
    bad = deployment("d")
    bad["metadata"]["labels"]["arks.ai/model"] = "meta-llama/Llama-3.1-8B"
    assert api_error(apps.patch_namespaced_deployment, "d", ns, bad, **apply).status == 422
    name = "a" * 254
    error = api_error(custom(api_client).create_namespaced_custom_object, *ARKS[:2], ns, ARKS[2],
                      arks_app(name))  # fmt: skip
    assert error.status == 422


def test_a_label_selected_watch_sees_an_object_leave_and_enter_its_selection(
    api_client: client.ApiClient, ns: str
) -> None:
    # The API server's watch cache compares the old and new object with the selector: one that
    # stops matching arrives as DELETED, one that starts matching as ADDED; an informer over a
    # selection (e.g. the controller's Secrets labelled arks.ai/token-secret) relies on it.
    api = custom(api_client)
    listed = api.list_namespaced_custom_object(*ARKS[:2], ns, ARKS[2])
    seen: list[tuple[str, str | None]] = []

    def consume() -> None:
        stream = watch.Watch().stream(
            api.list_namespaced_custom_object,
            *ARKS[:2],
            ns,
            ARKS[2],
            label_selector="picked",
            resource_version=listed["metadata"]["resourceVersion"],
            timeout_seconds=3,
        )
        for event in stream:
            labels = event["object"]["metadata"].get("labels") or {}
            seen.append((event["type"], labels.get("step")))

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()

    def label(**labels: str | None) -> None:
        api.patch_namespaced_custom_object(
            *ARKS[:2], ns, ARKS[2], "app", {"metadata": {"labels": labels}}
        )

    app = arks_app("app")
    app["metadata"]["labels"] = {"step": "0"}
    api.create_namespaced_custom_object(*ARKS[:2], ns, ARKS[2], app)  # not selected: nothing
    label(picked="yes", step="1")  # enters: ADDED
    label(step="2")  # stays: MODIFIED
    label(picked=None, step="3")  # leaves: DELETED, with its new state
    label(step="4")  # not selected: nothing
    consumer.join(timeout=6)
    assert seen == [("ADDED", "1"), ("MODIFIED", "2"), ("DELETED", "3")]
