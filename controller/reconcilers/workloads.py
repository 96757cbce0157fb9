"""What the two application reconcilers share: the model wait, the owned apply (with the
replicas handover to an autoscaler) and pruning, the status bookkeeping (phase, conditions,
Available from workload replicas) and the Events."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiClient

from arks.adapters.kube import rest
from arks.adapters.kube.apply import (
    applies,
    hand_over,
    patch_status,
    server_side_apply,
    set_owner,
)
from arks.adapters.kube.conditions import find_condition, set_condition
from arks.adapters.kube.errors import PermanentError, TemporaryError
from arks.adapters.kube.events import record_event
from arks.adapters.kube.queue import Key, WorkQueue
from arks.adapters.kube.rest import Obj
from arks.adapters.kube.watch import Informer
from arks.resources import (
    DEPLOYMENTS,
    HPAS,
    LEADERWORKERSETS,
    MODELS,
    ROLEBINDINGS,
    ROLES,
    SCALEDOBJECTS,
    SERVICEACCOUNTS,
    SERVICES,
    Resource,
)
from arks.wire import EVENT_COMPONENT, HANDOVER_FIELD_MANAGER, LABEL_APPLICATION
from controller.reconcilers.pruning import prune_owned

log = logging.getLogger(__name__)


MODEL_WAIT_S = 5.0

# Every kind an application's render may produce (plurals cannot be derived from kinds safely);
# a kind it stops producing is pruned.
KIND_RESOURCES: Mapping[str, Resource] = {
    "Deployment": DEPLOYMENTS,
    "LeaderWorkerSet": LEADERWORKERSETS,
    "HorizontalPodAutoscaler": HPAS,
    "ScaledObject": SCALEDOBJECTS,
    "Service": SERVICES,
    "ServiceAccount": SERVICEACCOUNTS,
    "Role": ROLES,
    "RoleBinding": ROLEBINDINGS,
}


WORKLOAD_KINDS = ("Deployment", "LeaderWorkerSet")
# KEDA's admission webhook refuses a ScaledObject for a workload another HPA already scales,
# so the autoscaler of a provider no longer chosen is deleted before the new one is applied.
AUTOSCALER_KINDS = ("HorizontalPodAutoscaler", "ScaledObject")

# Values of the CRD's phase enum (arks.crds.application.PHASES) this controller writes.
PHASE_PENDING = "Pending"
PHASE_RUNNING = "Running"
PHASE_FAILED = "Failed"


def resource_for(obj: Mapping[str, Any]) -> Resource:
    kind = str(obj["kind"])
    known = KIND_RESOURCES.get(kind)
    if known is None:
        raise PermanentError(f"the renderer produced an unknown kind {kind!r}")
    return rest.resource_of(obj, known.plural)


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


def phase_of(ready_groups: Sequence[tuple[int, int]]) -> str:
    """Running once every group has a ready replica (the app serves); Pending before."""
    if ready_groups and all(ready >= 1 for _, ready in ready_groups):
        return PHASE_RUNNING
    return PHASE_PENDING


class StatusWriter:
    """Builds an object's next status from its current one (conditions keep their times)."""

    def __init__(self, resource: Resource, obj: Mapping[str, Any], now: datetime.datetime) -> None:
        self.resource = resource
        self.obj = obj
        self.current: Mapping[str, Any] = obj.get("status") or {}
        self.generation = obj["metadata"].get("generation")
        self.now = now
        self.conditions: Sequence[Mapping[str, Any]] | None = self.current.get("conditions")
        self.fields: dict[str, Any] = {}

    def condition(self, type_: str, status: str, reason: str, message: str) -> None:
        self.conditions = set_condition(
            self.conditions, type_, status, reason, message, self.generation, self.now
        )

    def changed(self, type_: str) -> bool:
        """True when condition `type_` now has another status than the object had."""
        before = find_condition(self.current.get("conditions"), type_)
        after = find_condition(self.conditions, type_)
        return (before or {}).get("status") != (after or {}).get("status")

    def desired(self) -> dict[str, Any]:
        status = {**self.fields, "conditions": list(self.conditions or [])}
        if self.generation is not None:
            status["observedGeneration"] = self.generation
        return status

    def write(self, api_client: ApiClient) -> None:
        desired = self.desired()
        if all(self.current.get(k) == v for k, v in desired.items()):
            return
        meta = self.obj["metadata"]
        patch_status(api_client, self.resource, meta["namespace"], meta["name"], desired)


