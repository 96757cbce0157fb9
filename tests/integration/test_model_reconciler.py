"""The ArksModel reconciler against the Kubernetes API emulator, through the real client.

The emulator runs no controllers: tests play the PV binder (PVC `status.phase: Bound`), the Job
controller (Job status) and the DaemonSet controller (cache pods with a node and Ready).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes.client import ApiClient

from arks.adapters.kube import rest
from arks.adapters.kube.conditions import find_condition
from arks.adapters.kube.errors import PermanentError, TemporaryError
from arks.adapters.kube.queue import WorkQueue
from arks.resources import (
    DAEMONSETS,
    DEPLOYMENTS,
    EVENTS,
    JOBS,
    MODELS,
    NETWORKPOLICIES,
    PODS,
    PVCS,
    SERVICES,
)
from arks.wire import NODE_CACHE_FINALIZER
from controller.reconcilers.model import model_controller, reconcile_model
from controller.render.model import ModelDefaults
from controller.render.model_cache import (
    cache_daemonset_name,
    cache_pod_labels,
    cleanup_daemonset_name,
    source_name,
)
from controller.render.model_download import download_job_name
from tests.support.kube import FAST_INFORMERS, eventually, set_status
from tests.support.kube import get_object as get

MODEL = "qwen2-5-7b-instruct"
HF = {
    "huggingface": {
        "repo": "Qwen/Qwen2.5-7B-Instruct",
        "revision": "main",
        "tokenSecretRef": {"name": "hf-token", "key": "token"},
    }
}
CACHE = {"enabled": True, "nodeSelector": {"nvidia.com/gpu.present": "true"}}
CACHE_NS = ModelDefaults().cache_namespace  # shared: names and labels carry the model's namespace

pytestmark = pytest.mark.timeout(60)


def create_model(
    api: ApiClient, ns: str, source: dict[str, Any] | None = None, **spec: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"source": source or HF, **spec}
    if "pvc" not in body["source"]:
        body.setdefault("storage", {"size": "40Gi", "storageClassName": "nfs-client"})
    return rest.request(
        api,
        "POST",
        MODELS.path(ns),
        body={
            "apiVersion": "arks.ai/v1",
            "kind": "ArksModel",
            "metadata": {"name": MODEL},
            "spec": body,
        },
    )


def model_status(api: ApiClient, ns: str) -> dict[str, Any]:
    model = get(api, MODELS, ns, MODEL)
    assert model is not None
    return dict(model.get("status") or {})


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = find_condition(status.get("conditions"), type_)
    assert found is not None, f"no {type_} condition in {status}"
    return dict(found)


def job_name(model: dict[str, Any]) -> str:
    return download_job_name(model)


def bind_claim(api: ApiClient, ns: str, name: str = MODEL) -> None:
    set_status(api, PVCS, ns, name, phase="Bound")


def complete_job(api: ApiClient, ns: str, name: str) -> None:
    set_status(
        api,
        JOBS,
        ns,
        name,
        succeeded=1,
        conditions=[{"type": "Complete", "status": "True", "reason": "Completed"}],
    )


def fail_job(api: ApiClient, ns: str, name: str, reason: str, message: str) -> None:
    set_status(
        api,
        JOBS,
        ns,
        name,
        failed=5,
        conditions=[{"type": "Failed", "status": "True", "reason": reason, "message": message}],
    )


def owner_uids(obj: dict[str, Any] | None) -> list[str]:
    assert obj is not None
    return [r["uid"] for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")]


def event_reasons(api: ApiClient, ns: str) -> dict[str, str]:
    events = rest.request(api, "GET", EVENTS.path(ns)).get("items") or []
    return {e["reason"]: e["type"] for e in events if e["involvedObject"]["name"] == MODEL}


def create_cache_pod(
    api: ApiClient,
    ns: str,
    model: dict[str, Any],
    node: str,
    ready: bool,
    copy_exit: tuple[int, str] | None = None,
) -> None:
    """What the DaemonSet controller would create in the cache namespace (and the kubelet
    report): a pod on `node`, Ready or not; `copy_exit` is how its copy container ended."""
    name = f"{cache_daemonset_name(model)}-{node}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": cache_pod_labels(model),
            "annotations": {"arks.ai/model": MODEL, "arks.ai/model-namespace": ns},
        },
        "spec": {"nodeName": node, "containers": [{"name": "hold", "image": "arks"}]},
    }
    rest.request(api, "POST", PODS.path(CACHE_NS), body=pod)
    status: dict[str, Any] = {
        "phase": "Running" if ready else "Pending",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if copy_exit is not None:
        code, message = copy_exit
        status["initContainerStatuses"] = [
            {"name": "copy", "state": {"terminated": {"exitCode": code, "message": message}}}
        ]
    set_status(api, PODS, CACHE_NS, name, **status)


def cache_ds(api: ApiClient, model: dict[str, Any]) -> dict[str, Any] | None:
    return get(api, DAEMONSETS, CACHE_NS, cache_daemonset_name(model))


def ready_model(api: ApiClient, ns: str, **spec: Any) -> dict[str, Any]:
    model = create_model(api, ns, **spec)
    reconcile_model(api, (ns, MODEL))
    bind_claim(api, ns)
    complete_job(api, ns, job_name(model))
    reconcile_model(api, (ns, MODEL))
    return model


def test_create_renders_an_owned_claim_and_job_and_waits_for_storage(
    api: ApiClient, ns: str
) -> None:
    model = create_model(api, ns)
    reconcile_model(api, (ns, MODEL))

    pvc = get(api, PVCS, ns, MODEL)
    job = get(api, JOBS, ns, job_name(model))
    assert pvc is not None and job is not None
    uid = model["metadata"]["uid"]
    assert owner_uids(pvc) == owner_uids(job) == [uid]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "40Gi"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == "nfs-client"
    pod = job["spec"]["template"]["spec"]
    assert (
        "hf download Qwen/Qwen2.5-7B-Instruct --revision main" in pod["containers"][0]["command"][2]
    )
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == MODEL
    assert get(api, DAEMONSETS, ns, cache_daemonset_name(model)) is None

    status = model_status(api, ns)
    assert status["phase"] == "StorageCreating"
    assert status["claimName"] == MODEL
    assert status["observedGeneration"] == model["metadata"]["generation"]
    assert condition(status, "StorageReady")["reason"] == "ClaimPending"
    assert condition(status, "Downloaded")["reason"] == "DownloadPending"
    assert "warmNodes" not in status
    assert event_reasons(api, ns) == {"StorageCreating": "Normal"}


def test_phases_follow_the_claim_and_the_job(api: ApiClient, ns: str) -> None:
    model = create_model(api, ns)
    reconcile_model(api, (ns, MODEL))
    name = job_name(model)

    bind_claim(api, ns)
    reconcile_model(api, (ns, MODEL))
    status = model_status(api, ns)
    assert status["phase"] == "Downloading"
    assert condition(status, "StorageReady")["status"] == "True"

    set_status(api, JOBS, ns, name, active=1)
    reconcile_model(api, (ns, MODEL))
    status = model_status(api, ns)
    assert (status["phase"], condition(status, "Downloaded")["reason"]) == (
        "Downloading",
        "Downloading",
    )
    storage_since = condition(status, "StorageReady")["lastTransitionTime"]

    complete_job(api, ns, name)
    reconcile_model(api, (ns, MODEL))
    status = model_status(api, ns)
    assert status["phase"] == "Ready"
    downloaded = condition(status, "Downloaded")
    assert (downloaded["status"], downloaded["reason"]) == ("True", "DownloadSucceeded")
    assert condition(status, "StorageReady")["lastTransitionTime"] == storage_since
    assert event_reasons(api, ns) == {
        "StorageCreating": "Normal",
        "Downloading": "Normal",
        "ModelReady": "Normal",
    }


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("BackoffLimitExceeded", "Job has reached the specified backoff limit"),
        ("DeadlineExceeded", "Job was active longer than specified deadline"),
    ],
)
def test_a_failed_job_fails_the_model_until_the_job_is_deleted(
    api: ApiClient, ns: str, reason: str, message: str
) -> None:
    model = create_model(api, ns)
    reconcile_model(api, (ns, MODEL))
    bind_claim(api, ns)
    name = job_name(model)
    fail_job(api, ns, name, reason, message)
    reconcile_model(api, (ns, MODEL))

    status = model_status(api, ns)
    assert status["phase"] == "Failed"
    downloaded = condition(status, "Downloaded")
    assert (downloaded["status"], downloaded["reason"]) == ("False", reason)
    assert message in downloaded["message"] and "delete the Job to retry" in downloaded["message"]
    assert event_reasons(api, ns)["DownloadFailed"] == "Warning"

    reconcile_model(api, (ns, MODEL))  # a Failed Job stays Failed …
    assert model_status(api, ns)["phase"] == "Failed"
    rest.request(api, "DELETE", JOBS.path(ns, name))  # … until an operator deletes it
    reconcile_model(api, (ns, MODEL))
    fresh = get(api, JOBS, ns, name)
    assert fresh is not None and not fresh.get("status")
    assert model_status(api, ns)["phase"] == "Downloading"


def test_reconciling_twice_changes_nothing(api: ApiClient, ns: str) -> None:
    model = create_model(api, ns, nodeCache=CACHE)
    reconcile_model(api, (ns, MODEL))
    bind_claim(api, ns)
    complete_job(api, ns, job_name(model))
    reconcile_model(api, (ns, MODEL))
    create_cache_pod(api, ns, model, "gpu-a", ready=True)
    reconcile_model(api, (ns, MODEL))
    assert model_status(api, ns)["phase"] == "Ready"

    def versions() -> list[str]:
        objs = [
            get(api, MODELS, ns, MODEL),
            get(api, PVCS, ns, MODEL),
            get(api, JOBS, ns, job_name(model)),
            cache_ds(api, model),
            get(api, DEPLOYMENTS, ns, source_name(model)),
        ]
        events = rest.request(api, "GET", EVENTS.path(ns)).get("items") or []
        return [str(o["metadata"]["resourceVersion"]) for o in [*objs, *events] if o is not None]

    before = versions()
    reconcile_model(api, (ns, MODEL))
    reconcile_model(api, (ns, MODEL))
    assert len(before) >= 5
    assert versions() == before


def test_deleted_children_are_recreated(api: ApiClient, ns: str) -> None:
    model = create_model(api, ns)
    reconcile_model(api, (ns, MODEL))
    rest.request(api, "DELETE", JOBS.path(ns, job_name(model)))
    rest.request(api, "DELETE", PVCS.path(ns, MODEL))
    reconcile_model(api, (ns, MODEL))
    assert get(api, JOBS, ns, job_name(model)) is not None
    assert get(api, PVCS, ns, MODEL) is not None


def test_deleting_the_model_deletes_its_node_copies_before_it_goes(api: ApiClient, ns: str) -> None:
    model = ready_model(api, ns, nodeCache=CACHE)
    assert cache_ds(api, model) is not None
    assert NODE_CACHE_FINALIZER in get(api, MODELS, ns, MODEL)["metadata"]["finalizers"]

    rest.request(api, "DELETE", MODELS.path(ns, MODEL))
    with pytest.raises(TemporaryError, match="node copies"):
        reconcile_model(api, (ns, MODEL))
    assert cache_ds(api, model) is None
    cleanup_name = cleanup_daemonset_name(model, "/var/lib/arks/models/" + ns)
    cleanup = get(api, DAEMONSETS, CACHE_NS, cleanup_name)
    assert cleanup is not None, "a DaemonSet deletes the copies on the nodes the cache ran on"
    pod = cleanup["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == CACHE["nodeSelector"]
    assert pod["volumes"][0]["hostPath"]["path"] == f"/var/lib/arks/models/{ns}"
    assert get(api, MODELS, ns, MODEL) is not None, "held by the finalizer until then"

    set_status(
        api,
        DAEMONSETS,
        CACHE_NS,
        cleanup_name,
        desiredNumberScheduled=2,
        numberReady=1,
        observedGeneration=1,
    )
    with pytest.raises(TemporaryError):
        reconcile_model(api, (ns, MODEL))
    assert get(api, MODELS, ns, MODEL) is not None, "one node still holds a copy"

    set_status(
        api,
        DAEMONSETS,
        CACHE_NS,
        cleanup_name,
        desiredNumberScheduled=2,
        numberReady=2,
        observedGeneration=1,
    )
    reconcile_model(api, (ns, MODEL))
    assert get(api, DAEMONSETS, CACHE_NS, cleanup_name) is None
    eventually(lambda: get(api, MODELS, ns, MODEL) is None)
    eventually(lambda: get(api, PVCS, ns, MODEL) is None)
    eventually(lambda: get(api, JOBS, ns, job_name(model)) is None)
    eventually(lambda: get(api, DEPLOYMENTS, ns, source_name(model)) is None)
    reconcile_model(api, (ns, MODEL))  # a gone model is nothing to do


def test_a_model_without_a_cache_is_deleted_at_once(api: ApiClient, ns: str) -> None:
    model = ready_model(api, ns)
    assert not get(api, MODELS, ns, MODEL)["metadata"].get("finalizers")
    rest.request(api, "DELETE", MODELS.path(ns, MODEL))
    eventually(lambda: get(api, MODELS, ns, MODEL) is None)
    eventually(lambda: get(api, JOBS, ns, job_name(model)) is None)


def test_an_adopted_claim_is_ready_once_bound_and_never_owned(api: ApiClient, ns: str) -> None:
    create_model(api, ns, {"pvc": {"claimName": "shared-models", "subPath": "qwen/7b"}})
    with pytest.raises(TemporaryError) as missing:
        reconcile_model(api, (ns, MODEL))
    assert missing.value.delay_s == 10
    status = model_status(api, ns)
    assert status["phase"] == "Pending"
    assert status["claimName"] == "shared-models"
    assert condition(status, "StorageReady")["reason"] == "ClaimNotFound"
    assert event_reasons(api, ns) == {"ClaimNotFound": "Warning"}

    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "shared-models"},
        "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Ti"}}},
    }
    rest.request(api, "POST", PVCS.path(ns), body=claim)
    with pytest.raises(TemporaryError):
        reconcile_model(api, (ns, MODEL))
    status = model_status(api, ns)
    assert (status["phase"], condition(status, "StorageReady")["reason"]) == (
        "StorageCreating",
        "ClaimNotBound",
    )

    bind_claim(api, ns, "shared-models")
    reconcile_model(api, (ns, MODEL))
    status = model_status(api, ns)
    assert status["phase"] == "Ready"
    assert condition(status, "Downloaded")["reason"] == "Adopted"
    jobs = rest.request(api, "GET", JOBS.path(ns)).get("items") or []
    assert jobs == [] and get(api, PVCS, ns, MODEL) is None

    adopted = get(api, PVCS, ns, "shared-models")
    assert adopted is not None and not adopted["metadata"].get("ownerReferences")
    rest.request(api, "DELETE", MODELS.path(ns, MODEL))
    eventually(lambda: get(api, MODELS, ns, MODEL) is None)
    assert get(api, PVCS, ns, "shared-models") is not None, "an adopted claim outlives the model"


def test_a_claim_of_the_same_name_owned_by_someone_else_is_not_taken_over(
    api: ApiClient, ns: str
) -> None:
    foreign = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": MODEL},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    rest.request(api, "POST", PVCS.path(ns), body=foreign)
    create_model(api, ns)
    with pytest.raises(PermanentError):
        reconcile_model(api, (ns, MODEL))
    status = model_status(api, ns)
    assert status["phase"] == "Failed"
    assert condition(status, "StorageReady")["reason"] == "NameTaken"
    pvc = get(api, PVCS, ns, MODEL)
    assert pvc is not None and not pvc["metadata"].get("ownerReferences")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"


def test_the_node_cache_reports_ready_cache_pods_as_warm_nodes(api: ApiClient, ns: str) -> None:
    model = create_model(api, ns, nodeCache=CACHE)
    reconcile_model(api, (ns, MODEL))
    status = model_status(api, ns)
    assert condition(status, "CacheReady")["reason"] == "WaitingForDownload"
    assert status["warmNodes"] == []
    assert cache_ds(api, model) is None, "copy only a complete model"
    assert get(api, DEPLOYMENTS, ns, source_name(model)) is None

    bind_claim(api, ns)
    complete_job(api, ns, job_name(model))
    reconcile_model(api, (ns, MODEL))
    daemonset = cache_ds(api, model)
    assert daemonset is not None
    assert not daemonset["metadata"].get("ownerReferences"), "named by labels, not owned"
    assert daemonset["metadata"]["labels"]["arks.ai/model-namespace"] == ns
    assert daemonset["spec"]["template"]["spec"]["nodeSelector"] == CACHE["nodeSelector"]
    uid = model["metadata"]["uid"]
    for resource in (DEPLOYMENTS, SERVICES, NETWORKPOLICIES):
        assert owner_uids(get(api, resource, ns, source_name(model))) == [uid]

    set_status(api, DAEMONSETS, CACHE_NS, cache_daemonset_name(model), desiredNumberScheduled=2)
    create_cache_pod(api, ns, model, "gpu-b", ready=True)
    create_cache_pod(api, ns, model, "gpu-c", ready=False)
    reconcile_model(api, (ns, MODEL))
    status = model_status(api, ns)
    assert status["warmNodes"] == ["gpu-b"]
    assert condition(status, "CacheReady")["reason"] == "CacheWarming"

    create_cache_pod(api, ns, model, "gpu-a", ready=True)
    reconcile_model(api, (ns, MODEL))
    status = model_status(api, ns)
    assert status["warmNodes"] == ["gpu-a", "gpu-b"]
    assert condition(status, "CacheReady")["status"] == "True"
    assert status["phase"] == "Ready"


def test_a_node_without_room_is_named_in_the_cache_condition(api: ApiClient, ns: str) -> None:
    model = ready_model(api, ns, nodeCache=CACHE)
    set_status(api, DAEMONSETS, CACHE_NS, cache_daemonset_name(model), desiredNumberScheduled=2)
    create_cache_pod(api, ns, model, "gpu-a", ready=True)
    full = "arks: not enough disk for the model on this node: it needs 15 GB, 3 GB are free"
    create_cache_pod(api, ns, model, "gpu-b", ready=False, copy_exit=(2, full))
    reconcile_model(api, (ns, MODEL))
    cache = condition(model_status(api, ns), "CacheReady")
    assert (cache["status"], cache["reason"]) == ("False", "NoDiskSpace")
    assert cache["message"] == f"node gpu-b: {full}"
    assert model_status(api, ns)["phase"] == "Ready", "the claim still serves"


def test_turning_the_cache_off_deletes_the_node_copies_then_lets_go(
    api: ApiClient, ns: str
) -> None:
    model = ready_model(api, ns, nodeCache=CACHE)
    rest.request(
        api,
        "PATCH",
        MODELS.path(ns, MODEL),
        body={"spec": {"nodeCache": {"enabled": False}}},
        content_type=rest.MERGE_PATCH,
    )
    reconcile_model(api, (ns, MODEL))
    assert cache_ds(api, model) is None
    cleanup_name = cleanup_daemonset_name(model, f"/var/lib/arks/models/{ns}")
    assert get(api, DAEMONSETS, CACHE_NS, cleanup_name) is not None
    for resource in (DEPLOYMENTS, SERVICES, NETWORKPOLICIES):
        assert get(api, resource, ns, source_name(model)) is None, "pruned with the cache"
    status = model_status(api, ns)
    assert "warmNodes" not in status
    assert find_condition(status.get("conditions"), "CacheReady") is None
    assert NODE_CACHE_FINALIZER in get(api, MODELS, ns, MODEL)["metadata"]["finalizers"]

    set_status(
        api,
        DAEMONSETS,
        CACHE_NS,
        cleanup_name,
        desiredNumberScheduled=1,
        numberReady=1,
        observedGeneration=1,
    )
    reconcile_model(api, (ns, MODEL))
    assert get(api, DAEMONSETS, CACHE_NS, cleanup_name) is None
    assert not get(api, MODELS, ns, MODEL)["metadata"].get("finalizers")


def test_a_cache_turned_back_on_waits_for_the_cleanup_of_its_directory(
    api: ApiClient, ns: str
) -> None:
    # Off, then on again before the cleanup pods ran: a copy made now would be deleted by them
    # afterwards, under the engines reading it (and its pods would never be Ready again).
    model = ready_model(api, ns, nodeCache=CACHE)
    for enabled in (False, True):
        rest.request(
            api,
            "PATCH",
            MODELS.path(ns, MODEL),
            body={"spec": {"nodeCache": {"enabled": enabled}}},
            content_type=rest.MERGE_PATCH,
        )
        recheck = reconcile_model(api, (ns, MODEL))
        assert recheck is not None, "a node that never confirms sends no event: look again"
    cleanup_name = cleanup_daemonset_name(model, f"/var/lib/arks/models/{ns}")
    assert get(api, DAEMONSETS, CACHE_NS, cleanup_name) is not None
    assert cache_ds(api, model) is None, "not filled while its directory is being emptied"
    assert condition(model_status(api, ns), "CacheReady")["reason"] == "CleanupPending"

    set_status(
        api,
        DAEMONSETS,
        CACHE_NS,
        cleanup_name,
        desiredNumberScheduled=1,
        numberReady=1,
        observedGeneration=1,
    )
    assert reconcile_model(api, (ns, MODEL)) is None
    assert get(api, DAEMONSETS, CACHE_NS, cleanup_name) is None
    assert cache_ds(api, model) is not None
    assert condition(model_status(api, ns), "CacheReady")["reason"] != "CleanupPending"


def test_moving_the_cache_cleans_the_old_directory(api: ApiClient, ns: str) -> None:
    model = ready_model(api, ns, nodeCache=CACHE)
    rest.request(
        api,
        "PATCH",
        MODELS.path(ns, MODEL),
        body={"spec": {"nodeCache": {"path": "/mnt/nvme"}}},
        content_type=rest.MERGE_PATCH,
    )
    roots = ModelDefaults(cache_roots=("/var/lib/arks/models", "/mnt/nvme"))
    reconcile_model(api, (ns, MODEL), defaults=roots)
    old = get(
        api, DAEMONSETS, CACHE_NS, cleanup_daemonset_name(model, f"/var/lib/arks/models/{ns}")
    )
    assert old is not None
    assert old["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["path"] == (
        f"/var/lib/arks/models/{ns}"
    )
    current = cache_ds(api, model)
    assert current is not None
    assert current["metadata"]["annotations"]["arks.ai/cache-root"] == f"/mnt/nvme/{ns}"


def test_a_new_source_prunes_the_old_download_job_but_keeps_the_claim(
    api: ApiClient, ns: str
) -> None:
    model = ready_model(api, ns)
    old_job = job_name(model)
    rest.request(
        api,
        "PATCH",
        MODELS.path(ns, MODEL),
        body={"spec": {"source": {"huggingface": {"revision": "v2"}}}},
        content_type=rest.MERGE_PATCH,
    )
    reconcile_model(api, (ns, MODEL))
    changed = get(api, MODELS, ns, MODEL)
    assert changed is not None and job_name(changed) != old_job
    assert get(api, JOBS, ns, job_name(changed)) is not None
    assert get(api, JOBS, ns, old_job) is None
    assert get(api, PVCS, ns, MODEL) is not None, "the claim holds the model: never pruned"
    reasons = event_reasons(api, ns)
    assert reasons.get("Pruned") == "Normal"


def test_the_running_controller_creates_repairs_and_follows(api: ApiClient, ns: str) -> None:
    controller = model_controller(
        api, ns, workers=2, queue=WorkQueue(max_delay_s=0.5), informer_options=FAST_INFORMERS
    )
    controller.start()
    try:
        model = create_model(api, ns, nodeCache=CACHE)
        name = job_name(model)
        eventually(lambda: get(api, JOBS, ns, name))
        eventually(lambda: get(api, PVCS, ns, MODEL))
        eventually(lambda: model_status(api, ns).get("phase") == "StorageCreating")

        rest.request(api, "DELETE", JOBS.path(ns, name))
        eventually(lambda: get(api, JOBS, ns, name))
        rest.request(api, "DELETE", PVCS.path(ns, MODEL))
        eventually(lambda: get(api, PVCS, ns, MODEL))

        bind_claim(api, ns)  # an owned child changed: the model is reconciled
        eventually(lambda: model_status(api, ns).get("phase") == "Downloading")
        complete_job(api, ns, name)
        eventually(lambda: model_status(api, ns).get("phase") == "Ready")
        eventually(lambda: cache_ds(api, model))

        create_cache_pod(api, ns, model, "gpu-a", ready=True)  # cache pods are watched too
        eventually(lambda: model_status(api, ns).get("warmNodes") == ["gpu-a"])

        # The cache source's NetworkPolicy and Service are repaired too: without the policy,
        # any pod of the cluster could read the model's files from the source.
        for resource in (NETWORKPOLICIES, SERVICES):
            rest.request(api, "DELETE", resource.path(ns, source_name(model)))
            eventually(lambda r=resource: get(api, r, ns, source_name(model)))

        # Deleting the model: the cleanup DaemonSet's progress (watched) releases it.
        rest.request(api, "DELETE", MODELS.path(ns, MODEL))
        cleanup_name = cleanup_daemonset_name(model, f"/var/lib/arks/models/{ns}")
        eventually(lambda: get(api, DAEMONSETS, CACHE_NS, cleanup_name))
        set_status(
            api,
            DAEMONSETS,
            CACHE_NS,
            cleanup_name,
            desiredNumberScheduled=1,
            numberReady=1,
            observedGeneration=1,
        )
        eventually(lambda: get(api, MODELS, ns, MODEL) is None)
    finally:
        started = time.monotonic()
        controller.stop()
    assert time.monotonic() - started < 5


def test_a_cache_path_outside_the_allowed_roots_is_refused(api: ApiClient, ns: str) -> None:
    model = ready_model(api, ns, nodeCache={**CACHE, "path": "/etc"})
    assert cache_ds(api, model) is None, "no privileged pod chowns or deletes under /etc"
    assert get(api, DEPLOYMENTS, ns, source_name(model)) is None
    cache = condition(model_status(api, ns), "CacheReady")
    assert (cache["status"], cache["reason"]) == ("False", "PathNotAllowed")
    assert "/var/lib/arks/models" in cache["message"]
    assert not get(api, MODELS, ns, MODEL)["metadata"].get("finalizers")
    assert model_status(api, ns)["phase"] == "Ready", "the claim still serves"


def test_a_node_that_never_cleans_up_does_not_hold_the_model_forever(
    api: ApiClient, ns: str
) -> None:
    import datetime

    model = ready_model(api, ns, nodeCache=CACHE)
    rest.request(api, "DELETE", MODELS.path(ns, MODEL))
    with pytest.raises(TemporaryError):
        reconcile_model(api, (ns, MODEL))
    cleanup_name = cleanup_daemonset_name(model, f"/var/lib/arks/models/{ns}")
    set_status(
        api,
        DAEMONSETS,
        CACHE_NS,
        cleanup_name,
        desiredNumberScheduled=3,
        numberReady=2,
        observedGeneration=1,
    )  # one node is down
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
    with pytest.raises(TemporaryError):
        reconcile_model(api, (ns, MODEL), now=soon)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=11)
    reconcile_model(api, (ns, MODEL), now=later)
    assert get(api, DAEMONSETS, CACHE_NS, cleanup_name) is None
    eventually(lambda: get(api, MODELS, ns, MODEL) is None)
    events = rest.request(api, "GET", EVENTS.path(ns)).get("items") or []
    (warning,) = [e for e in events if e["reason"] == "CacheCleanupIncomplete"]
    assert warning["type"] == "Warning" and "2 of 3 nodes" in warning["message"]


@pytest.mark.parametrize("name", ["qwen2.5-7b", "m." + "q" * 240])
def test_a_dotted_or_long_model_name_makes_children_the_api_server_accepts(
    api: ApiClient, ns: str, name: str
) -> None:
    # Model names are DNS subdomains (dots, up to 253): every child's name and label must still
    # be what the API server accepts (the emulator checks names and labels as it does).
    body = {"source": HF, "storage": {"size": "40Gi"}, "nodeCache": CACHE}
    model = rest.request(
        api,
        "POST",
        MODELS.path(ns),
        body={"apiVersion": "arks.ai/v1", "kind": "ArksModel", "metadata": {"name": name},
              "spec": body},
    )  # fmt: skip
    reconcile_model(api, (ns, name))
    bind_claim(api, ns, name)
    complete_job(api, ns, job_name(model))
    reconcile_model(api, (ns, name))
    assert get(api, DEPLOYMENTS, ns, source_name(model)) is not None
    assert cache_ds(api, model) is not None
    rest.request(api, "DELETE", MODELS.path(ns, name))
    with pytest.raises(TemporaryError):
        reconcile_model(api, (ns, name))  # the cleanup DaemonSet is made, with valid labels
    cleanup = cleanup_daemonset_name(model, f"/var/lib/arks/models/{ns}")
    assert get(api, DAEMONSETS, CACHE_NS, cleanup) is not None
