"""ArksApplication reconciler: model ready → render → apply children → report status.

Level-triggered: every call reads the application and its model afresh, applies the full
desired set of children (server-side apply, owned by the application so deletion cascades)
and derives the status from the workloads as they are now. An unchanged status is not
written, so reconciling a settled application makes no writes that change anything.
Transitions worth a look in `kubectl describe` (waiting for the model, a spec that cannot
be rendered, becoming available or unavailable) are recorded as Events.

The model wait, the status bookkeeping, the owned apply and the Events are in `workloads`,
shared with the ArksDisaggregatedApplication reconciler.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any

from kubernetes.client import ApiClient

from arks.adapters.kube.queue import Key, WorkQueue
from arks.adapters.kube.runner import Controller, Leadership
from arks.adapters.kube.watch import Informer, watch_owned
from arks.resources import (
    APPLICATIONS,
    DEPLOYMENTS,
    LEADERWORKERSETS,
    SERVICES,
)
from arks.wire import FIELD_MANAGER
from controller.reconcilers.workloads import (
    WORKLOAD_KINDS,
    availability,
    render_and_apply,
    watch_models,
    workload_replicas,
)
from controller.render.application import application_args_problems, render_application
from controller.render.workload import RenderDefaults

log = logging.getLogger(__name__)


APP_API_VERSION = "arks.ai/v1"
APP_KIND = "ArksApplication"


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
    done = render_and_apply(
        api_client,
        APPLICATIONS,
        key,
        lambda app, model: render_application(app, model, defaults=defaults),
        field_manager,
        now,
        check_args=application_args_problems,
    )
    if done is None:
        return
    app, status, objects, live = done.obj, done.status, done.objects, done.live
    # The first object is the engine workload (the replica counts); any other workload (the
    # Dynamo frontend) must have a ready replica too for the application to serve.
    groups = {
        f"{obj['kind']} {obj['metadata']['name']}": workload_replicas(current)
        for obj, current in zip(objects, live, strict=True)
        if obj["kind"] in WORKLOAD_KINDS
    }
    desired, ready = workload_replicas(live[0])
    availability(api_client, app, status, groups)
    status.fields.update(replicas=desired, readyReplicas=ready)
    status.write(api_client)


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
    deleted or edited child is repaired; a changed ArksModel re-triggers its applications.
    """
    work = queue if queue is not None else WorkQueue()
    options = dict(informer_options or {})
    informer = Informer(api_client, APPLICATIONS, namespace, **options)
    children = [DEPLOYMENTS, SERVICES, *([LEADERWORKERSETS] if watch_leaderworkersets else [])]
    owned = [
        watch_owned(api_client, child, work, APP_API_VERSION, APP_KIND, namespace, **options)
        for child in children
    ]
    owned.append(watch_models(api_client, informer, work, namespace, **options))

    def reconcile(key: Key) -> None:
        reconcile_application(api_client, key, field_manager=field_manager, defaults=defaults)

    return Controller(
        "arksapplication", informer, reconcile, workers, queue=work, owned=owned, leader=leader
    )
