"""Informers against the emulated API server: a healthy watch the server ends is resumed from
its resourceVersion, never re-listed; a list the client is not allowed is retried slowly and
quietly, and `forbidden` says so until it is allowed (issue 11, item 3)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from arks.adapters.kube import rest
from arks.adapters.kube.watch import Informer
from arks.resources import QUOTAS
from tests.support.kube import RunningKubeEmulator, eventually, running_kube_emulator

pytestmark = pytest.mark.timeout(60)


def quota(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"quotas": [{"type": "total", "value": 1}]}}


def test_a_healthy_watch_is_resumed_not_relisted(
    kube: RunningKubeEmulator, api: Any, ns: str
) -> None:
    rest.request(api, "POST", QUOTAS.path(ns), body=quota("a"))
    informer = Informer(api, QUOTAS, ns, watch_timeout_s=1.0, retry_s=0.1)
    informer.start()
    try:
        assert informer.wait_synced(5)
        time.sleep(2.5)  # the server ends each watch after 1 s
        rest.request(api, "POST", QUOTAS.path(ns), body=quota("b"))
        eventually(lambda: informer.get((ns, "b")) is not None)
        time.sleep(1.5)
    finally:
        informer.stop(0)
    assert informer.lists == 1
    asked = [e[1] for e in kube.emulator.audit if e[3] == "arksquotas" and e[4] == ns]
    assert asked.count("list") == 1 and asked.count("watch") >= 3


def test_a_forbidden_list_is_retried_slowly_and_said() -> None:
    with running_kube_emulator() as kube, kube.api_client() as api:
        kube.emulator.authorize = lambda entry: entry[3] != "arksquotas"
        informer = Informer(api, QUOTAS, "team", retry_s=0.01, forbidden_retry_s=0.5)
        informer.start()
        try:
            time.sleep(2.0)
            assert informer.forbidden and not informer.wait_synced(0)
            refused = [e for e in kube.emulator.audit if e[3] == "arksquotas"]
            assert 2 <= len(refused) <= 6  # every 0.5 s, not every 0.01 s
            kube.emulator.authorize = None  # the namespace opts in
            assert informer.wait_synced(3)
            assert not informer.forbidden
        finally:
            informer.stop(0)
