"""The ArksDisaggregatedApplication reconciler against the Kubernetes API emulator, through the
real client: children with owner references, status per component, idempotence, repair by
the running controller, cascading deletion, Events."""

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
    DEPLOYMENTS,
    DISAGGREGATED_APPLICATIONS,
    EVENTS,
    LEADERWORKERSETS,
    MODELS,
    ROLEBINDINGS,
    ROLES,
    SERVICEACCOUNTS,
    SERVICES,
)
from controller.reconcilers.disaggregated import disaggregated_controller, reconcile_disaggregated
from tests.support.kube import FAST_INFORMERS, eventually, set_status
from tests.support.kube import get_object as get
from tests.support.objects import RENDER_DEFAULTS

MODEL = "deepseek-v3"
APP = "pd"

pytestmark = pytest.mark.timeout(60)


def create_model(api: ApiClient, ns: str, *, ready: bool = True) -> None:
    body = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksModel",
        "metadata": {"name": MODEL},
        "spec": {"source": {"pvc": {"claimName": "models-deepseek"}}},
    }
    rest.request(api, "POST", MODELS.path(ns), body=body)
    if ready:
        set_status(api, MODELS, ns, MODEL, phase="Ready", claimName="models-deepseek")


def group(size: int = 1, **extra: Any) -> dict[str, Any]:
    return {"replicas": 1, "size": size, "tensorParallelSize": 2 * size, **extra}


def create_dapp(api: ApiClient, ns: str, size: int = 1, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksDisaggregatedApplication",
        "metadata": {"name": APP},
        "spec": {
            "runtime": "sglang",
            "image": "lmsysorg/sglang:v0.4.6",
            "model": {"name": MODEL},
            "router": {"replicas": 2, "args": ["--policy", "cache_aware"]},
            "prefill": group(size),
            "decode": group(size, replicas=2),
            **spec,
        },
    }
    return rest.request(api, "POST", DISAGGREGATED_APPLICATIONS.path(ns), body=body)


def dapp_status(api: ApiClient, ns: str) -> dict[str, Any]:
    dapp = get(api, DISAGGREGATED_APPLICATIONS, ns, APP)
    assert dapp is not None
    return dict(dapp.get("status") or {})


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = find_condition(status.get("conditions"), type_)
    assert found is not None, f"no {type_} condition in {status}"
    return dict(found)


def events(api: ApiClient, ns: str) -> dict[str, dict[str, Any]]:
    """Events about the dapp by reason."""
    listed = rest.request(api, "GET", EVENTS.path(ns)).get("items") or []
    return {
        e["reason"]: e
        for e in listed
        if e["involvedObject"]["name"] == APP
        and e["involvedObject"]["kind"] == "ArksDisaggregatedApplication"
    }


CHILDREN = [
    (DEPLOYMENTS, f"{APP}-prefill"),
    (DEPLOYMENTS, f"{APP}-decode"),
    (DEPLOYMENTS, f"{APP}-router"),
    (SERVICES, APP),
    (SERVICEACCOUNTS, f"{APP}-router"),
    (ROLES, f"{APP}-router"),
    (ROLEBINDINGS, f"{APP}-router"),
]


def test_a_model_not_ready_leaves_it_pending_with_one_event(api: ApiClient, ns: str) -> None:
    create_model(api, ns, ready=False)
    create_dapp(api, ns)
    for _ in range(2):
        with pytest.raises(TemporaryError) as waiting:
            reconcile_disaggregated(api, (ns, APP))
    assert waiting.value.delay_s == 5
    status = dapp_status(api, ns)
    assert status["phase"] == "Pending"
    assert condition(status, "ModelReady")["reason"] == "ModelNotReady"
    assert get(api, DEPLOYMENTS, ns, f"{APP}-router") is None
    waiting_event = events(api, ns)["WaitingForModel"]
    assert waiting_event["type"] == "Normal" and waiting_event["count"] == 1, "only on transition"