def record(
    api_client: ApiClient, obj: Mapping[str, Any], type_: str, reason: str, message: str
) -> None:
    """An Event about `obj`; best effort: a failure to record is logged, never raised."""
    try:
        record_event(api_client, obj, type_, reason, message, EVENT_COMPONENT)
    except Exception:
        log.warning("could not record event %s on %s", reason, obj["metadata"]["name"])


def await_model(api_client: ApiClient, obj: Mapping[str, Any], status: StatusWriter) -> Obj:
    """The Ready ArksModel `obj` serves; else record why in `status` and raise TemporaryError."""
    namespace = obj["metadata"]["namespace"]
    model_name = str(obj["spec"]["model"]["name"])
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
        status.write(api_client)
        if status.changed("ModelReady"):
            record(api_client, obj, "Normal", "WaitingForModel", message)
        raise TemporaryError(f"waiting for model: {message}", delay_s=MODEL_WAIT_S)
    status.condition("ModelReady", "True", "ModelReady", f"ArksModel {model_name} is Ready")
    return model


def render_failed(
    api_client: ApiClient, obj: Mapping[str, Any], status: StatusWriter, error: Exception
) -> None:
    """Record a spec that cannot be rendered: Rendered=False, phase Failed, a Warning."""
    status.condition("Rendered", "False", "Unsupported", str(error))
    status.fields["phase"] = PHASE_FAILED
    status.write(api_client)
    if status.changed("Rendered"):
        record(api_client, obj, "Warning", "RenderFailed", str(error))


REPLICAS = ("spec", "replicas")


def release_replicas(
    api_client: ApiClient, resource: Resource, workload: Mapping[str, Any], field_manager: str
) -> None:
    """Before applying a workload without `replicas` (an autoscaler owns the count now) whose
    live version has them from our apply, hand them over so they are not reset to 1 (see
    `arks.adapters.kube.apply.hand_over`)."""
    meta = workload["metadata"]
    live = rest.get_or_none(api_client, resource, meta["namespace"], meta["name"])
    if live is not None and applies(live, field_manager, REPLICAS):
        if hand_over(api_client, resource, live, REPLICAS, HANDOVER_FIELD_MANAGER):
            log.info("handed the replicas of %s/%s over", workload["kind"], meta["name"])


def apply_owned(
    api_client: ApiClient,
    owner: Mapping[str, Any],
    objects: Sequence[Mapping[str, Any]],
    field_manager: str,
) -> list[Obj]:
    """Server-side apply `objects` as children of `owner`; the live objects, in order.

    A workload applied without `replicas` gets them handed over first; one applied with them
    takes them back (the apply is forced), from the HPA too once autoscaling is off."""
    resources = [resource_for(obj) for obj in objects]  # unknown kinds fail before any write
    live = []
    for obj, resource in zip(objects, resources, strict=True):
        if obj["kind"] in WORKLOAD_KINDS and "replicas" not in (obj.get("spec") or {}):
            release_replicas(api_client, resource, obj, field_manager)
        live.append(server_side_apply(api_client, resource, set_owner(obj, owner), field_manager))
    return live


