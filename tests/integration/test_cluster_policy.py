"""Policy from the cluster: ArksTokens created, changed and deleted through the API server take
effect in the running gateway within seconds, through real Envoy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import kubernetes
import pytest

from arks.api import token_digest
from arks.wire import LABEL_TOKEN_SECRET
from controller.reconcilers.token import token_controller
from extproc.server import USER_AGENT
from tests.support.kube import FAST_INFORMERS, RunningKubeEmulator
from tests.support.objects import endpoint, token
from tests.support.rbac import allows, roles_of
from tests.support.stack import Stack, running_stack
from tests.support.stall_proxy import stall_proxy
from tests.support.waiting import wait_for

CAROL = "sk-arks-test-cluster-carol-71"
DAVE = "sk-arks-test-cluster-dave-72"
EVE = "sk-arks-test-cluster-eve-73"
FRANK = "sk-arks-test-cluster-frank-74"


@pytest.fixture(scope="module")
def cluster_stack(
    kube: RunningKubeEmulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    # Envoy's routes still come from the file (Envoy Gateway routes in a cluster); extproc's
    # tokens, quotas and endpoints come from the API server.
    custom = kubernetes.client.CustomObjectsApi(kube.api_client())
    custom.create_namespaced_custom_object(
        "arks.ai", "v1", "default", "arksendpoints", endpoint("model-a", "sim-a")
    )
    with running_stack(tmp_path_factory.mktemp("cluster"), kube_host=kube.url) as stack:
        yield stack


def status(stack: Stack, secret: str) -> int:
    return ask(stack.url, secret).status_code


def team_with_token(custom: kubernetes.client.CustomObjectsApi, user: str, secret: str) -> str:
    """An ArksQuota `<user>-team` (monthly tokens) and a token of `user` charged to it."""
    team = f"{user}-team"
    custom.create_namespaced_custom_object(
        "arks.ai",
        "v1",
        "default",
        "arksquotas",
        {
            "apiVersion": "arks.ai/v1",
            "kind": "ArksQuota",
            "metadata": {"name": team, "namespace": "default"},
            "spec": {"quotas": [{"type": "total", "value": 100000, "period": "month"}]},
        },
    )
    doc = token(user, ["model-a"], tokenHash=token_digest(secret))
    doc["spec"]["qos"][0]["quota"] = {"name": team}
    custom.create_namespaced_custom_object("arks.ai", "v1", "default", "arkstokens", doc)
    return team


def status_used(custom: kubernetes.client.CustomObjectsApi, team: str) -> float:
    """What the ArksQuota's status says was used, all periods together."""
    got = custom.get_namespaced_custom_object("arks.ai", "v1", "default", "arksquotas", team)
    return sum(e.get("used", 0) for e in (got.get("status") or {}).get("quotaStatus", []))


def ask(url: str, secret: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "model-a", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {secret}"},
        timeout=10,
    )


def test_a_token_created_changed_and_deleted_in_the_cluster(
    kube: RunningKubeEmulator, cluster_stack: Stack
) -> None:
    custom = kubernetes.client.CustomObjectsApi(kube.api_client())
    assert status(cluster_stack, CAROL) == 401
    custom.create_namespaced_custom_object(
        "arks.ai",
        "v1",
        "default",
        "arkstokens",
        token("carol", ["model-a"], tokenHash=token_digest(CAROL)),
    )
    wait_for(lambda: status(cluster_stack, CAROL), lambda s: s == 200, timeout=10)
    custom.patch_namespaced_custom_object(
        "arks.ai", "v1", "default", "arkstokens", "carol", {"spec": {"disabled": True}}
    )
    wait_for(lambda: status(cluster_stack, CAROL), lambda s: s == 401, timeout=10)
    custom.patch_namespaced_custom_object(
        "arks.ai", "v1", "default", "arkstokens", "carol", {"spec": {"disabled": False}}
    )
    wait_for(lambda: status(cluster_stack, CAROL), lambda s: s == 200, timeout=10)
    custom.delete_namespaced_custom_object("arks.ai", "v1", "default", "arkstokens", "carol")
    wait_for(lambda: status(cluster_stack, CAROL), lambda s: s == 401, timeout=10)


