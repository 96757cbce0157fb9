"""Render an ArksDisaggregatedApplication into the objects that run it: pure, CR in, objects out.

- `<name>-prefill`, `<name>-decode`: one engine group each, in the engine's prefill or decode
  mode; a Deployment for size 1, a LeaderWorkerSet for size > 1 (the building blocks of
  `controller.render.workload`, shared with ArksApplication, so multi-node flags, GPUs, probes
  and the model mount are the same).
- `<name>-router`: a Deployment of the runtime's router. SGLang: sglang-router in PD mode,
  finding the groups' serving pods (leaders when size > 1) through the Kubernetes API by
  label selectors, and each prefill pod's bootstrap port through its annotation. Dynamo: the
  frontend, which pairs the prefill and decode workers it discovers in its Dynamo namespace.
- `<name>`: the public Service, over the router pods.
- SGLang only: the router's ServiceAccount, a Role allowing get/list/watch on pods in the
  namespace, and the RoleBinding between them.

The groups need no Services of their own: the SGLang router and the decode instances reach
prefill pods by pod IP (discovered), Dynamo workers are reached through Dynamo's request
plane, and a LeaderWorkerSet makes its own headless Service for `LWS_LEADER_ADDRESS`.
Owner references are left to the reconciler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controller.render.engines import (
    DisaggregationMode,
    UnsupportedApplication,
    args_problems,
    engine_for,
    router_args_problems,
    router_command,
    shared_pd_flags,
)
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

COMPONENT_ROUTER = "router"
MODES: tuple[DisaggregationMode, ...] = ("prefill", "decode")
COMPONENTS = (COMPONENT_ROUTER, *MODES)
DEFAULT_RUNTIME = "sglang"  # the CRD's default
RBAC_API_VERSION = "rbac.authorization.k8s.io/v1"

# Fields of a prefill/decode group that an engine group takes as they are.
_GROUP_FIELDS = (
    "replicas",
    "size",
    "tensorParallelSize",
    "pipelineParallelSize",
    "instanceSpec",
    "runtimeCommonArgs",
)


def _top_spec(dapp: Mapping[str, Any]) -> dict[str, Any]:
    spec = dict(dapp["spec"])
    spec["runtime"] = spec.get("runtime") or DEFAULT_RUNTIME
    return spec


def group_spec(dapp: Mapping[str, Any], mode: DisaggregationMode) -> dict[str, Any]:
    """The ArksApplication-shaped spec of the prefill or decode group of `dapp`."""
    top = _top_spec(dapp)
    group = top.get(mode) or {}
    spec: dict[str, Any] = {
        k: top[k] for k in ("runtime", "image", "model", "servedModelName") if k in top
    }
    spec.update({k: group[k] for k in _GROUP_FIELDS if k in group})
    return spec


def _rbac(
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    spec: Mapping[str, Any],
    service_account: str,
    own_account: bool,
) -> list[dict[str, Any]]:
    """The router's right to watch pods of its namespace (and its account, unless the user's)."""
    objects: list[dict[str, Any]] = []
    if own_account:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": object_meta(service_account, namespace, labels, spec),
            }
        )
    objects.append(
        {
            "apiVersion": RBAC_API_VERSION,
            "kind": "Role",
            "metadata": object_meta(name, namespace, labels, spec),
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
            ],
        }
    )
    objects.append(
        {
            "apiVersion": RBAC_API_VERSION,
            "kind": "RoleBinding",
            "metadata": object_meta(name, namespace, labels, spec),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [
                {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
            ],
        }
    )
    return objects


def render_disaggregated(
    dapp: Mapping[str, Any],
    model: Mapping[str, Any],
    *,
    defaults: RenderDefaults | None = None,
) -> list[dict[str, Any]]:
    """The desired objects for ArksDisaggregatedApplication `dapp` serving ArksModel `model`.

    Order: the prefill and decode workloads, the router Deployment, the public Service, then
    the router's RBAC objects (SGLang). Every workload carries the `arks.ai/component` label
    (prefill, decode, router) the status is reported by.
    """
    d = defaults or RenderDefaults()
    name, namespace = dapp["metadata"]["name"], dapp["metadata"]["namespace"]
    check_service_name("ArksDisaggregatedApplication", name)
    top = _top_spec(dapp)
    engine = engine_for(top)
    router_table = engine.pd_router
    if engine.disaggregation is None or router_table is None:
        raise UnsupportedApplication(f"runtime {engine.runtime} has no disaggregated mode")

    specs = {mode: group_spec(dapp, mode) for mode in MODES}
    pd_flags = shared_pd_flags(engine, specs["prefill"], specs["decode"])
    groups = {
        mode: EngineGroup(
            f"{name}-{mode}",
            namespace,
            name,
            specs[mode],
            component=mode,
            disaggregation=mode,
            pd_flags=pd_flags,
        )
        for mode in MODES
    }
    workloads = [engine_workload(g, model, d) for g in groups.values()]

    router: Mapping[str, Any] = top.get("router") or {}
    instance: Mapping[str, Any] = router.get("instanceSpec") or {}
    router_name = f"{name}-{COMPONENT_ROUTER}"
    router_labels = base_labels(name, top, COMPONENT_ROUTER)
    rbac: list[dict[str, Any]] = []
    account = ""
    if router_table.watches_pods:
        account = str(instance.get("serviceAccountName") or router_name)
        own = not instance.get("serviceAccountName")
        rbac = _rbac(router_name, namespace, router_labels, top, account, own)
    command = router_command(
        router_table,
        namespace=namespace,
        engine=engine,
        prefill_selector=group_selector(groups["prefill"]),
        decode_selector=group_selector(groups["decode"]),
        extra_args=[str(a) for a in router.get("args") or ()],
    )
    router_group = RouterGroup(
        name=router_name,
        namespace=namespace,
        owner=name,
        spec=top,
        router=router_table,
        command=command,
        replicas=int(router.get("replicas", 1)),
        image=str(router.get("image") or ""),
        instance=instance,
        component=COMPONENT_ROUTER,
        service_account=account,
    )
    public = service(
        name,
        namespace,
        base_labels(name, top),
        selector_of(name, COMPONENT_ROUTER),
        router_table.default_port,
        top,
    )
    return [
        *workloads,
        router_deployment(router_group, model, d),
        public,
        *rbac,
    ]


def disaggregated_args_problems(dapp: Mapping[str, Any]) -> list[str]:
    """Flags in the groups' `runtimeCommonArgs` and the router's `args` their programs' flag
    tables do not list (reported in the status; rendered anyway)."""
    problems = [
        p
        for mode in MODES
        for p in args_problems(group_spec(dapp, mode), f"{mode}.runtimeCommonArgs")
    ]
    router_table = engine_for(_top_spec(dapp)).pd_router
    args = (_top_spec(dapp).get("router") or {}).get("args") or ()
    if router_table is not None:
        problems += router_args_problems(router_table, args, "router.args")
    return problems
