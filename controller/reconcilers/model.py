"""ArksModel reconciler: claim → download Job → Ready, plus the optional node-local cache.

Level-triggered: every call reads the model and its children afresh, creates what is missing
and derives the status from the children as they are now:

    Pending          an adopted claim (`source.pvc`) does not exist (retried every few seconds)
    StorageCreating  the claim is not Bound yet
    Downloading      the download Job has not finished
    Ready            the Job succeeded (or the adopted claim is Bound)
    Failed           the Job failed (BackoffLimitExceeded, DeadlineExceeded, …)

The Job is created together with the PVC, not after it binds: with a WaitForFirstConsumer
StorageClass the Job's pod is what makes the claim bind. A Failed Job stays Failed; an operator
retries by deleting it (`kubectl delete job <model>-download-<id>`), and the controller creates
it again. An unchanged status is not written, so reconciling a settled model changes nothing.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from kubernetes.client import ApiClient

from arks.adapters.kube import rest
from arks.adapters.kube.apply import delete, patch_status, server_side_apply, set_owner
from arks.adapters.kube.conditions import set_condition
from arks.adapters.kube.errors import PermanentError, TemporaryError
from arks.adapters.kube.events import record_event
from arks.adapters.kube.queue import Key, WorkQueue
from arks.adapters.kube.rest import Obj
from arks.adapters.kube.runner import Controller, Leadership
from arks.adapters.kube.watch import Handler, Informer, watch_owned
from arks.resources import DAEMONSETS, JOBS, MODELS, PODS, PVCS, Resource
from arks.wire import ANNOTATION_MODEL, EVENT_COMPONENT, FIELD_MANAGER
from controller.render.model import ModelDefaults, cache_enabled, claim_name, is_adopted, render_pvc
from controller.render.model_cache import (
    CACHE_PODS_SELECTOR,
    cache_daemonset_name,
    cache_pod_selector,
    render_cache_daemonset,
    warm_nodes,
)
from controller.render.model_download import render_download_job

log = logging.getLogger(__name__)


MODEL_API_VERSION = "arks.ai/v1"
MODEL_KIND = "ArksModel"
CLAIM_WAIT_S = 10.0  # an adopted claim is not ours, so no event tells us it appeared

PHASE_PENDING = "Pending"
PHASE_STORAGE = "StorageCreating"
PHASE_DOWNLOADING = "Downloading"
PHASE_READY = "Ready"
PHASE_FAILED = "Failed"

# The Event recorded when the model enters a phase: (type, reason).
_PHASE_EVENTS = {
    PHASE_PENDING: ("Warning", "ClaimNotFound"),
    PHASE_STORAGE: ("Normal", "StorageCreating"),
    PHASE_DOWNLOADING: ("Normal", "Downloading"),
    PHASE_READY: ("Normal", "ModelReady"),
    PHASE_FAILED: ("Warning", "DownloadFailed"),
}


class NameTaken(PermanentError):
    """A child's name is used by an object the model does not own: never take it over."""

    def __init__(self, message: str, condition: str) -> None:
        super().__init__(message)
        self.condition = condition


def job_outcome(job: Mapping[str, Any]) -> tuple[str, str, str]:
    """("Succeeded" | "Failed" | "Running", reason, message) of a download Job (pure)."""
    status = job.get("status") or {}
    conditions = status.get("conditions") or []

    def true(type_: str) -> Mapping[str, Any] | None:
        return next(
            (c for c in conditions if c.get("type") == type_ and c.get("status") == "True"), None
        )

    if true("Complete") or int(status.get("succeeded") or 0) >= 1:
        return "Succeeded", "DownloadSucceeded", "the download Job succeeded"
    failed = true("Failed")
    if failed:
        reason = str(failed.get("reason") or "JobFailed")
        return "Failed", reason, str(failed.get("message") or reason)
    if int(status.get("active") or 0) >= 1:
        return "Running", "Downloading", "the download Job is running"
    return "Running", "DownloadPending", "the download Job has no running pod yet"