def test_children_are_owned_and_the_status_follows_every_component(api: ApiClient, ns: str) -> None:
    create_model(api, ns)
    dapp = create_dapp(api, ns)
    reconcile_disaggregated(api, (ns, APP))

    for resource, name in CHILDREN:
        child = get(api, resource, ns, name)
        assert child is not None, (resource.plural, name)
        (ref,) = child["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == (
            "ArksDisaggregatedApplication",
            dapp["metadata"]["uid"],
            True,
        )
    router = get(api, DEPLOYMENTS, ns, f"{APP}-router")
    assert router is not None
    pod = router["spec"]["template"]["spec"]
    argv = pod["containers"][0]["command"]
    assert argv[argv.index("--service-discovery-namespace") + 1] == ns
    assert pod["serviceAccountName"] == f"{APP}-router"
    prefill = get(api, DEPLOYMENTS, ns, f"{APP}-prefill")
    assert prefill is not None
    prefill_pod = prefill["spec"]["template"]["spec"]
    assert prefill_pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "models-deepseek"
    assert "--disaggregation-mode" in prefill_pod["containers"][0]["command"]
    service = get(api, SERVICES, ns, APP)
    assert service is not None and service["spec"]["selector"]["arks.ai/component"] == "router"

    status = dapp_status(api, ns)
    assert status["observedGeneration"] == dapp["metadata"]["generation"]
    assert status["phase"] == "Pending"
    assert status["router"] == {"replicas": 2, "readyReplicas": 0}
    assert status["prefill"] == {"replicas": 1, "readyReplicas": 0}
    assert status["decode"] == {"replicas": 2, "readyReplicas": 0}
    assert condition(status, "Rendered")["status"] == "True"
    assert condition(status, "Available")["status"] == "False"

    # Engines ready but no router: nothing can be served yet.
    set_status(api, DEPLOYMENTS, ns, f"{APP}-prefill", replicas=1, readyReplicas=1)
    set_status(api, DEPLOYMENTS, ns, f"{APP}-decode", replicas=2, readyReplicas=1)
    reconcile_disaggregated(api, (ns, APP))
    status = dapp_status(api, ns)
    assert status["decode"] == {"replicas": 2, "readyReplicas": 1}
    available = condition(status, "Available")
    assert available["status"] == "False" and "router" in available["message"]
    assert status["phase"] == "Pending"
    assert "Available" not in events(api, ns)

    set_status(api, DEPLOYMENTS, ns, f"{APP}-router", replicas=2, readyReplicas=2)
    reconcile_disaggregated(api, (ns, APP))
    status = dapp_status(api, ns)
    assert status["phase"] == "Running"
    assert status["router"] == {"replicas": 2, "readyReplicas": 2}
    available = condition(status, "Available")
    assert (available["status"], available["reason"]) == ("True", "SomeReplicasReady")
    assert events(api, ns)["Available"]["type"] == "Normal"

    set_status(api, DEPLOYMENTS, ns, f"{APP}-router", replicas=2, readyReplicas=0)
    reconcile_disaggregated(api, (ns, APP))
    assert dapp_status(api, ns)["phase"] == "Pending"
    assert events(api, ns)["Unavailable"]["type"] == "Warning"


def test_reconciling_twice_changes_nothing(api: ApiClient, ns: str) -> None:
    create_model(api, ns)
    create_dapp(api, ns)
    reconcile_disaggregated(api, (ns, APP))

    def versions() -> list[str]:
        objs = [get(api, r, ns, n) for r, n in [*CHILDREN, (DISAGGREGATED_APPLICATIONS, APP)]]
        return [str(o["metadata"]["resourceVersion"]) for o in objs if o is not None]

    before = versions()
    assert len(before) == len(CHILDREN) + 1
    reconcile_disaggregated(api, (ns, APP))
    assert versions() == before


def test_multi_node_groups_are_leaderworkersets(api: ApiClient, ns: str) -> None:
    create_model(api, ns)
    create_dapp(api, ns, size=2)
    reconcile_disaggregated(api, (ns, APP))
    for mode in ("prefill", "decode"):
        lws = get(api, LEADERWORKERSETS, ns, f"{APP}-{mode}")
        assert lws is not None and lws["spec"]["leaderWorkerTemplate"]["size"] == 2
        assert get(api, DEPLOYMENTS, ns, f"{APP}-{mode}") is None
    set_status(api, LEADERWORKERSETS, ns, f"{APP}-prefill", replicas=1, readyReplicas=1)
    set_status(api, LEADERWORKERSETS, ns, f"{APP}-decode", replicas=1, readyReplicas=1)
    set_status(api, DEPLOYMENTS, ns, f"{APP}-router", replicas=2, readyReplicas=1)
    reconcile_disaggregated(api, (ns, APP))
    status = dapp_status(api, ns)
    assert status["phase"] == "Running"
    assert status["prefill"] == {"replicas": 1, "readyReplicas": 1}


