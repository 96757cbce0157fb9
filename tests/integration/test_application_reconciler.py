"""The ArksApplication reconciler against the Kubernetes API emulator, through the real client."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from arks.adapters.kube import rest
from arks.adapters.kube.apply import applies
from arks.adapters.kube.conditions import find_condition
from arks.adapters.kube.errors import PermanentError, TemporaryError
from arks.adapters.kube.queue import WorkQueue
from arks.resources import (
    APPLICATIONS,
    DEPLOYMENTS,
    EVENTS,
    HPAS,
    LEADERWORKERSETS,
    MODELS,
    SCALEDOBJECTS,
    SERVICES,
)
from arks.wire import FIELD_MANAGER
from controller.reconcilers.application import application_controller, reconcile_application
from controller.render import RenderDefaults
from tests.support.kube import FAST_INFORMERS, RunningKubeEmulator, eventually, set_status
from tests.support.kube import get_object as get
from tests.support.objects import RENDER_DEFAULTS

MODEL = "qwen2-5-7b-instruct"

pytestmark = pytest.mark.timeout(60)


def create_model(api: ApiClient, ns: str, *, ready: bool, claim: str | None = None) -> None:
    body = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksModel",
        "metadata": {"name": MODEL},
        "spec": (
            {"source": {"pvc": {"claimName": claim}}}  # adopted: engines mount that claim
            if claim
            else {
                "source": {"huggingface": {"repo": "Qwen/Qwen2.5-7B-Instruct"}},
                "storage": {"size": "40Gi"},
            }
        ),
    }
    rest.request(api, "POST", MODELS.path(ns), body=body)
    if ready:
        set_status(api, MODELS, ns, MODEL, phase="Ready", claimName=claim or MODEL)


def create_app(api: ApiClient, ns: str, name: str = "chat", **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksApplication",
        "metadata": {"name": name},
        "spec": {
            "runtime": "vllm",
            "image": "vllm/vllm-openai:v0.8.5",
            "model": {"name": MODEL},
            "replicas": 1,
            **spec,
        },
    }
    return rest.request(api, "POST", APPLICATIONS.path(ns), body=body)


def app_status(api: ApiClient, ns: str, name: str = "chat") -> dict[str, Any]:
    app = get(api, APPLICATIONS, ns, name)
    assert app is not None
    return dict(app.get("status") or {})


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = find_condition(status.get("conditions"), type_)
    assert found is not None, f"no {type_} condition in {status}"
    return dict(found)


def test_model_not_ready_leaves_the_app_pending_without_children(api: ApiClient, ns: str) -> None:
    create_app(api, ns)
    with pytest.raises(TemporaryError) as missing:
        reconcile_application(api, (ns, "chat"))
    assert missing.value.delay_s == 5
    status = app_status(api, ns)
    assert status["phase"] == "Pending"
    assert condition(status, "ModelReady")["status"] == "False"
    assert condition(status, "ModelReady")["reason"] == "ModelNotReady"

    create_model(api, ns, ready=False)
    with pytest.raises(TemporaryError):
        reconcile_application(api, (ns, "chat"))
    assert app_status(api, ns)["phase"] == "Pending"
    assert get(api, DEPLOYMENTS, ns, "chat") is None
    assert get(api, SERVICES, ns, "chat") is None


def test_ready_model_renders_owned_children_and_status_follows_the_deployment(
    api: ApiClient, ns: str
) -> None:
    create_model(api, ns, ready=True, claim="models-qwen")
    app = create_app(api, ns)
    reconcile_application(api, (ns, "chat"))

    deployment = get(api, DEPLOYMENTS, ns, "chat")
    service = get(api, SERVICES, ns, "chat")
    assert deployment is not None and service is not None
    for child in (deployment, service):
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["uid"] == app["metadata"]["uid"] and ref["controller"] is True
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"][:3] == ["vllm", "serve", "/models"]
    claims = [
        v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if v["name"] == "model"
    ]
    assert claims == ["models-qwen"]

    status = app_status(api, ns)
    assert status["phase"] == "Pending"
    assert (status["replicas"], status["readyReplicas"]) == (1, 0)
    assert status["observedGeneration"] == app["metadata"]["generation"]
    assert condition(status, "ModelReady")["status"] == "True"
    assert condition(status, "Available")["status"] == "False"
    model_ready_since = condition(status, "ModelReady")["lastTransitionTime"]

    set_status(api, DEPLOYMENTS, ns, "chat", replicas=1, readyReplicas=1)
    reconcile_application(api, (ns, "chat"))
    status = app_status(api, ns)
    assert status["phase"] == "Running"
    assert status["readyReplicas"] == 1
    assert condition(status, "Available")["status"] == "True"
    assert condition(status, "ModelReady")["lastTransitionTime"] == model_ready_since


def test_partially_ready_is_running(api: ApiClient, ns: str) -> None:
    create_model(api, ns, ready=True)
    create_app(api, ns, replicas=3)
    reconcile_application(api, (ns, "chat"))
    set_status(api, DEPLOYMENTS, ns, "chat", replicas=3, readyReplicas=1)
    reconcile_application(api, (ns, "chat"))
    status = app_status(api, ns)
    assert (status["phase"], status["replicas"], status["readyReplicas"]) == ("Running", 3, 1)
    deployment = get(api, DEPLOYMENTS, ns, "chat")
    assert deployment is not None
    # Downloaded: the claim is named after the model.
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert volumes[0]["persistentVolumeClaim"]["claimName"] == MODEL


def test_reconciling_twice_changes_nothing(api: ApiClient, ns: str) -> None:
    create_model(api, ns, ready=True)
    create_app(api, ns)
    reconcile_application(api, (ns, "chat"))

    def versions() -> list[str]:
        objs = [get(api, r, ns, "chat") for r in (DEPLOYMENTS, SERVICES, APPLICATIONS)]
        return [str(o["metadata"]["resourceVersion"]) for o in objs if o is not None]

    before = versions()
    reconcile_application(api, (ns, "chat"))
    assert len(before) == 3
    assert versions() == before


def test_a_deleted_deployment_is_recreated(api: ApiClient, ns: str) -> None:
    create_model(api, ns, ready=True)
    create_app(api, ns)
    reconcile_application(api, (ns, "chat"))
    rest.request(api, "DELETE", DEPLOYMENTS.path(ns, "chat"))
    assert get(api, DEPLOYMENTS, ns, "chat") is None
    reconcile_application(api, (ns, "chat"))
    assert get(api, DEPLOYMENTS, ns, "chat") is not None


def test_deleting_the_app_cascades_to_its_children(api: ApiClient, ns: str) -> None:
    create_model(api, ns, ready=True)
    create_app(api, ns)
    reconcile_application(api, (ns, "chat"))
    rest.request(api, "DELETE", APPLICATIONS.path(ns, "chat"))
    eventually(lambda: get(api, DEPLOYMENTS, ns, "chat") is None)
    eventually(lambda: get(api, SERVICES, ns, "chat") is None)
    reconcile_application(api, (ns, "chat"))  # a gone app is nothing to do
    assert get(api, DEPLOYMENTS, ns, "chat") is None


def test_size_two_renders_a_leaderworkerset(api: ApiClient, ns: str) -> None:
    create_model(api, ns, ready=True)
    create_app(api, ns, size=2, tensorParallelSize=2)
    reconcile_application(api, (ns, "chat"))
    lws = get(api, LEADERWORKERSETS, ns, "chat")
    assert lws is not None
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    assert get(api, DEPLOYMENTS, ns, "chat") is None
    assert get(api, SERVICES, ns, "chat") is not None

    set_status(api, LEADERWORKERSETS, ns, "chat", replicas=1, readyReplicas=1)
    reconcile_application(api, (ns, "chat"))
    assert app_status(api, ns)["phase"] == "Running"


def _update_spec(api: ApiClient, ns: str, name: str = "chat", **changes: Any) -> None:
    """Change the app's spec as `kubectl edit` would (None removes a field), again on a 409:
    a running controller's status write may land between the read and the write."""
    for _ in range(10):
        app = get(api, APPLICATIONS, ns, name)
        assert app is not None
        for key, value in changes.items():
            if value is None:
                app["spec"].pop(key, None)
            else:
                app["spec"][key] = value
        try:
            rest.request(api, "PUT", APPLICATIONS.path(ns, name), body=app)
            return
        except ApiException as e:
            if e.status != 409:
                raise
    raise AssertionError(f"{name}: still conflicting after 10 tries")


