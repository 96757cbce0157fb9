"""ArksToken status written by the running controller, against the Kubernetes API emulator."""

from __future__ import annotations

import base64
import datetime
import time
from typing import Any

import pytest
from kubernetes.client import ApiClient

from arks.adapters.kube import rest
from arks.adapters.kube.conditions import find_condition
from arks.resources import ENDPOINTS, EVENTS, QUOTAS, SECRETS, TOKENS, Resource
from controller.reconcilers.token import token_controller
from tests.support.kube import FAST_INFORMERS, eventually
from tests.support.kube import get_object as get

pytestmark = pytest.mark.timeout(60)
DIGEST = "sha256:" + "cd" * 32


def create(
    api: ApiClient, resource: Resource, ns: str, kind: str, name: str, **fields: Any
) -> None:
    body = {"apiVersion": resource.api_version, "kind": kind, "metadata": {"name": name}, **fields}
    rest.request(api, "POST", resource.path(ns), body=body)


def status(api: ApiClient, ns: str, name: str = "alice") -> dict[str, Any]:
    obj = get(api, TOKENS, ns, name)
    return dict((obj or {}).get("status") or {})


def ready(api: ApiClient, ns: str, name: str = "alice") -> tuple[str, str] | None:
    found = find_condition(status(api, ns, name).get("conditions"), "Ready")
    return (found["status"], found["reason"]) if found else None


@pytest.fixture
def controller(api: ApiClient, ns: str) -> Any:
    running = token_controller(api, ns, informer_options=FAST_INFORMERS)
    running.start()
    yield running
    running.stop()


def test_a_secret_held_token_turns_active_when_its_secret_appears(
    api: ApiClient, ns: str, controller: Any
) -> None:
    create(api, ENDPOINTS, ns, "ArksEndpoint", "qwen-7b", spec={})
    create(
        api, QUOTAS, ns, "ArksQuota", "team-a", spec={"quotas": [{"type": "total", "value": 10}]}
    )
    qos = [{"arksEndpoint": {"name": "qwen-7b"}, "quota": {"name": "team-a"}}]
    create(
        api,
        TOKENS,
        ns,
        "ArksToken",
        "alice",
        spec={"tokenSecretRef": {"name": "alice-token"}, "qos": qos},
    )

    eventually(lambda: ready(api, ns) == ("False", "SecretNotFound"))
    assert status(api, ns)["phase"] == "Invalid"

    value = base64.b64encode(b"sk-arks-never-shown").decode()
    create(api, SECRETS, ns, "Secret", "alice-token", data={"token": value})
    eventually(lambda: ready(api, ns) == ("True", "Active"))
    s = status(api, ns)
    assert (s["phase"], s["endpoints"], s["quotas"]) == ("Active", 1, 1)
    refs = find_condition(s["conditions"], "ReferencesResolved")
    assert refs and refs["status"] == "True"

    def reasons() -> set[tuple[str, str]]:
        events = rest.request(api, "GET", EVENTS.path(ns))["items"]
        return {(e["reason"], e["type"]) for e in events if e["involvedObject"]["name"] == "alice"}

    # The Event is recorded after the status is written: wait for it rather than race it.
    eventually(lambda: {("SecretNotFound", "Warning"), ("Active", "Normal")} <= reasons())
    events = rest.request(api, "GET", EVENTS.path(ns))["items"]
    everything = repr(status(api, ns)) + repr(events)
    assert "sk-arks-never-shown" not in everything


def test_an_expiring_token_expires_by_itself_and_settled_status_is_not_rewritten(
    api: ApiClient, ns: str, controller: Any
) -> None:
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=2)
    stamp = soon.strftime("%Y-%m-%dT%H:%M:%SZ")
    qos = [{"arksEndpoint": {"name": "gone"}}]
    create(
        api,
        TOKENS,
        ns,
        "ArksToken",
        "alice",
        spec={"tokenHash": DIGEST, "expiresAt": stamp, "qos": qos},
    )
    eventually(lambda: ready(api, ns) == ("True", "Active"))
    refs = find_condition(status(api, ns)["conditions"], "ReferencesResolved")
    assert refs and (refs["status"], refs["reason"]) == ("False", "EndpointNotFound")

    eventually(lambda: ready(api, ns) == ("False", "Expired"), timeout_s=10)  # no edit, no poke
    assert status(api, ns)["phase"] == "Expired"

    version = get(api, TOKENS, ns, "alice")["metadata"]["resourceVersion"]  # type: ignore[index]
    controller.queue.add((ns, "alice"))
    time.sleep(1.0)
    assert get(api, TOKENS, ns, "alice")["metadata"]["resourceVersion"] == version  # type: ignore[index]


def test_plain_and_disabled_tokens(api: ApiClient, ns: str, controller: Any) -> None:
    create(api, TOKENS, ns, "ArksToken", "bob", spec={"token": "sk-plain-text-token"})
    eventually(lambda: ready(api, ns, "bob") == ("True", "Active"))
    plain = find_condition(status(api, ns, "bob")["conditions"], "PlainTextToken")
    assert plain and plain["status"] == "True"
    assert "sk-plain-text-token" not in repr(status(api, ns, "bob"))

    rest.request(
        api,
        "PATCH",
        TOKENS.path(ns, "bob"),
        body={"spec": {"disabled": True}},
        content_type=rest.MERGE_PATCH,
    )
    eventually(lambda: ready(api, ns, "bob") == ("False", "Disabled"))
    assert status(api, ns, "bob")["phase"] == "Disabled"