def test_a_token_held_in_a_secret(kube: RunningKubeEmulator, cluster_stack: Stack) -> None:
    """The gateway reads no Secret: the controller (its token reconciler, here in-process)
    reads it and publishes the digest in the ArksToken's status, which the gateway watches."""
    core = kubernetes.client.CoreV1Api(kube.api_client())
    custom = kubernetes.client.CustomObjectsApi(kube.api_client())
    custom.create_namespaced_custom_object(
        "arks.ai",
        "v1",
        "default",
        "arkstokens",
        token("dave", ["model-a"], tokenSecretRef={"name": "dave-token"}),
    )
    labels = {LABEL_TOKEN_SECRET: "true"}
    core.create_namespaced_secret(
        "default",
        {"metadata": {"name": "dave-token", "labels": labels}, "stringData": {"token": DAVE}},
    )
    assert status(cluster_stack, DAVE) == 401  # nobody has published its digest yet
    with kube.api_client() as client:
        controller = token_controller(client, "default", informer_options=FAST_INFORMERS)
        controller.start()
        try:
            wait_for(lambda: status(cluster_stack, DAVE), lambda s: s == 200, timeout=10)
            # rotating the secret retires the old token once the controller re-publishes
            core.patch_namespaced_secret(
                "dave-token", "default", {"stringData": {"token": DAVE + "-rotated"}}
            )
            wait_for(lambda: status(cluster_stack, DAVE), lambda s: s == 401, timeout=10)
            assert status(cluster_stack, DAVE + "-rotated") == 200
        finally:
            controller.stop()
    # the controller away, the last published digest keeps working
    assert status(cluster_stack, DAVE + "-rotated") == 200


def test_quota_usage_is_written_to_the_arksquota_status(
    kube: RunningKubeEmulator, cluster_stack: Stack
) -> None:
    custom = kubernetes.client.CustomObjectsApi(kube.api_client())
    team = team_with_token(custom, "eve", EVE)
    answer = wait_for(
        lambda: ask(cluster_stack.url, EVE), lambda r: r.status_code == 200, timeout=10
    )
    total = answer.json()["usage"]["total_tokens"]
    assert wait_for(lambda: status_used(custom, team), lambda u: u == total, timeout=15) == total

    # Idle, the quota's status is not written again, however many snapshots pass (0.5 s apart
    # here): one PATCH per change, not one per quota per interval per replica.
    def status_writes() -> int:
        wanted = (USER_AGENT, "patch", "arks.ai", "arksquotas/status", "default", team)
        return sum(1 for entry in kube.emulator.audit if entry == wanted)

    writes = status_writes()
    assert writes >= 1
    time.sleep(3)
    assert status_writes() == writes
    again = ask(cluster_stack.url, EVE)
    assert again.status_code == 200
    more = total + again.json()["usage"]["total_tokens"]
    assert wait_for(lambda: status_used(custom, team), lambda u: u == more, timeout=15) == more
    assert status_writes() > writes


def test_what_the_gateway_asks_of_the_api_server_its_rbac_allows(
    kube: RunningKubeEmulator, cluster_stack: Stack
) -> None:
    """Runs after the tests above (watches, a Secret-held token, quota status writes)."""
    cluster, own_namespace = roles_of("arks-extproc")
    assert own_namespace == []
    asked = {entry[1:] for entry in kube.emulator.audit if entry[0] == USER_AGENT}
    assert {verb for verb, *_ in asked} >= {"list", "watch", "patch"}
    assert not [a for a in asked if a[2] == "secrets"]  # the gateway reads no Secrets
    refused = [a for a in asked if not allows(cluster, a[0], a[1], a[2], a[4])]
    assert refused == []


def test_an_api_server_that_hangs_stalls_no_request(
    kube: RunningKubeEmulator, cluster_stack: Stack, tmp_path: Path
) -> None:
    """The quota snapshot is written to ArksQuota.status every interval. With every call to the
    API server hanging (its watches already open), requests still answer at once, and the status
    catches up when the API server does. (`cluster_stack`: its ArksEndpoint.)"""
    custom = kubernetes.client.CustomObjectsApi(kube.api_client())
    team = team_with_token(custom, "frank", FRANK)
    with stall_proxy(kube.url) as proxy, running_stack(tmp_path, kube_host=proxy.url) as stack:
        first = wait_for(lambda: ask(stack.url, FRANK), lambda r: r.status_code == 200, timeout=15)
        total = first.json()["usage"]["total_tokens"]
        wait_for(lambda: status_used(custom, team), lambda u: u == total, timeout=15)
        proxy.stalled = True
        try:
            slowest = 0.0
            for _ in range(12):  # over 3 s: six snapshots (0.5 s apart), each with new usage
                started = time.monotonic()
                answer = ask(stack.url, FRANK)
                slowest = max(slowest, time.monotonic() - started)
                assert answer.status_code == 200, answer.text
                total += answer.json()["usage"]["total_tokens"]
                time.sleep(0.25)
            assert slowest < 1.0
        finally:
            proxy.stalled = False
        # The write that hung gives up (its timeout) and a later one lands.
        caught_up = wait_for(lambda: status_used(custom, team), lambda u: u == total, timeout=30)
        assert caught_up == total
