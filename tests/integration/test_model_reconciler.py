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
from arks.resources import DAEMONSETS, EVENTS, JOBS, MODELS, PODS, PVCS
from controller.reconcilers.model import model_controller, reconcile_model
from controller.render.model_cache import cache_daemonset_name, cache_pod_labels
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
    api: ApiClient, ns: str, model: dict[str, Any], node: str, ready: bool
) -> None:
    name = f"{cache_daemonset_name(model)}-{node}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": cache_pod_labels(model),
            "annotations": {"arks.ai/model": MODEL},
        },
        "spec": {"nodeName": node, "containers": [{"name": "hold", "image": "busybox:1.37"}]},
    }
    rest.request(api, "POST", PODS.path(ns), body=pod)
    status = "True" if ready else "False"
    set_status(
        api, PODS, ns, name, phase="Running", conditions=[{"type": "Ready", "status": status}]
    )


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
            get(api, DAEMONSETS, ns, cache_daemonset_name(model)),
        ]
        events = rest.request(api, "GET", EVENTS.path(ns)).get("items") or []
        return [str(o["metadata"]["resourceVersion"]) for o in [*objs, *events] if o is not None]

    before = versions()
    reconcile_model(api, (ns, MODEL))
    reconcile_model(api, (ns, MODEL))
    assert len(before) >= 4
    assert versions() == before


def test_deleted_children_are_recreated(api: ApiClient, ns: str) -> None:
    model = create_model(api, ns)
    reconcile_model(api, (ns, MODEL))
    rest.request(api, "DELETE", JOBS.path(ns, job_name(model)))
    rest.request(api, "DELETE", PVCS.path(ns, MODEL))
    reconcile_model(api, (ns, MODEL))
    assert get(api, JOBS, ns, job_name(model)) is not None
    assert get(api, PVCS, ns, MODEL) is not None


def test_deleting_the_model_cascades_to_what_it_created(api: ApiClient, ns: str) -> None:
    model = create_model(api, ns, nodeCache=CACHE)
    reconcile_model(api, (ns, MODEL))
    bind_claim(api, ns)
    complete_job(api, ns, job_name(model))
    reconcile_model(api, (ns, MODEL))
    assert get(api, DAEMONSETS, ns, cache_daemonset_name(model)) is not None

    rest.request(api, "DELETE", MODELS.path(ns, MODEL))
    eventually(lambda: get(api, PVCS, ns, MODEL) is None)
    eventually(lambda: get(api, JOBS, ns, job_name(model)) is None)
    eventually(lambda: get(api, DAEMONSETS, ns, cache_daemonset_name(model)) is None)
    reconcile_model(api, (ns, MODEL))  # a gone model is nothing to do
    assert get(api, PVCS, ns, MODEL) is None


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
    assert get(api, DAEMONSETS, ns, cache_daemonset_name(model)) is None, (
        "copy only a complete model"
    )

    bind_claim(api, ns)
    complete_job(api, ns, job_name(model))
    reconcile_model(api, (ns, MODEL))
    daemonset = get(api, DAEMONSETS, ns, cache_daemonset_name(model))
    assert daemonset is not None
    assert owner_uids(daemonset) == [model["metadata"]["uid"]]
    assert daemonset["spec"]["template"]["spec"]["nodeSelector"] == CACHE["nodeSelector"]

    set_status(api, DAEMONSETS, ns, cache_daemonset_name(model), desiredNumberScheduled=2)
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


def test_turning_the_cache_off_removes_its_daemonset(api: ApiClient, ns: str) -> None:
    model = create_model(api, ns, nodeCache=CACHE)
    reconcile_model(api, (ns, MODEL))
    bind_claim(api, ns)
    complete_job(api, ns, job_name(model))
    reconcile_model(api, (ns, MODEL))
    rest.request(
        api,
        "PATCH",
        MODELS.path(ns, MODEL),
        body={"spec": {"nodeCache": {"enabled": False}}},
        content_type=rest.MERGE_PATCH,
    )
    reconcile_model(api, (ns, MODEL))
    assert get(api, DAEMONSETS, ns, cache_daemonset_name(model)) is None
    status = model_status(api, ns)
    assert "warmNodes" not in status
    assert find_condition(status.get("conditions"), "CacheReady") is None


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
        eventually(lambda: get(api, DAEMONSETS, ns, cache_daemonset_name(model)))

        create_cache_pod(api, ns, model, "gpu-a", ready=True)  # cache pods are watched too
        eventually(lambda: model_status(api, ns).get("warmNodes") == ["gpu-a"])
    finally:
        started = time.monotonic()
        controller.stop()
    assert time.monotonic() - started < 5