def test_autoscaling_turned_off_deletes_the_hpa(api: ApiClient, ns: str) -> None:
    """Left behind, the HPA would fight the controller over `replicas`."""
    create_model(api, ns, ready=True)
    create_app(api, ns, autoscaling={"minReplicas": 1, "maxReplicas": 3})
    reconcile_application(api, (ns, "chat"))
    assert get(api, HPAS, ns, "chat") is not None

    _update_spec(api, ns, autoscaling=None)
    reconcile_application(api, (ns, "chat"))

    assert get(api, HPAS, ns, "chat") is None
    assert get(api, DEPLOYMENTS, ns, "chat") is not None
    events = rest.request(api, "GET", EVENTS.path(ns))["items"]
    assert any(
        e["reason"] == "Pruned" and "HorizontalPodAutoscaler/chat" in e["message"] for e in events
    )


def test_switching_the_autoscaling_provider_prunes_the_other_autoscaler(
    kube: RunningKubeEmulator, api: ApiClient, ns: str
) -> None:
    """hpa -> keda: our HPA and KEDA's would both own the replicas; keda -> hpa likewise. The
    old one goes first: KEDA's admission webhook refuses a ScaledObject for a workload that
    another HPA scales ("is already managed by the hpa"), which the emulator does not do, so
    the order of the requests is checked."""
    defaults = RenderDefaults(prometheus_url="http://prom.obs.svc:9090")
    scaling = {
        "provider": "hpa",
        "minReplicas": 1,
        "maxReplicas": 3,
        "metrics": [{"type": "waitingRequests", "target": 5}],
    }
    create_model(api, ns, ready=True)
    create_app(api, ns, autoscaling=scaling)
    reconcile_application(api, (ns, "chat"), defaults=defaults)
    assert get(api, HPAS, ns, "chat") is not None
    assert get(api, SCALEDOBJECTS, ns, "chat") is None

    _update_spec(api, ns, autoscaling={**scaling, "provider": "keda"})
    start = len(kube.emulator.audit)
    reconcile_application(api, (ns, "chat"), defaults=defaults)
    writes = [(verb, res) for _, verb, _, res, ns_, _ in kube.emulator.audit[start:] if ns_ == ns]
    assert writes.index(("delete", "horizontalpodautoscalers")) < writes.index(
        ("patch", "scaledobjects")
    )
    assert get(api, HPAS, ns, "chat") is None
    scaled = get(api, SCALEDOBJECTS, ns, "chat")
    assert scaled is not None
    assert scaled["metadata"]["ownerReferences"][0]["kind"] == "ArksApplication"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["metadata"]["serverAddress"] == "http://prom.obs.svc:9090"
    assert not applies(get(api, DEPLOYMENTS, ns, "chat"), FIELD_MANAGER, ("spec", "replicas"))

    _update_spec(api, ns, autoscaling={**scaling, "provider": "hpa"})
    reconcile_application(api, (ns, "chat"), defaults=defaults)
    assert get(api, SCALEDOBJECTS, ns, "chat") is None
    assert get(api, HPAS, ns, "chat") is not None
    events = rest.request(api, "GET", EVENTS.path(ns))["items"]
    pruned = [e["message"] for e in events if e["reason"] == "Pruned"]
    assert any("HorizontalPodAutoscaler/chat" in m for m in pruned)
    assert any("ScaledObject/chat" in m for m in pruned)


