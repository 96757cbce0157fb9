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

Children the render no longer produces are pruned (the download Job of an older source, the
cache source when the cache is off); the PVC never is: it goes only with the model. The node
cache runs in the cache namespace (`controller.render.model_cache`), outside the model's owner
references, so the model carries the `arks.ai/node-cache` finalizer while it has a cache: a
cache turned off, moved or deleted with the model is replaced by a cleanup DaemonSet deleting
the host copies, and the finalizer comes off once every cleanup is done. A cache turned back on
at a directory still being cleaned waits for that cleanup (`CacheReady` `CleanupPending`).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from kubernetes.client import ApiClient

from arks.adapters.kube import rest
from arks.adapters.kube.apply import (
    delete,
    ensure_finalizer,
    patch_status,
    remove_finalizer,
    server_side_apply,
    set_owner,
)
from arks.adapters.kube.conditions import set_condition
from arks.adapters.kube.errors import PermanentError, TemporaryError
from arks.adapters.kube.events import record_event
from arks.adapters.kube.queue import Key, WorkQueue
from arks.adapters.kube.rest import Obj
from arks.adapters.kube.runner import Controller, Leadership
from arks.adapters.kube.watch import Handler, Informer, watch_owned
from arks.resources import (
    DAEMONSETS,
    DEPLOYMENTS,
    JOBS,
    MODELS,
    NETWORKPOLICIES,
    PODS,
    PVCS,
    SERVICES,
    Resource,
)
from arks.wire import (
    EVENT_COMPONENT,
    FIELD_MANAGER,
    LABEL_MODEL,
    NODE_CACHE_FINALIZER,
    label_value,
)
from controller.reconcilers.pruning import prune_owned
from controller.render.model import (
    ModelDefaults,
    cache_enabled,
    cache_path_problem,
    cache_root,
    claim_name,
    is_adopted,
    render_pvc,
)
from controller.render.model_cache import (
    CACHE_OBJECTS_SELECTOR,
    CACHE_PODS_SELECTOR,
    COMPONENT_CACHE,
    COMPONENT_CLEANUP,
    cache_daemonset_name,
    cleanup_done,
    cleanup_expired,
    copy_failures,
    model_selector,
    owner_key,
    render_cache_daemonset,
    render_cache_source,
    render_cleanup_daemonset,
    retired_root,
    warm_nodes,
)
from controller.render.model_download import render_download_job

log = logging.getLogger(__name__)


MODEL_API_VERSION = "arks.ai/v1"
MODEL_KIND = "ArksModel"
CLAIM_WAIT_S = 10.0  # an adopted claim is not ours, so no event tells us it appeared
CLEANUP_WAIT_S = 15.0  # recheck a host-copy cleanup even if no DaemonSet event arrives

# The kinds a model owns that its render may stop producing: the download Job of an older
# source, the cache source when the cache is off. Never its PVC: the model's files live there,
# and the claim goes only with the model (owner reference).
PRUNED_KINDS: Mapping[str, Resource] = {
    "Job": JOBS,
    "Deployment": DEPLOYMENTS,
    "Service": SERVICES,
    "NetworkPolicy": NETWORKPOLICIES,
}

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
        self.recheck_s: float | None = None  # look again then, even if no event arrives

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
) -> float | None:
    """Bring ArksModel `key` = (namespace, name) and its children to the desired state; the
    seconds after which to look again (a cleanup of node copies is pending), or None.

    Raises TemporaryError while an adopted claim is missing or unbound (it is not ours, so no
    watch event would wake us), and PermanentError when a child's name is taken by an object
    the model does not own (after recording it in the status).
    """
    namespace, name = key
    d = defaults or ModelDefaults()
    model = rest.get_or_none(api_client, MODELS, namespace, name)
    if model is None:
        return None
    if model["metadata"].get("deletionTimestamp"):
        # Children in its namespace go through their owner references; the host copies on the
        # nodes are deleted here first, then the finalizer lets the deletion complete.
        if NODE_CACHE_FINALIZER in (model["metadata"].get("finalizers") or []):
            _release_cache(api_client, model, field_manager, d, now)
        return None
    status = _Status(model, now or datetime.datetime.now(datetime.UTC))
    status.fields["claimName"] = claim_name(model)
    rendered: list[dict[str, Any]] = []
    try:
        if is_adopted(model):
            _reconcile_adopted(api_client, model, status)
        else:
            rendered += _reconcile_download(api_client, model, status, field_manager, d)
        rendered += _reconcile_cache(api_client, model, status, field_manager, d)
    except NameTaken as e:
        status.condition(e.condition, "False", "NameTaken", str(e))
        if e.condition != "CacheReady":  # without its cache the model still serves
            status.phase(PHASE_FAILED, str(e))
        status.write(api_client, model)
        raise
    owner_label = (LABEL_MODEL, label_value(str(model["metadata"]["name"])))
    for gone in prune_owned(api_client, model, rendered, PRUNED_KINDS, owner_label):
        _event(
            api_client, model, "Normal", "Pruned", f"deleted {gone}: no longer needed", status.now
        )
    status.write(api_client, model)
    return status.recheck_s


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
    defaults: ModelDefaults,
) -> list[dict[str, Any]]:
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
    return [job_obj]