def availability(
    api_client: ApiClient,
    obj: Mapping[str, Any],
    status: StatusWriter,
    groups: Mapping[str, tuple[int, int]],
) -> None:
    """Available (and an Event on each change) from (desired, ready) per named workload."""
    summary = ", ".join(f"{name} {ready}/{desired}" for name, (desired, ready) in groups.items())
    unready = [name for name, (_, ready) in groups.items() if ready < 1]
    if unready:
        status.condition(
            "Available",
            "False",
            "NoReplicasReady",
            f"no ready replica of {', '.join(unready)} ({summary})",
        )
    else:
        every = all(ready >= desired for desired, ready in groups.values())
        reason = "AllReplicasReady" if every else "SomeReplicasReady"
        status.condition("Available", "True", reason, f"ready: {summary}")
    status.fields["phase"] = phase_of(list(groups.values()))
    if status.changed("Available"):
        available = not unready
        was = find_condition(status.current.get("conditions"), "Available")
        if available:
            record(api_client, obj, "Normal", "Available", f"serving; ready: {summary}")
        elif was is not None:
            record(api_client, obj, "Warning", "Unavailable", f"not serving; ready: {summary}")


Render = Callable[[Obj, Obj], list[dict[str, Any]]]
CheckArgs = Callable[[Obj], list[str]]


def report_args(
    api_client: ApiClient, obj: Mapping[str, Any], status: StatusWriter, problems: Sequence[str]
) -> None:
    """EngineArgsAccepted from the flag check: False (and a Warning) names the unknown flags."""
    if problems:
        message = "; ".join(problems)
        status.condition("EngineArgsAccepted", "False", "UnknownFlags", message)
        if status.changed("EngineArgsAccepted"):
            record(api_client, obj, "Warning", "UnknownEngineFlags", message)
    else:
        status.condition(
            "EngineArgsAccepted", "True", "Accepted", "every flag is in the engine's flag table"
        )


@dataclass
class Applied:
    """An application whose children were just applied: the object, its status in the making,
    the rendered children and their live versions (in the same order)."""

    obj: Obj
    status: StatusWriter
    objects: list[dict[str, Any]]
    live: list[Obj]


def render_and_apply(
    api_client: ApiClient,
    resource: Resource,
    key: Key,
    render: Render,
    field_manager: str,
    now: datetime.datetime | None,
    check_args: CheckArgs | None = None,
) -> Applied | None:
    """The steps every engine application shares: read it, wait for its model, render (a spec
    that cannot run is recorded and raised as PermanentError), apply the children it owns.
    None when it is gone or going: its children go with it through their owner references."""
    namespace, name = key
    obj = rest.get_or_none(api_client, resource, namespace, name)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return None
    status = StatusWriter(resource, obj, now or datetime.datetime.now(datetime.UTC))
    model = await_model(api_client, obj, status)
    try:
        objects = render(obj, model)
        for child in objects:
            resource_for(child)
    except PermanentError as e:
        render_failed(api_client, obj, status, e)
        raise
    if check_args is not None:
        report_args(api_client, obj, status, check_args(obj))
    status.condition("Rendered", "True", "Rendered", f"{len(objects)} objects applied")
    owner_label = (LABEL_APPLICATION, str(obj["metadata"]["name"]))
    autoscalers = {kind: KIND_RESOURCES[kind] for kind in AUTOSCALER_KINDS}
    replaced = prune_owned(api_client, obj, objects, autoscalers, owner_label)
    live = apply_owned(api_client, obj, objects, field_manager)
    for gone in replaced + prune_owned(api_client, obj, objects, KIND_RESOURCES, owner_label):
        record(api_client, obj, "Normal", "Pruned", f"deleted {gone}: no longer rendered")
    return Applied(obj, status, objects, live)


def watch_models(
    api_client: ApiClient,
    users: Informer,
    queue: WorkQueue,
    namespace: str | None = None,
    **informer_options: Any,
) -> Informer:
    """An informer on ArksModels that re-triggers the objects in `users` serving a changed model,
    so an application starts as soon as its model turns Ready (not started)."""
    models = Informer(api_client, MODELS, namespace, **informer_options)

    def model_changed(_kind: str, model: Obj) -> None:
        meta = model.get("metadata") or {}
        for key in users.keys():
            user = users.get(key)
            if (
                user is not None
                and key[0] == meta.get("namespace")
                and ((user.get("spec") or {}).get("model") or {}).get("name") == meta.get("name")
            ):
                queue.add(key)

    models.add_handler(model_changed)
    return models
