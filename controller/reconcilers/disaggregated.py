"""ArksDisaggregatedApplication reconciler: model ready → render → apply children → status.

The same level-triggered steps as the ArksApplication reconciler, sharing its model wait,
status bookkeeping, owned apply and Events. The status reports `router`, `prefill` and
`decode` replicas from the workload of each component; the application is Available (phase
Running) once every component has a ready replica, since a request needs all three.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from kubernetes.client import ApiClient

from arks.adapters.kube.queue import Key, WorkQueue
from arks.adapters.kube.runner import Controller, Leadership
from arks.adapters.kube.watch import Informer, watch_owned
from arks.resources import (
    DEPLOYMENTS,
    DISAGGREGATED_APPLICATIONS,
    LEADERWORKERSETS,
    ROLEBINDINGS,
    ROLES,
    SERVICEACCOUNTS,
    SERVICES,
)
from arks.wire import FIELD_MANAGER, LABEL_COMPONENT, LABEL_MANAGED_BY
from controller.reconcilers.workloads import (
    WORKLOAD_KINDS,
    availability,
    render_and_apply,
    watch_models,
    workload_replicas,
)
from controller.render.disaggregated import (
    COMPONENTS,
    disaggregated_args_problems,
    render_disaggregated,
)
from controller.render.workload import RenderDefaults

DAPP_API_VERSION = "arks.ai/v1"
DAPP_KIND = "ArksDisaggregatedApplication"


def reconcile_disaggregated(
    api_client: ApiClient,
    key: Key,
    *,
    field_manager: str = FIELD_MANAGER,
    defaults: RenderDefaults | None = None,
    now: datetime.datetime | None = None,
) -> None:
    """Bring ArksDisaggregatedApplication `key` = (namespace, name) to the desired state.

    Raises TemporaryError while the model is not Ready, and the renderer's PermanentError for
    a spec that cannot be run (after recording it in the status).
    """
    done = render_and_apply(
        api_client,
        DISAGGREGATED_APPLICATIONS,
        key,
        lambda dapp, model: render_disaggregated(dapp, model, defaults=defaults),
        field_manager,
        now,
        check_args=disaggregated_args_problems,
    )
    if done is None:
        return
    dapp, status, objects, live = done.obj, done.status, done.objects, done.live
    by_component = {
        obj["metadata"]["labels"][LABEL_COMPONENT]: workload_replicas(current)
        for obj, current in zip(objects, live, strict=True)
        if obj["kind"] in WORKLOAD_KINDS
    }
    groups = {component: by_component.get(component, (0, 0)) for component in COMPONENTS}
    availability(api_client, dapp, status, groups)
    for component, (desired, ready) in groups.items():
        status.fields[component] = {"replicas": desired, "readyReplicas": ready}
    status.write(api_client)


def disaggregated_controller(
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
    """A (not started) controller for ArksDisaggregatedApplications and their children.

    Changes to owned Deployments, Services and the router's ServiceAccounts, Roles and
    RoleBindings (and LeaderWorkerSets when `watch_leaderworkersets`, i.e. the LWS CRD is
    installed) re-trigger the owner, so a deleted or edited child is repaired. The RBAC kinds
    are watched only where labelled as managed by Arks, to keep those watches small. A changed
    ArksModel re-triggers its applications.
    """
    work = queue if queue is not None else WorkQueue()
    options = dict(informer_options or {})
    informer = Informer(api_client, DISAGGREGATED_APPLICATIONS, namespace, **options)
    children = [DEPLOYMENTS, SERVICES, *([LEADERWORKERSETS] if watch_leaderworkersets else [])]
    ours = {**options, "label_selector": f"{LABEL_MANAGED_BY}=arks"}
    owned = [
        watch_owned(api_client, child, work, DAPP_API_VERSION, DAPP_KIND, namespace, **options)
        for child in children
    ] + [
        watch_owned(api_client, child, work, DAPP_API_VERSION, DAPP_KIND, namespace, **ours)
        for child in (SERVICEACCOUNTS, ROLES, ROLEBINDINGS)
    ]
    owned.append(watch_models(api_client, informer, work, namespace, **options))

    def reconcile(key: Key) -> None:
        reconcile_disaggregated(api_client, key, field_manager=field_manager, defaults=defaults)

    return Controller(
        "arksdisaggregatedapplication",
        informer,
        reconcile,
        workers,
        queue=work,
        owned=owned,
        leader=leader,
    )
