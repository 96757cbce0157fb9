"""Render an ArksApplication into the objects that run it: pure, CR in, objects out.

size == 1 -> Deployment; size > 1 -> LeaderWorkerSet (one group of `size` pods per
replica). Plus a Service over the pods that serve HTTP, and, when `spec.autoscaling` is set, an
autoscaling/v2 HPA or a KEDA ScaledObject (`controller.render.autoscaling`). Owner references are left to the reconciler.

Runtime `dynamo` adds a frontend Deployment (`<name>-frontend`) that serves the OpenAI API
and sits behind the Service; the engine workload then holds Dynamo workers, which find the
frontend through Dynamo's discovery (etcd), not through Kubernetes.

The first object is always the engine workload, whose replicas are the application's; any
other Deployment or LeaderWorkerSet in the list must be ready too for the application to
serve (the reconciler relies on this order).

The building blocks (`EngineGroup`, `engine_workload`, `router_deployment`, `service`) are in
`controller.render.workload`, shared with the ArksDisaggregatedApplication renderer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controller.render.autoscaling import autoscaler
from controller.render.engines import args_problems, engine_for, router_command
from controller.render.workload import (
    EngineGroup,
    RenderDefaults,
    RouterGroup,
    base_labels,
    check_service_name,
    engine_workload,
    group_selector,
    object_meta,
    router_deployment,
    selector_of,
    service,
)


def render_application(
    app: Mapping[str, Any],
    model: Mapping[str, Any],
    *,
    defaults: RenderDefaults | None = None,
) -> list[dict[str, Any]]:
    """The desired objects for ArksApplication `app` serving ArksModel `model`.

    Engines mount the model as `controller.render.model.model_volume` says: the model's
    claim, or its node-local copy (and then run on the cache's nodes).
    """
    d = defaults or RenderDefaults()
    spec = app["spec"]
    name, namespace = app["metadata"]["name"], app["metadata"]["namespace"]
    check_service_name("ArksApplication", name)
    engine = engine_for(spec)
    frontend = engine.frontend
    group = EngineGroup(name, namespace, name, spec, component="worker" if frontend else "")
    workload = engine_workload(group, model, d)
    objects = [workload]
    if frontend is None:
        selector, port = group_selector(group), engine.default_port
    else:
        router = RouterGroup(
            name=f"{name}-frontend",
            namespace=namespace,
            owner=name,
            spec=spec,
            router=frontend,
            command=router_command(frontend),
            component="frontend",
        )
        objects.append(router_deployment(router, model, d))
        selector, port = selector_of(name, "frontend"), frontend.default_port
    objects.append(service(name, namespace, base_labels(name, spec), selector, port, spec))
    if spec.get("autoscaling"):
        meta = object_meta(name, namespace, base_labels(name, spec), spec)
        objects.append(autoscaler(spec, meta, workload, d.prometheus_url))
    return objects


def application_args_problems(app: Mapping[str, Any]) -> list[str]:
    """Flags in `spec.runtimeCommonArgs` the engine's flag table does not list (reported in the
    status; the workload is rendered anyway: a newer engine may know them)."""
    return args_problems(app["spec"])
