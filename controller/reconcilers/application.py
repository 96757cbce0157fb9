"""ArksApplication reconciler: model ready → render → apply children → report status.

Level-triggered: every call reads the application and its model afresh, applies the full
desired set of children (server-side apply, owned by the application so deletion cascades)
and derives the status from the workload as it is now. An unchanged status is not written,
so reconciling a settled application makes no writes that change anything.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes.client import ApiClient

from controller.kube import rest
from controller.kube.apply import patch_status, server_side_apply, set_owner
from controller.kube.conditions import set_condition
from controller.kube.errors import PermanentError, TemporaryError
from controller.kube.queue import Key, WorkQueue
from controller.kube.rest import Obj, Resource
from controller.kube.runner import Controller, Leadership
from controller.kube.watch import Informer, watch_owned
from controller.render.application import RenderDefaults, render_application

APPLICATIONS = Resource("arks.ai", "v1", "arksapplications")
MODELS = Resource("arks.ai", "v1", "arksmodels")
DEPLOYMENTS = Resource("apps", "v1", "deployments")
SERVICES = Resource("", "v1", "services")
LEADERWORKERSETS = Resource("leaderworkerset.x-k8s.io", "v1", "leaderworkersets")
HPAS = Resource("autoscaling", "v2", "horizontalpodautoscalers")

APP_API_VERSION = "arks.ai/v1"
APP_KIND = "ArksApplication"
FIELD_MANAGER = "arks-controller"
MODEL_WAIT_S = 5.0

# The plural of every kind the renderer emits (plurals cannot be derived from kinds safely).
_PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "LeaderWorkerSet": "leaderworkersets",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
}

PHASE_PENDING = "Pending"
PHASE_RUNNING = "Running"
PHASE_READY = "Ready"
PHASE_FAILED = "Failed"



def resource_for(obj: Mapping[str, Any]) -> Resource:
    kind = str(obj["kind"])
    plural = _PLURALS.get(kind)
    if plural is None:
        raise PermanentError(f"the renderer produced an unknown kind {kind!r}")
    return rest.resource_of(obj, plural)


def model_claim(model: Mapping[str, Any]) -> str:
    """The PVC holding the model's files: `status.claimName`, else the model's name."""
    claim = (model.get("status") or {}).get("claimName")
    return str(claim) if claim else str(model["metadata"]["name"])


def workload_replicas(workload: Mapping[str, Any] | None) -> tuple[int, int]:
    """(desired, ready) replicas of a Deployment or LeaderWorkerSet (groups for the latter)."""
    if workload is None:
        return 0, 0
    spec = workload.get("spec") or {}
    status = workload.get("status") or {}
    desired = spec.get("replicas")
    if desired is None:  # an HPA owns the count: report what the controller is running
        desired = status.get("replicas", 1)
    return int(desired), int(status.get("readyReplicas") or 0)


def phase_of(desired: int, ready: int) -> str:
    if ready >= 1 and ready >= desired:
        return PHASE_READY
    if ready >= 1:
        return PHASE_RUNNING
    return PHASE_PENDING


class _Status:
    """Builds the application's next status from its current one (conditions keep times)."""

    def __init__(self, app: Mapping[str, Any], now: datetime.datetime) -> None:
        self.current: Mapping[str, Any] = app.get("status") or {}
        self.generation = app["metadata"].get("generation")
        self.now = now
        self.conditions: Sequence[Mapping[str, Any]] | None = self.current.get("conditions")
        self.fields: dict[str, Any] = {}

    def condition(self, type_: str, status: str, reason: str, message: str) -> None:
        self.conditions = set_condition(
            self.conditions, type_, status, reason, message, self.generation, self.now
        )

    def desired(self) -> dict[str, Any]:
        status = {**self.fields, "conditions": list(self.conditions or [])}
        if self.generation is not None:
            status["observedGeneration"] = self.generation
        return status

    def write(self, api_client: ApiClient, app: Mapping[str, Any]) -> None:
        desired = self.desired()
        if all(self.current.get(k) == v for k, v in desired.items()):
            return
        meta = app["metadata"]
        patch_status(api_client, APPLICATIONS, meta["namespace"], meta["name"], desired)