def claim_bound(pvc: Mapping[str, Any] | None) -> bool:
    return pvc is not None and (pvc.get("status") or {}).get("phase") == "Bound"


class _Status:
    """Builds the model's next status from its current one (conditions keep their times)."""

    def __init__(self, model: Mapping[str, Any], now: datetime.datetime) -> None:
        self.current: Mapping[str, Any] = model.get("status") or {}
        self.generation = model["metadata"].get("generation")
        self.now = now
        self.conditions: list[dict[str, Any]] = [
            dict(c) for c in self.current.get("conditions") or []
        ]
        self.fields: dict[str, Any] = {}
        self.why = ""

    def phase(self, phase: str, why: str) -> None:
        """Set the phase; `why` becomes the Event's message if the phase changes."""
        self.fields["phase"] = phase
        self.why = why

    def condition(self, type_: str, status: str, reason: str, message: str) -> None:
        self.conditions = set_condition(
            self.conditions, type_, status, reason, message, self.generation, self.now
        )

    def drop_condition(self, type_: str) -> None:
        self.conditions = [c for c in self.conditions if c.get("type") != type_]

    def desired(self) -> dict[str, Any]:
        status = {**self.fields, "conditions": self.conditions}
        if self.generation is not None:
            status["observedGeneration"] = self.generation
        return status

    def write(self, api_client: ApiClient, model: Mapping[str, Any]) -> None:
        desired = self.desired()
        if all(self.current.get(k) == v for k, v in desired.items()):
            return
        meta = model["metadata"]
        patch_status(api_client, MODELS, meta["namespace"], meta["name"], desired)
        phase = desired.get("phase")
        if phase != self.current.get("phase") and phase in _PHASE_EVENTS:
            type_, reason = _PHASE_EVENTS[str(phase)]
            _event(api_client, model, type_, reason, self.why or f"the model is {phase}", self.now)


def _event(
    api_client: ApiClient,
    model: Mapping[str, Any],
    type_: str,
    reason: str,
    message: str,
    now: datetime.datetime,
) -> None:
    try:
        record_event(api_client, model, type_, reason, message, EVENT_COMPONENT, now)
    except Exception:  # events are diagnostics: a failed one must not fail the reconcile
        log.warning(
            "could not record event %s for %s", reason, model["metadata"]["name"], exc_info=True
        )