def test_growing_to_two_nodes_deletes_the_one_node_deployment(api: ApiClient, ns: str) -> None:
    """size 1 -> 2: the LeaderWorkerSet replaces the Deployment, which would hold its GPUs."""
    create_model(api, ns, ready=True)
    create_app(api, ns)
    create_app(api, ns, "other")  # another app's children stay
    reconcile_application(api, (ns, "chat"))
    reconcile_application(api, (ns, "other"))
    assert get(api, DEPLOYMENTS, ns, "chat") is not None

    _update_spec(api, ns, size=2, tensorParallelSize=2)
    reconcile_application(api, (ns, "chat"))

    assert get(api, DEPLOYMENTS, ns, "chat") is None
    assert get(api, LEADERWORKERSETS, ns, "chat") is not None
    assert get(api, SERVICES, ns, "chat") is not None  # still rendered: kept
    assert get(api, DEPLOYMENTS, ns, "other") is not None


def test_an_unsupported_spec_fails_with_a_rendered_condition(api: ApiClient, ns: str) -> None:
    create_model(api, ns, ready=True)
    create_app(api, ns, runtime="nonesuch")
    with pytest.raises(PermanentError):
        reconcile_application(api, (ns, "chat"))
    status = app_status(api, ns)
    assert status["phase"] == "Failed"
    rendered = condition(status, "Rendered")
    assert rendered["status"] == "False" and "nonesuch" in rendered["message"]
    assert get(api, DEPLOYMENTS, ns, "chat") is None


