"""Least privilege in memory: with 10,000 unrelated Secrets and 10,000 unrelated Services (and
some unrelated Deployments, PVCs, Jobs and DaemonSets) in the cluster, the controller's and the
gateway's informers cache only what is Arks's: their caches hold a handful of objects and the
memory they keep stays small, measured with tracemalloc (issue 11, item 3)."""

from __future__ import annotations

import base64
import gc
import tracemalloc
from typing import Any

import pytest

from arks.resources import DAEMONSETS, DEPLOYMENTS, JOBS, PVCS, SECRETS, SERVICES, TOKENS
from arks.wire import LABEL_MANAGED_BY, LABEL_TOKEN_SECRET, MANAGED_BY
from controller.load.cluster import ClusterLoad
from controller.reconcilers.application import application_controller
from controller.reconcilers.disaggregated import disaggregated_controller
from controller.reconcilers.endpoint import endpoint_controller
from controller.reconcilers.model import model_controller
from controller.reconcilers.token import token_controller
from extproc.cluster_policy import ClusterPolicySource
from extproc.picking.discovery import ClusterEngines
from tests.support.kube import FAST_INFORMERS, eventually, get_object, running_kube_emulator

pytestmark = pytest.mark.timeout(240)

UNRELATED = 10_000
OTHERS = 500  # of each of Deployments, PVCs, Jobs and DaemonSets


def unrelated_objects(kube: Any) -> None:
    emulator = kube.emulator
    value = base64.b64encode(b"not-a-token-" * 8).decode()
    for i, ns in enumerate(("apps-1", "apps-2")):
        emulator.seed(
            SECRETS.path(ns),
            [
                {"metadata": {"name": f"s-{n}", "labels": {"app": "x"}}, "data": {"k": value}}
                for n in range(UNRELATED // 2)
            ],
        )
        ports = [{"name": "http", "port": 80, "targetPort": 8080}]
        emulator.seed(
            SERVICES.path(ns),
            [
                {"metadata": {"name": f"svc-{n}", "labels": {"app": "x"}}, "spec": {"ports": ports}}
                for n in range(UNRELATED // 2)
            ],
        )
        if i == 0:
            for resource in (DEPLOYMENTS, PVCS, JOBS, DAEMONSETS):
                emulator.seed(
                    resource.path(ns),
                    [{"metadata": {"name": f"o-{n}"}, "spec": {}} for n in range(OTHERS)],
                )
    # What is Arks's: a token kept in a labelled Secret, and a Service the controller renders.
    emulator.seed(
        SECRETS.path("team-a"),
        [
            {
                "metadata": {"name": "t", "labels": {LABEL_TOKEN_SECRET: "1"}},
                "stringData": {"token": "sk-1"},
            }
        ],
    )
    spec = {"tokenSecretRef": {"name": "t"}, "qos": []}
    emulator.seed(TOKENS.path("team-a"), [{"metadata": {"name": "alice"}, "spec": spec}])
    emulator.seed(
        SERVICES.path("team-a"),
        [{"metadata": {"name": "app", "labels": {LABEL_MANAGED_BY: MANAGED_BY}}, "spec": {}}],
    )


def test_unrelated_secrets_and_services_never_enter_the_caches() -> None:
    with running_kube_emulator() as kube:
        unrelated_objects(kube)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        with kube.api_client() as api:
            load = ClusterLoad(api, None, informer_options=FAST_INFORMERS)
            controllers = [
                application_controller(api, None, informer_options=FAST_INFORMERS),
                disaggregated_controller(api, None, informer_options=FAST_INFORMERS),
                model_controller(api, None, informer_options=FAST_INFORMERS),
                endpoint_controller(api, None, informer_options=FAST_INFORMERS, load=load),
                token_controller(api, None, informer_options=FAST_INFORMERS),
            ]
            policy = ClusterPolicySource(api, None, informer_options=FAST_INFORMERS)
            engines = ClusterEngines(api, None, informer_options=FAST_INFORMERS)
            for controller in controllers:
                controller.start()
            load.start()
            policy.start()
            engines.start()
            try:
                eventually(lambda: all(c.synced() for c in controllers), timeout_s=60)
                # the token's Secret was read (so Secrets are watched at all) ...
                eventually(
                    lambda: (
                        (get_object(api, TOKENS, "team-a", "alice") or {})
                        .get("status", {})
                        .get("phase")
                        == "Active"
                    ),
                    timeout_s=30,
                )
                cached = {
                    "controller": sum(c.cached() for c in controllers) + load.informer.size(),
                    "extproc": policy.cached() + engines.cached(),
                }
                gc.collect()
                kept = tracemalloc.get_traced_memory()[0] - before
            finally:
                engines.stop()
                policy.stop()
                load.stop()
                for controller in controllers:
                    controller.stop(timeout_s=1.0)
                tracemalloc.stop()
    # ... but only it: the ArksToken, its Secret, the managed Service (x2: the load's and the
    # application controller's view); extproc: the ArksToken and the managed Service.
    print(f"cached {cached}, kept {kept / 2**20:.2f} MiB")
    assert cached["controller"] <= 5, cached
    assert cached["extproc"] <= 3, cached
    # Caching the 20,000 unrelated objects would keep tens of MB (~2 KB each, parsed).
    assert kept < 8 * 2**20, f"{kept / 2**20:.1f} MiB kept"