def test_dynamo_needs_no_router_rbac(api: ApiClient, ns: str) -> None:
    create_model(api, ns)
    create_dapp(
        api,
        ns,
        runtime="dynamo",
        image="nvcr.io/nvidia/ai-dynamo/vllm-runtime:1.0.0",
        router={"replicas": 1, "args": ["--router-mode", "kv"]},
    )
    reconcile_disaggregated(api, (ns, APP), defaults=RENDER_DEFAULTS)
    router = get(api, DEPLOYMENTS, ns, f"{APP}-router")
    assert router is not None
    container = router["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["python3", "-m", "dynamo.frontend"]
    assert get(api, ROLES, ns, f"{APP}-router") is None
    assert get(api, SERVICEACCOUNTS, ns, f"{APP}-router") is None
    decode = get(api, DEPLOYMENTS, ns, f"{APP}-decode")
    assert decode is not None
    argv = decode["spec"]["template"]["spec"]["containers"][0]["command"]
    assert argv[:3] == ["python3", "-m", "dynamo.vllm"]
    assert argv[argv.index("--disaggregation-mode") + 1] == "decode"


def test_an_unsupported_spec_fails_with_a_warning(api: ApiClient, ns: str) -> None:
    create_model(api, ns)
    create_dapp(api, ns, runtime="vllm")
    with pytest.raises(PermanentError):
        reconcile_disaggregated(api, (ns, APP))
    status = dapp_status(api, ns)
    assert status["phase"] == "Failed"
    rendered = condition(status, "Rendered")
    assert rendered["status"] == "False" and "vllm" in rendered["message"]
    assert events(api, ns)["RenderFailed"]["type"] == "Warning"
    assert get(api, DEPLOYMENTS, ns, f"{APP}-router") is None


def test_deleting_it_cascades_to_every_child(api: ApiClient, ns: str) -> None:
    create_model(api, ns)
    create_dapp(api, ns)
    reconcile_disaggregated(api, (ns, APP))
    rest.request(api, "DELETE", DISAGGREGATED_APPLICATIONS.path(ns, APP))
    for resource, name in CHILDREN:
        eventually(lambda r=resource, n=name: get(api, r, ns, n) is None)
    reconcile_disaggregated(api, (ns, APP))  # a gone object is nothing to do
    assert get(api, DEPLOYMENTS, ns, f"{APP}-router") is None


def test_the_controller_creates_and_repairs_children(api: ApiClient, ns: str) -> None:
    create_model(api, ns)
    controller = disaggregated_controller(
        api, ns, workers=2, queue=WorkQueue(max_delay_s=0.5), informer_options=FAST_INFORMERS
    )
    controller.start()
    try:
        create_dapp(api, ns)
        eventually(lambda: get(api, DEPLOYMENTS, ns, f"{APP}-router"))
        eventually(lambda: dapp_status(api, ns).get("phase") == "Pending")
        for resource, name in ((DEPLOYMENTS, f"{APP}-decode"), (ROLES, f"{APP}-router")):
            rest.request(api, "DELETE", resource.path(ns, name))
            eventually(lambda r=resource, n=name: get(api, r, ns, n))
        set_status(api, DEPLOYMENTS, ns, f"{APP}-prefill", replicas=1, readyReplicas=1)
        set_status(api, DEPLOYMENTS, ns, f"{APP}-decode", replicas=2, readyReplicas=2)
        set_status(api, DEPLOYMENTS, ns, f"{APP}-router", replicas=2, readyReplicas=2)
        eventually(lambda: dapp_status(api, ns).get("phase") == "Running")
    finally:
        started = time.monotonic()
        controller.stop()
    assert time.monotonic() - started < 5


def test_switching_to_dynamo_prunes_the_sglang_router_rbac(api: ApiClient, ns: str) -> None:
    """SGLang's router watches pods through its own ServiceAccount, Role and RoleBinding;
    Dynamo's frontend needs none, so they go (a stale Role would keep granting pod reads)."""
    create_model(api, ns)
    create_dapp(api, ns)
    reconcile_disaggregated(api, (ns, APP), defaults=RENDER_DEFAULTS)
    for resource in (ROLES, ROLEBINDINGS, SERVICEACCOUNTS):
        assert get(api, resource, ns, f"{APP}-router") is not None

    dapp = get(api, DISAGGREGATED_APPLICATIONS, ns, APP)
    assert dapp is not None
    dapp["spec"].update(
        runtime="dynamo",
        image="nvcr.io/nvidia/ai-dynamo/vllm-runtime:1.0.0",
        router={"replicas": 1, "args": ["--router-mode", "kv"]},
    )
    rest.request(api, "PUT", DISAGGREGATED_APPLICATIONS.path(ns, APP), body=dapp)
    reconcile_disaggregated(api, (ns, APP), defaults=RENDER_DEFAULTS)

    for resource in (ROLES, ROLEBINDINGS, SERVICEACCOUNTS):
        assert get(api, resource, ns, f"{APP}-router") is None
    assert get(api, DEPLOYMENTS, ns, f"{APP}-router") is not None
    assert "Pruned" in events(api, ns)