def _reconcile_cache(
    api_client: ApiClient,
    model: Obj,
    status: _Status,
    field_manager: str,
    d: ModelDefaults,
) -> list[dict[str, Any]]:
    """The node cache: its source in the model's namespace (returned, to keep it from being
    pruned), its DaemonSet in the cache namespace, the cleanup of copies it no longer wants."""
    live = rest.get_or_none(api_client, DAEMONSETS, d.cache_namespace, cache_daemonset_name(model))
    if live is not None and owner_key(live) != _key(model):
        raise NameTaken(
            f"DaemonSet {d.cache_namespace}/{live['metadata']['name']} belongs to another model",
            "CacheReady",
        )
    problem = cache_path_problem(model, d.cache_roots) if cache_enabled(model) else None
    if not cache_enabled(model) or problem is not None:
        if live is not None:
            _retire(api_client, model, live, field_manager, d)
        if _pending_cleanups(api_client, model, d, status.now):
            status.recheck_s = CLEANUP_WAIT_S  # a node that never confirms sends no event
        else:
            remove_finalizer(api_client, MODELS, model, NODE_CACHE_FINALIZER)
        if problem is not None:  # refused: the cache pods may own and delete what is there
            status.condition("CacheReady", "False", "PathNotAllowed", problem)
            status.fields["warmNodes"] = []
        else:
            status.drop_condition("CacheReady")
            status.fields["warmNodes"] = None  # merge patch: remove
        return []
    # Before anything exists outside the model's namespace: its deletion must wait for us.
    model.update(ensure_finalizer(api_client, MODELS, model, NODE_CACHE_FINALIZER))
    if live is not None and retired_root(live)[0] != cache_root(model):
        _retire(api_client, model, live, field_manager, d)  # nodeCache.path moved
        live = None
    pending = _pending_cleanups(api_client, model, d, status.now)
    if pending:
        status.recheck_s = CLEANUP_WAIT_S
    root = cache_root(model)
    if live is None and root in pending:
        # The cache was turned off (or moved away) and back before its copies under this
        # directory were deleted: a copy made now would be deleted by that cleanup, under the
        # engines reading it. Fill the directory again once the cleanup is done.
        status.condition(
            "CacheReady",
            "False",
            "CleanupPending",
            f"the node copies under {root} are still being deleted; the cache is filled "
            "again once that is done",
        )
        status.fields["warmNodes"] = []
        return render_cache_source(model, d) if status.fields.get("phase") == PHASE_READY else []
    source: list[dict[str, Any]] = []
    daemonset: Obj | None = live
    if status.fields.get("phase") == PHASE_READY:
        source = render_cache_source(model, d)
        for obj in source:
            kind = {"Deployment": DEPLOYMENTS, "Service": SERVICES}.get(
                obj["kind"], NETWORKPOLICIES
            )
            _apply_owned(api_client, kind, obj, model, field_manager, "CacheReady")
        ds_obj = render_cache_daemonset(model, d)
        assert ds_obj is not None
        daemonset = server_side_apply(api_client, DAEMONSETS, ds_obj, field_manager)
    elif live is not None:
        # A new source is downloading: the nodes keep their copy, new nodes still fetch it.
        source = render_cache_source(model, d)
    listed = rest.request(
        api_client,
        "GET",
        PODS.path(d.cache_namespace),
        query={"labelSelector": model_selector(model, COMPONENT_CACHE)},
    )
    pods = listed.get("items") or []
    nodes = warm_nodes(pods)
    status.fields["warmNodes"] = nodes
    failures = [f for f in copy_failures(pods) if f[0] not in nodes]
    if daemonset is None:
        status.condition(
            "CacheReady",
            "False",
            "WaitingForDownload",
            "the cache is filled once the model is Ready",
        )
        return source
    desired = (daemonset.get("status") or {}).get("desiredNumberScheduled")
    if desired is not None and int(desired) == 0:
        status.condition(
            "CacheReady", "False", "NoMatchingNodes", "no node matches nodeCache.nodeSelector"
        )
    elif desired is not None and len(nodes) >= int(desired):
        status.condition(
            "CacheReady", "True", "CacheWarm", f"{len(nodes)}/{desired} nodes hold the model"
        )
    elif failures:
        node, reason, message = failures[0]
        more = f" (and {len(failures) - 1} more nodes)" if len(failures) > 1 else ""
        status.condition("CacheReady", "False", reason, f"node {node}: {message}{more}")
    else:
        status.condition(
            "CacheReady",
            "False",
            "CacheWarming",
            f"{len(nodes)}/{'?' if desired is None else desired} nodes hold the model",
        )
    return source