def test_the_controller_creates_and_repairs_children(api: ApiClient, ns: str) -> None:
    create_model(api, ns, ready=True)
    controller = application_controller(
        api, ns, workers=2, queue=WorkQueue(max_delay_s=0.5), informer_options=FAST_INFORMERS
    )
    controller.start()
    try:
        create_app(api, ns)
        eventually(lambda: get(api, DEPLOYMENTS, ns, "chat"))
        eventually(lambda: app_status(api, ns).get("phase") == "Pending")
        rest.request(api, "DELETE", DEPLOYMENTS.path(ns, "chat"))
        eventually(lambda: get(api, DEPLOYMENTS, ns, "chat"))
    finally:
        started = time.monotonic()
        controller.stop()
    assert time.monotonic() - started < 5


def test_dynamo_is_available_only_once_workers_and_frontend_are_ready(
    api: ApiClient, ns: str
) -> None:
    create_model(api, ns, ready=True, claim="models-qwen")
    app = create_app(
        api, ns, runtime="dynamo", image="nvcr.io/nvidia/ai-dynamo/vllm-runtime:1.0.0", replicas=2
    )
    reconcile_application(api, (ns, "chat"), defaults=RENDER_DEFAULTS)

    workers = get(api, DEPLOYMENTS, ns, "chat")
    frontend = get(api, DEPLOYMENTS, ns, "chat-frontend")
    service = get(api, SERVICES, ns, "chat")
    assert workers is not None and frontend is not None and service is not None
    for child in (workers, frontend, service):
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["uid"] == app["metadata"]["uid"] and ref["controller"] is True
    worker_pod = workers["spec"]["template"]["spec"]["containers"][0]
    assert worker_pod["command"][:3] == ["python3", "-m", "dynamo.vllm"]
    frontend_pod = frontend["spec"]["template"]
    assert frontend_pod["spec"]["containers"][0]["command"][:3] == [
        "python3",
        "-m",
        "dynamo.frontend",
    ]
    assert service["spec"]["selector"].items() <= frontend_pod["metadata"]["labels"].items()
    assert (app_status(api, ns)["replicas"], app_status(api, ns)["readyReplicas"]) == (2, 0)

    set_status(api, DEPLOYMENTS, ns, "chat", replicas=2, readyReplicas=2)
    reconcile_application(api, (ns, "chat"), defaults=RENDER_DEFAULTS)
    status = app_status(api, ns)
    assert (status["replicas"], status["readyReplicas"]) == (2, 2), "counts are the workers'"
    assert status["phase"] == "Pending"
    available = condition(status, "Available")
    assert available["status"] == "False" and "chat-frontend" in available["message"]

    set_status(api, DEPLOYMENTS, ns, "chat-frontend", replicas=1, readyReplicas=1)
    reconcile_application(api, (ns, "chat"), defaults=RENDER_DEFAULTS)
    status = app_status(api, ns)
    assert status["phase"] == "Running"
    assert condition(status, "Available")["reason"] == "AllReplicasReady"
    listed = rest.request(api, "GET", EVENTS.path(ns)).get("items") or []
    reasons = {e["reason"] for e in listed if e["involvedObject"]["name"] == "chat"}
    assert "Available" in reasons

    def versions() -> list[str]:
        objects = [
            get(api, DEPLOYMENTS, ns, "chat"),
            get(api, DEPLOYMENTS, ns, "chat-frontend"),
            get(api, SERVICES, ns, "chat"),
            get(api, APPLICATIONS, ns, "chat"),
        ]
        return [str(o["metadata"]["resourceVersion"]) for o in objects if o is not None]

    before = versions()
    reconcile_application(api, (ns, "chat"), defaults=RENDER_DEFAULTS)
    assert len(before) == 4 and versions() == before