def _controlled_by(obj: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    uid = owner["metadata"]["uid"]
    return any(
        r.get("uid") == uid and r.get("controller")
        for r in (obj.get("metadata") or {}).get("ownerReferences") or []
    )


def _apply_owned(
    api_client: ApiClient,
    resource: Resource,
    obj: Mapping[str, Any],
    model: Mapping[str, Any],
    field_manager: str,
    condition: str,
    *,
    update: bool = True,
) -> Obj:
    """Create `obj` owned by `model` (and update it when `update`); refuse to take over others'."""
    meta = obj["metadata"]
    live = rest.get_or_none(api_client, resource, meta["namespace"], meta["name"])
    if live is not None and not _controlled_by(live, model):
        raise NameTaken(
            f"{obj['kind']} {meta['name']} exists and is not owned by ArksModel "
            f"{model['metadata']['name']}; delete or rename it",
            condition,
        )
    if live is not None and not update:
        return live
    return server_side_apply(api_client, resource, set_owner(obj, model), field_manager)


def reconcile_model(
    api_client: ApiClient,
    key: Key,
    *,
    field_manager: str = FIELD_MANAGER,
    defaults: ModelDefaults | None = None,
    now: datetime.datetime | None = None,
) -> None:
    """Bring ArksModel `key` = (namespace, name) and its children to the desired state.

    Raises TemporaryError while an adopted claim is missing or unbound (it is not ours, so no
    watch event would wake us), and PermanentError when a child's name is taken by an object
    the model does not own (after recording it in the status).
    """
    namespace, name = key
    model = rest.get_or_none(api_client, MODELS, namespace, name)
    if model is None or model["metadata"].get("deletionTimestamp"):
        return  # children go with it through their owner references
    status = _Status(model, now or datetime.datetime.now(datetime.UTC))
    status.fields["claimName"] = claim_name(model)
    try:
        if is_adopted(model):
            _reconcile_adopted(api_client, model, status)
        else:
            _reconcile_download(api_client, model, status, field_manager, defaults)
        _reconcile_cache(api_client, model, status, field_manager, defaults)
    except NameTaken as e:
        status.condition(e.condition, "False", "NameTaken", str(e))
        if e.condition != "CacheReady":  # without its cache the model still serves
            status.phase(PHASE_FAILED, str(e))
        status.write(api_client, model)
        raise
    status.write(api_client, model)


def _reconcile_adopted(api_client: ApiClient, model: Obj, status: _Status) -> None:
    claim = claim_name(model)
    pvc = rest.get_or_none(api_client, PVCS, model["metadata"]["namespace"], claim)
    if pvc is None:
        why = f"PVC {claim} does not exist"
        status.condition("StorageReady", "False", "ClaimNotFound", why)
        status.phase(PHASE_PENDING, why)
        _retry_after_write(api_client, model, status, why)
    if not claim_bound(pvc):
        phase = (pvc or {}).get("status", {}).get("phase") or "Pending"
        why = f"PVC {claim} is {phase}"
        status.condition("StorageReady", "False", "ClaimNotBound", why)
        status.phase(PHASE_STORAGE, why)
        _retry_after_write(api_client, model, status, why)
    status.condition("StorageReady", "True", "Bound", f"PVC {claim} is Bound")
    why = f"the model is already on PVC {claim}"
    status.condition("Downloaded", "True", "Adopted", why)
    status.phase(PHASE_READY, why)


def _retry_after_write(api_client: ApiClient, model: Obj, status: _Status, why: str) -> NoReturn:
    status.write(api_client, model)
    raise TemporaryError(why, delay_s=CLAIM_WAIT_S)


def _reconcile_download(
    api_client: ApiClient,
    model: Obj,
    status: _Status,
    field_manager: str,
    defaults: ModelDefaults | None,
) -> None:
    pvc_obj = render_pvc(model, defaults)
    job_obj = render_download_job(model, defaults)
    assert pvc_obj is not None and job_obj is not None
    pvc = _apply_owned(api_client, PVCS, pvc_obj, model, field_manager, "StorageReady")
    # A Job's pod template is immutable: an existing Job is read, never updated.
    job = _apply_owned(api_client, JOBS, job_obj, model, field_manager, "Downloaded", update=False)
    claim, job_name = pvc_obj["metadata"]["name"], job_obj["metadata"]["name"]

    storage_why = f"PVC {claim} is Bound"
    if claim_bound(pvc):
        status.condition("StorageReady", "True", "Bound", storage_why)
    else:
        modes = ", ".join(pvc_obj["spec"]["accessModes"])
        storage_why = (
            f"PVC {claim} is {(pvc.get('status') or {}).get('phase') or 'Pending'}; "
            f"check that its StorageClass can provide {modes}"
        )
        status.condition("StorageReady", "False", "ClaimPending", storage_why)

    outcome, reason, message = job_outcome(job)
    if outcome == "Succeeded":
        why = f"Job {job_name}: {message}"
        status.condition("Downloaded", "True", reason, why)
        status.phase(PHASE_READY, f"{why}; the model is on PVC {claim}")
    elif outcome == "Failed":
        why = f"Job {job_name} failed: {message}; delete the Job to retry"
        status.condition("Downloaded", "False", reason, why)
        status.phase(PHASE_FAILED, why)
    else:
        why = f"Job {job_name}: {message}"
        status.condition("Downloaded", "False", reason, why)
        if claim_bound(pvc):
            status.phase(PHASE_DOWNLOADING, why)
        else:
            status.phase(PHASE_STORAGE, storage_why)


def _reconcile_cache(
    api_client: ApiClient,
    model: Obj,
    status: _Status,
    field_manager: str,
    defaults: ModelDefaults | None,
) -> None:
    namespace = model["metadata"]["namespace"]
    if not cache_enabled(model):
        _delete_owned(api_client, DAEMONSETS, namespace, cache_daemonset_name(model), model)
        status.drop_condition("CacheReady")
        status.fields["warmNodes"] = None  # merge patch: remove
        return
    daemonset: Obj | None
    if status.fields.get("phase") == PHASE_READY:
        ds_obj = render_cache_daemonset(model, defaults)
        assert ds_obj is not None
        daemonset = _apply_owned(api_client, DAEMONSETS, ds_obj, model, field_manager, "CacheReady")
    else:  # copy only a complete model; an existing DaemonSet is left as it is
        daemonset = rest.get_or_none(api_client, DAEMONSETS, namespace, cache_daemonset_name(model))
    listed = rest.request(
        api_client, "GET", PODS.path(namespace), query={"labelSelector": cache_pod_selector(model)}
    )
    nodes = warm_nodes(listed.get("items") or [])
    status.fields["warmNodes"] = nodes
    if daemonset is None:
        status.condition(
            "CacheReady",
            "False",
            "WaitingForDownload",
            "the cache is filled once the model is Ready",
        )
        return
    desired = (daemonset.get("status") or {}).get("desiredNumberScheduled")
    if desired is not None and int(desired) == 0:
        status.condition(
            "CacheReady", "False", "NoMatchingNodes", "no node matches nodeCache.nodeSelector"
        )
    elif desired is not None and len(nodes) >= int(desired):
        status.condition(
            "CacheReady", "True", "CacheWarm", f"{len(nodes)}/{desired} nodes hold the model"
        )
    else:
        status.condition(
            "CacheReady",
            "False",
            "CacheWarming",
            f"{len(nodes)}/{'?' if desired is None else desired} nodes hold the model",
        )


def _delete_owned(
    api_client: ApiClient, resource: Resource, namespace: str, name: str, owner: Mapping[str, Any]
) -> None:
    live = rest.get_or_none(api_client, resource, namespace, name)
    if live is None or not _controlled_by(live, owner):
        return
    delete(api_client, resource, namespace, name)


def _enqueue_cache_pod(queue: WorkQueue) -> Handler:
    """Cache pods are owned by the DaemonSet, not the model: map them back by annotation."""

    def handle(_kind: str, pod: Obj) -> None:
        meta = pod.get("metadata") or {}
        model = (meta.get("annotations") or {}).get(ANNOTATION_MODEL)
        if model:
            queue.add((str(meta.get("namespace") or ""), str(model)))

    return handle


def model_controller(
    api_client: ApiClient,
    namespace: str | None = None,
    *,
    workers: int = 1,
    field_manager: str = FIELD_MANAGER,
    defaults: ModelDefaults | None = None,
    queue: WorkQueue | None = None,
    informer_options: Mapping[str, Any] | None = None,
    leader: Leadership | None = None,
) -> Controller:
    """A (not started) controller for ArksModels and what they own.

    Changes to owned PVCs, Jobs and DaemonSets re-trigger the owner (a deleted child is created
    again); cache pods (labelled `arks.ai/component=model-cache`) re-trigger their model so
    `status.warmNodes` follows them.
    """
    work = queue if queue is not None else WorkQueue()
    options = dict(informer_options or {})
    informer = Informer(api_client, MODELS, namespace, **options)
    owned: Sequence[Informer] = [
        watch_owned(api_client, child, work, MODEL_API_VERSION, MODEL_KIND, namespace, **options)
        for child in (PVCS, JOBS, DAEMONSETS)
    ]
    pods = Informer(
        api_client, PODS, namespace, **{**options, "label_selector": CACHE_PODS_SELECTOR}
    )
    pods.add_handler(_enqueue_cache_pod(work))

    def reconcile(key: Key) -> None:
        reconcile_model(api_client, key, field_manager=field_manager, defaults=defaults)

    return Controller(
        "arksmodel", informer, reconcile, workers, queue=work, owned=[*owned, pods], leader=leader
    )