def _key(model: Mapping[str, Any]) -> tuple[str, str]:
    return str(model["metadata"]["namespace"]), str(model["metadata"]["name"])


def _retire(
    api_client: ApiClient, model: Obj, live: Obj, field_manager: str, d: ModelDefaults
) -> None:
    """Replace cache DaemonSet `live` by a cleanup DaemonSet deleting its copies."""
    root, node_selector = retired_root(live)
    if root:
        cleanup = render_cleanup_daemonset(model, root, node_selector, d)
        server_side_apply(api_client, DAEMONSETS, cleanup, field_manager)
    delete(api_client, DAEMONSETS, d.cache_namespace, live["metadata"]["name"])
    _event(
        api_client,
        model,
        "Normal",
        "CacheRemoving",
        f"deleting the node copies under {root or '?'}",
        datetime.datetime.now(datetime.UTC),
    )


def _pending_cleanups(
    api_client: ApiClient, model: Obj, d: ModelDefaults, now: datetime.datetime
) -> set[str]:
    """Delete the model's cleanup DaemonSets that are done, or past their deadline (a node that
    is down would otherwise hold the model forever: say which copies may be left); the host
    directories of those left."""
    listed = rest.request(
        api_client,
        "GET",
        DAEMONSETS.path(d.cache_namespace),
        query={"labelSelector": model_selector(model, COMPONENT_CLEANUP)},
    )
    left = set()
    for cleanup in listed.get("items") or []:
        if owner_key(cleanup) != _key(model):
            continue
        expired = cleanup_expired(cleanup, now, d.cleanup_deadline_s)
        if cleanup_done(cleanup) or expired:
            if expired and not cleanup_done(cleanup):
                status = cleanup.get("status") or {}
                _event(
                    api_client,
                    model,
                    "Warning",
                    "CacheCleanupIncomplete",
                    f"{cleanup['metadata']['name']}: {status.get('numberReady') or 0} of "
                    f"{status.get('desiredNumberScheduled', '?')} nodes confirmed deleting the "
                    f"copy under {retired_root(cleanup)[0]} within {d.cleanup_deadline_s} s; "
                    "the others may keep it",
                    now,
                )
            delete(api_client, DAEMONSETS, d.cache_namespace, cleanup["metadata"]["name"])
        else:
            left.add(retired_root(cleanup)[0])
    return left


def _release_cache(
    api_client: ApiClient,
    model: Obj,
    field_manager: str,
    d: ModelDefaults,
    now: datetime.datetime | None,
) -> None:
    """A deleted model: retire its cache DaemonSet, wait for the cleanup, drop the finalizer."""
    live = rest.get_or_none(api_client, DAEMONSETS, d.cache_namespace, cache_daemonset_name(model))
    if live is not None and owner_key(live) == _key(model):
        _retire(api_client, model, live, field_manager, d)
    if _pending_cleanups(api_client, model, d, now or datetime.datetime.now(datetime.UTC)):
        raise TemporaryError("waiting for the node copies to be deleted", delay_s=CLEANUP_WAIT_S)
    remove_finalizer(api_client, MODELS, model, NODE_CACHE_FINALIZER)


def _enqueue_by_annotations(queue: WorkQueue) -> Handler:
    """Objects of the cache namespace name their model by annotations: map them back."""

    def handle(_kind: str, obj: Obj) -> None:
        key = owner_key(obj)
        if key is not None:
            queue.add(key)

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

    Changes to owned PVCs, Jobs, Deployments, Services and NetworkPolicies (the cache source) and
    to its DaemonSets re-trigger the owner (a deleted child is created again); cache pods (labelled `arks.ai/component=model-cache`) re-trigger their model so
    `status.warmNodes` follows them.
    """
    work = queue if queue is not None else WorkQueue()
    options = dict(informer_options or {})
    cache_namespace = (defaults or ModelDefaults()).cache_namespace
    informer = Informer(api_client, MODELS, namespace, **options)
    owned: Sequence[Informer] = [
        watch_owned(api_client, child, work, MODEL_API_VERSION, MODEL_KIND, namespace, **options)
        for child in (PVCS, JOBS, DEPLOYMENTS, SERVICES, NETWORKPOLICIES)
    ]
    pods = Informer(
        api_client, PODS, cache_namespace, **{**options, "label_selector": CACHE_PODS_SELECTOR}
    )
    pods.add_handler(_enqueue_by_annotations(work))
    daemonsets = Informer(
        api_client,
        DAEMONSETS,
        cache_namespace,
        **{**options, "label_selector": CACHE_OBJECTS_SELECTOR},
    )
    daemonsets.add_handler(_enqueue_by_annotations(work))

    def reconcile(key: Key) -> float | None:
        return reconcile_model(api_client, key, field_manager=field_manager, defaults=defaults)

    return Controller(
        "arksmodel",
        informer,
        reconcile,
        workers,
        queue=work,
        owned=[*owned, pods, daemonsets],
        leader=leader,
    )