def test_render_failure_records_a_warning_event(api: ApiClient, ns: str) -> None:
    create_model(api, ns, ready=True)
    create_app(api, ns, runtime="nonesuch")
    for _ in range(2):
        with pytest.raises(PermanentError):
            reconcile_application(api, (ns, "chat"))
    listed = rest.request(api, "GET", EVENTS.path(ns)).get("items") or []
    (event,) = [e for e in listed if e["reason"] == "RenderFailed"]
    assert event["type"] == "Warning" and event["count"] == 1, "recorded on the transition only"


# The HPA controller scales through the scale subresource with kube-controller-manager's client.
HPA_AGENT = (
    "kube-controller-manager/v1.33.0 (linux/amd64) kubernetes/abcdef0/horizontal-pod-autoscaler"
)


def hpa_scales(kube: RunningKubeEmulator, ns: str, name: str, replicas: int) -> None:
    with kube.api_client() as hpa:
        hpa.user_agent = HPA_AGENT
        path = DEPLOYMENTS.path(ns, name, "scale")
        scale = rest.request(hpa, "GET", path)
        scale["spec"]["replicas"] = replicas
        rest.request(hpa, "PUT", path, body=scale)


def replicas_of(api: ApiClient, ns: str, name: str = "chat") -> int:
    deployment = get(api, DEPLOYMENTS, ns, name)
    assert deployment is not None
    return int(deployment["spec"]["replicas"])


def test_turning_autoscaling_on_hands_replicas_to_the_hpa_without_a_reset(
    kube: RunningKubeEmulator, api: ApiClient, ns: str
) -> None:
    """Dropping `replicas` from the applied Deployment would reset it to 1 (the API server's
    default) before the HPA takes the field: the running replicas would be killed."""
    create_model(api, ns, ready=True)
    create_app(api, ns, replicas=3)
    reconcile_application(api, (ns, "chat"))
    assert replicas_of(api, ns) == 3

    _update_spec(api, ns, autoscaling={"minReplicas": 1, "maxReplicas": 8})
    reconcile_application(api, (ns, "chat"))
    assert replicas_of(api, ns) == 3
    reconcile_application(api, (ns, "chat"))  # and again, once the handover is done
    assert replicas_of(api, ns) == 3

    hpa_scales(kube, ns, "chat", 5)
    reconcile_application(api, (ns, "chat"))
    assert replicas_of(api, ns) == 5  # the HPA's count: the controller leaves it
    managers = {
        e["manager"] for e in get(api, DEPLOYMENTS, ns, "chat")["metadata"]["managedFields"]
    }
    assert managers == {"arks-controller", "kube-controller-manager"}  # the handover is gone

    _update_spec(api, ns, autoscaling=None, replicas=2)
    reconcile_application(api, (ns, "chat"))
    assert replicas_of(api, ns) == 2  # the controller's count again
    assert get(api, HPAS, ns, "chat") is None
    hpa_scales(kube, ns, "chat", 7)  # a late write of the deleted HPA …
    reconcile_application(api, (ns, "chat"))
    assert replicas_of(api, ns) == 2  # … is undone


def test_an_autoscaled_leaderworkerset_keeps_its_groups_on_handover(
    kube: RunningKubeEmulator, api: ApiClient, ns: str
) -> None:
    create_model(api, ns, ready=True)
    create_app(api, ns, replicas=2, size=2, tensorParallelSize=2)
    reconcile_application(api, (ns, "chat"))
    _update_spec(api, ns, autoscaling={"minReplicas": 1, "maxReplicas": 4})
    reconcile_application(api, (ns, "chat"))
    lws = get(api, LEADERWORKERSETS, ns, "chat")
    assert lws is not None and lws["spec"]["replicas"] == 2


def test_pruning_spares_a_look_alike_the_app_does_not_control(api: ApiClient, ns: str) -> None:
    """A user's HPA carrying the app's labels (copied from a rendered one) is not the app's to
    delete: only its controller reference makes a child the app's."""
    create_model(api, ns, ready=True)
    create_app(api, ns)
    reconcile_application(api, (ns, "chat"))
    users = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": "users-hpa",
            "labels": {"app.kubernetes.io/managed-by": "arks", "arks.ai/application": "chat"},
        },
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat"},
            "maxReplicas": 2,
        },
    }
    rest.request(api, "POST", HPAS.path(ns), body=users)
    reconcile_application(api, (ns, "chat"))
    assert get(api, HPAS, ns, "users-hpa") is not None


