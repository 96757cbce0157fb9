"""`arks controller` as it runs in a cluster: a process watching the API server, electing itself
leader on a Lease, reconciling an ArksModel into its claim and download Job and, once the
model is Ready, an ArksApplication into a Deployment, an ArksEndpoint into an
HTTPRoute (and a picking one also into its EnvoyPatchPolicy, deleted with it) and an ArksToken
into its status, and stopping on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import kubernetes

from arks.adapters.kube import rest
from arks.resources import (
    DAEMONSETS,
    DEPLOYMENTS,
    ENDPOINTS,
    HTTPROUTES,
    JOBS,
    LEASES,
    MODELS,
    NETWORKPOLICIES,
    PATCH_POLICIES,
    PVCS,
)
from controller.render.model_cache import (
    cache_daemonset_name,
    cleanup_daemonset_name,
    source_name,
)
from controller.render.picking import picking_policy_name
from controller.server import USER_AGENT
from launcher.procs import free_port
from tests.support.exposition import assert_process_metrics, sample
from tests.support.kube import RunningKubeEmulator, eventually, get_object
from tests.support.rbac import allows, roles_of


def test_the_controller_process_reconciles_and_stops_cleanly(
    kube: RunningKubeEmulator, api: Any, tmp_path: Path
) -> None:
    custom = kubernetes.client.CustomObjectsApi(api)
    model = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksModel",
        "metadata": {"name": "qwen"},
        "spec": {
            "source": {"huggingface": {"repo": "Qwen/Qwen2.5-7B-Instruct"}},
            "storage": {"size": "40Gi"},
            "nodeCache": {"enabled": True, "nodeSelector": {"gpu": "true"}},
        },
    }
    custom.create_namespaced_custom_object("arks.ai", "v1", "prod", "arksmodels", model)
    app = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksApplication",
        "metadata": {"name": "qwen-a"},
        "spec": {
            "runtime": "vllm",
            "model": {"name": "qwen"},
            "servedModelName": "qwen-7b",
            "replicas": 1,
            "size": 1,
        },
    }
    custom.create_namespaced_custom_object("arks.ai", "v1", "prod", "arksapplications", app)
    endpoint = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksEndpoint",
        "metadata": {"name": "qwen-7b"},
        "spec": {"gatewayRef": {"name": "arks-gateway"}},
    }
    custom.create_namespaced_custom_object("arks.ai", "v1", "prod", "arksendpoints", endpoint)
    picked = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksEndpoint",
        "metadata": {"name": "qwen-picked"},
        "spec": {"weighting": "least-load"},
    }
    custom.create_namespaced_custom_object("arks.ai", "v1", "prod", "arksendpoints", picked)
    token = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksToken",
        "metadata": {"name": "alice"},
        "spec": {
            "tokenHash": "sha256:" + "ab" * 32,
            "qos": [{"arksEndpoint": {"name": "qwen-7b"}}],
        },
    }
    custom.create_namespaced_custom_object("arks.ai", "v1", "prod", "arkstokens", token)

    port = free_port()
    log = (tmp_path / "controller.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "controller",
            "--kube-host",
            kube.url,
            "--lease-namespace",
            "prod",
            "--metrics-address",
            "127.0.0.1",
            "--metrics-port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # Play the cluster's part: the claim binds, the download Job succeeds; the model turns Ready.
        eventually(lambda: get_object(api, PVCS, "prod", "qwen"), timeout_s=20)
        rest.request(
            api,
            "PATCH",
            PVCS.path("prod", "qwen", "status"),
            body={"status": {"phase": "Bound"}},
            content_type=rest.MERGE_PATCH,
        )
        job = eventually(
            lambda: rest.request(api, "GET", JOBS.path("prod"))["items"], timeout_s=10
        )[0]
        rest.request(
            api,
            "PATCH",
            JOBS.path("prod", job["metadata"]["name"], "status"),
            body={"status": {"succeeded": 1}},
            content_type=rest.MERGE_PATCH,
        )
        model_status = eventually(
            lambda: (
                (
                    custom.get_namespaced_custom_object(
                        "arks.ai", "v1", "prod", "arksmodels", "qwen"
                    ).get("status")
                    or {}
                ).get("phase")
                == "Ready"
            ),
            timeout_s=10,
        )
        assert model_status
        deployment = eventually(
            lambda: get_object(api, DEPLOYMENTS, "prod", "qwen-a"), timeout_s=20
        )
        assert deployment["metadata"]["ownerReferences"][0]["name"] == "qwen-a"
        lease = get_object(api, LEASES, "prod", "arks-controller")
        assert lease and lease["spec"]["holderIdentity"]
        status = eventually(
            lambda: (
                custom.get_namespaced_custom_object(
                    "arks.ai", "v1", "prod", "arksapplications", "qwen-a"
                ).get("status")
                or {}
            ),
            timeout_s=10,
        )
        assert status["phase"] == "Pending"  # no pod is ready in an emulated cluster
        route = eventually(lambda: get_object(api, HTTPROUTES, "prod", "qwen-7b"), timeout_s=10)
        assert [ref["name"] for ref in route["spec"]["rules"][0]["backendRefs"]] == ["qwen-a"]
        token_status = eventually(
            lambda: (
                custom.get_namespaced_custom_object(
                    "arks.ai", "v1", "prod", "arkstokens", "alice"
                ).get("status")
                or {}
            ),
            timeout_s=10,
        )
        assert token_status["phase"] == "Active"

        # A picking endpoint's EnvoyPatchPolicy, beside the Gateway, goes with the endpoint.
        policy = ("arks-system", picking_policy_name("prod", "qwen-picked"))
        eventually(lambda: get_object(api, PATCH_POLICIES, *policy), timeout_s=10)
        custom.delete_namespaced_custom_object(
            "arks.ai", "v1", "prod", "arksendpoints", "qwen-picked"
        )
        eventually(
            lambda: (
                get_object(api, PATCH_POLICIES, *policy) is None
                and get_object(api, ENDPOINTS, "prod", "qwen-picked") is None
            ),
            timeout_s=10,
        )

        # The node cache: its source in the model's namespace, its DaemonSet in arks-cache; a
        # deleted model waits for the cleanup of the host copies, then goes.
        model["metadata"]["namespace"] = "prod"
        eventually(lambda: get_object(api, NETWORKPOLICIES, "prod", source_name(model)))
        eventually(lambda: get_object(api, DAEMONSETS, "arks-cache", cache_daemonset_name(model)))
        custom.delete_namespaced_custom_object("arks.ai", "v1", "prod", "arksmodels", "qwen")
        cleanup = cleanup_daemonset_name(model, "/var/lib/arks/models/prod")
        eventually(lambda: get_object(api, DAEMONSETS, "arks-cache", cleanup), timeout_s=10)
        rest.request(
            api,
            "PATCH",
            DAEMONSETS.path("arks-cache", cleanup, "status"),
            body={
                "status": {"desiredNumberScheduled": 1, "numberReady": 1, "observedGeneration": 1}
            },
            content_type=rest.MERGE_PATCH,
        )
        eventually(lambda: get_object(api, MODELS, "prod", "qwen") is None, timeout_s=10)
        assert get_object(api, DAEMONSETS, "arks-cache", cleanup) is None

        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/readyz").status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        assert "arks_controller_leader 1.0" in metrics
        for controller in ("arksapplication", "arksendpoint"):
            reconciled = sample(
                metrics, "arks_controller_reconcile_total", controller=controller, result="success"
            )
            assert (reconciled or 0.0) >= 1
        for result in ("success", "retry", "permanent_error", "error"):  # every one, from 0
            assert (
                sample(
                    metrics,
                    "arks_controller_reconcile_total",
                    controller="arkstoken",
                    result=result,
                )
                is not None
            )
        assert_process_metrics(metrics, "controller")
        assert 'arks_controller_queue_depth{controller="arkstoken"}' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0

        # Everything it asked of the API server, its manifests' RBAC allows.
        cluster, own_namespace = roles_of("arks-controller")
        asked = {entry[1:] for entry in kube.emulator.audit if entry[0] == USER_AGENT}
        assert {verb for verb, *_ in asked} >= {"list", "watch", "get", "create", "patch", "delete"}
        refused = [
            (verb, group, resource, namespace, name)
            for verb, group, resource, namespace, name in asked
            if not allows(cluster, verb, group, resource, name)
            and not (namespace == "prod" and allows(own_namespace, verb, group, resource, name))
        ]
        assert refused == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