def reconcile_application(
    api_client: ApiClient,
    key: Key,
    *,
    field_manager: str = FIELD_MANAGER,
    defaults: RenderDefaults | None = None,
    now: datetime.datetime | None = None,
) -> None:
    """Bring ArksApplication `key` = (namespace, name) and its children to the desired state.

    Raises TemporaryError while the model is not Ready, and the renderer's PermanentError for
    a spec that cannot be run (after recording it in the status).
    """
    namespace, name = key
    app = rest.get_or_none(api_client, APPLICATIONS, namespace, name)
    if app is None or app["metadata"].get("deletionTimestamp"):
        return  # children go with it through their owner references
    status = _Status(app, now or datetime.datetime.now(datetime.UTC))

    model_name = str(app["spec"]["model"]["name"])
    model = rest.get_or_none(api_client, MODELS, namespace, model_name)
    model_phase = ((model or {}).get("status") or {}).get("phase")
    if model is None or model_phase != "Ready":
        message = (
            f"ArksModel {model_name} not found"
            if model is None
            else f"ArksModel {model_name} is {model_phase or 'not ready'}"
        )
        status.condition("ModelReady", "False", "ModelNotReady", message)
        status.fields["phase"] = PHASE_PENDING
        status.write(api_client, app)
        raise TemporaryError(f"waiting for model: {message}", delay_s=MODEL_WAIT_S)
    status.condition("ModelReady", "True", "ModelReady", f"ArksModel {model_name} is Ready")

    try:
        objects = render_application(app, model_claim(model), defaults=defaults)
        resources = [resource_for(obj) for obj in objects]
    except PermanentError as e:
        status.condition("Rendered", "False", "Unsupported", str(e))
        status.fields["phase"] = PHASE_FAILED
        status.write(api_client, app)
        raise
    status.condition("Rendered", "True", "Rendered", f"{len(objects)} objects applied")

    workload: Obj | None = None
    for obj, resource in zip(objects, resources, strict=True):
        live = server_side_apply(api_client, resource, set_owner(obj, app), field_manager)
        if obj is objects[0]:
            workload = live
    desired, ready = workload_replicas(workload)
    kind = str(objects[0]["kind"])
    if ready >= 1:
        reason = "AllReplicasReady" if ready >= desired else "SomeReplicasReady"
        status.condition("Available", "True", reason, f"{ready}/{desired} {kind} replicas ready")
    else:
        status.condition(
            "Available", "False", "NoReplicasReady", f"0/{desired} {kind} replicas ready"
        )
    status.fields.update(phase=phase_of(desired, ready), replicas=desired, readyReplicas=ready)
    status.write(api_client, app)


def application_controller(
    api_client: ApiClient,
    namespace: str | None = None,
    *,
    workers: int = 1,
    field_manager: str = FIELD_MANAGER,
    defaults: RenderDefaults | None = None,
    watch_leaderworkersets: bool = False,
    queue: WorkQueue | None = None,
    informer_options: Mapping[str, Any] | None = None,
    leader: Leadership | None = None,
) -> Controller:
    """A (not started) controller for ArksApplications and the children they own.

    Changes to owned Deployments and Services (and LeaderWorkerSets when
    `watch_leaderworkersets`, i.e. the LWS CRD is installed) re-trigger the owner, so a
    deleted or edited child is repaired.
    """
    work = queue if queue is not None else WorkQueue()
    options = dict(informer_options or {})
    informer = Informer(api_client, APPLICATIONS, namespace, **options)
    children = [DEPLOYMENTS, SERVICES, *([LEADERWORKERSETS] if watch_leaderworkersets else [])]
    owned = [
        watch_owned(api_client, child, work, APP_API_VERSION, APP_KIND, namespace, **options)
        for child in children
    ]

    def reconcile(key: Key) -> None:
        reconcile_application(api_client, key, field_manager=field_manager, defaults=defaults)

    return Controller("arksapplication", informer, reconcile, workers, queue=work, owned=owned, leader=leader)