def test_shrinking_to_one_node_deletes_the_leaderworkerset(api: ApiClient, ns: str) -> None:
    create_model(api, ns, ready=True)
    create_app(api, ns, size=2, tensorParallelSize=2)
    reconcile_application(api, (ns, "chat"))
    assert get(api, LEADERWORKERSETS, ns, "chat") is not None

    _update_spec(api, ns, size=1, tensorParallelSize=1)
    reconcile_application(api, (ns, "chat"))

    assert get(api, LEADERWORKERSETS, ns, "chat") is None
    assert get(api, DEPLOYMENTS, ns, "chat") is not None


def test_the_running_controller_leaves_the_hpas_count_alone(
    kube: RunningKubeEmulator, api: ApiClient, ns: str
) -> None:
    """The HPA's write wakes the controller (its Deployment changed): the reconcile it triggers
    must keep the HPA's count, and turning autoscaling off must set the app's again."""
    create_model(api, ns, ready=True)
    controller = application_controller(
        api, ns, workers=1, queue=WorkQueue(max_delay_s=0.5), informer_options=FAST_INFORMERS
    )
    controller.start()
    try:
        create_app(api, ns, replicas=3)
        eventually(lambda: get(api, DEPLOYMENTS, ns, "chat"))
        _update_spec(api, ns, autoscaling={"minReplicas": 1, "maxReplicas": 8})
        eventually(lambda: get(api, HPAS, ns, "chat"))
        assert replicas_of(api, ns) == 3
        hpa_scales(kube, ns, "chat", 6)
        # The reconcile the scale triggered reports the HPA's count: it ran, and kept it.
        eventually(lambda: app_status(api, ns).get("replicas") == 6)
        assert replicas_of(api, ns) == 6
        _update_spec(api, ns, autoscaling=None, replicas=2)
        eventually(lambda: get(api, HPAS, ns, "chat") is None and replicas_of(api, ns) == 2)
    finally:
        controller.stop()


def test_an_engine_flag_the_engine_lacks_is_reported_in_the_status(api: ApiClient, ns: str) -> None:
    create_model(api, ns, ready=True)
    create_app(api, ns, runtimeCommonArgs=["--max-model-len", "8192", "--nonesuch", "1"])
    for _ in range(2):
        reconcile_application(api, (ns, "chat"))
    accepted = condition(app_status(api, ns), "EngineArgsAccepted")
    assert accepted["status"] == "False" and accepted["reason"] == "UnknownFlags"
    assert accepted["message"] == "runtimeCommonArgs: --nonesuch not accepted by vllm 0.8.5"
    assert get(api, DEPLOYMENTS, ns, "chat") is not None, (
        "rendered anyway: a newer engine may know it"
    )
    listed = rest.request(api, "GET", EVENTS.path(ns)).get("items") or []
    (event,) = [e for e in listed if e["reason"] == "UnknownEngineFlags"]
    assert event["type"] == "Warning" and event["count"] == 1

    app = get(api, APPLICATIONS, ns, "chat")
    assert app is not None
    app["spec"]["runtimeCommonArgs"] = ["--max-model-len", "8192"]
    rest.request(api, "PUT", APPLICATIONS.path(ns, "chat"), body=app)
    reconcile_application(api, (ns, "chat"))
    assert condition(app_status(api, ns), "EngineArgsAccepted")["status"] == "True"


def test_dynamo_without_the_platform_is_failed_with_what_the_controller_needs(
    api: ApiClient, ns: str
) -> None:
    create_model(api, ns, ready=True)
    create_app(api, ns, runtime="dynamo", image="nvcr.io/nvidia/ai-dynamo/vllm-runtime:1.0.0")
    with pytest.raises(PermanentError):
        reconcile_application(api, (ns, "chat"))
    status = app_status(api, ns)
    rendered = condition(status, "Rendered")
    assert status["phase"] == "Failed" and rendered["status"] == "False"
    assert "--dynamo-etcd-endpoints" in rendered["message"]
    assert get(api, DEPLOYMENTS, ns, "chat") is None
