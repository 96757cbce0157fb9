"""ArksToken status written by the running controller, against the Kubernetes API emulator."""

from __future__ import annotations

import base64
import datetime
import time
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from arks.adapters.kube import rest
from arks.adapters.kube.conditions import find_condition
from arks.api import token_digest
from arks.resources import ENDPOINTS, EVENTS, QUOTAS, SECRETS, TOKENS, Resource
from arks.wire import LABEL_TOKEN_SECRET
from controller.metrics import ControllerMetrics
from controller.reconcilers.token import SECRET_READER_ROLE, token_controller
from tests.support.kube import FAST_INFORMERS, eventually, running_kube_emulator
from tests.support.kube import get_object as get
from tests.support.paths import REPO
from tests.support.rbac import authorizer

pytestmark = pytest.mark.timeout(60)
DIGEST = "sha256:" + "cd" * 32


SECRET_META = {"labels": {LABEL_TOKEN_SECRET: "true"}}  # the Secrets the controller watches


def create(
    api: ApiClient,
    resource: Resource,
    ns: str,
    kind: str,
    name: str,
    metadata: dict[str, Any] | None = None,
    **fields: Any,
) -> None:
    meta = {"name": name, **(metadata or {})}
    body = {"apiVersion": resource.api_version, "kind": kind, "metadata": meta, **fields}
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
    create(api, SECRETS, ns, "Secret", "alice-token", data={"token": value}, metadata=SECRET_META)
    eventually(lambda: ready(api, ns) == ("True", "Active"))
    s = status(api, ns)
    assert (s["phase"], s["endpoints"], s["quotas"]) == ("Active", 1, 1)
    # the digest, for the gateway (which reads no Secrets), and which key it came from
    assert s["tokenHash"] == token_digest("sk-arks-never-shown")
    assert s["tokenHashSecret"] == {"name": "alice-token", "key": "token"}
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


# --- Secrets only where a namespace opted in (issue 11, item 3) -------------------------------

CONTROLLER_AGENT = "arks-controller"


def opt_in(namespace: str) -> dict[str, Any]:
    """The sample RoleBinding (manifests/samples/tenant/), in `namespace`."""
    binding = yaml.safe_load(OPT_IN_SAMPLE.read_text().split("\n---\n")[0])
    binding["metadata"]["namespace"] = namespace
    return dict(binding)


OPT_IN_SAMPLE = REPO / "manifests" / "samples" / "tenant" / "token-secret-reader-rolebinding.yaml"


def test_the_sample_opt_in_binds_the_unbound_secret_reader_role_to_the_controller() -> None:
    binding = opt_in("team-a")
    assert binding["kind"] == "RoleBinding"
    assert binding["roleRef"]["name"] == SECRET_READER_ROLE
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "arks-controller", "namespace": "arks-system"}
    ]


def test_secrets_are_read_only_where_the_namespace_opted_in_and_rotation_is_published() -> None:
    """Against an API server enforcing the shipped RBAC plus one tenant's opt-in RoleBinding:
    the token in the opted-in namespace is published by digest (and re-published when its
    Secret rotates); the one in the other namespace says SecretForbidden, and the refused
    namespace is asked again slowly, not hot."""
    with running_kube_emulator() as kube, kube.api_client() as api:
        kube.emulator.authorize = authorizer(
            "arks-controller", CONTROLLER_AGENT, [opt_in("team-a")]
        )
        with kube.api_client() as controller_api:
            controller_api.user_agent = CONTROLLER_AGENT
            options = {**FAST_INFORMERS, "forbidden_retry_s": 2.0}
            running = token_controller(controller_api, None, informer_options=options)
            running.start()
            try:
                _opted_in_and_not(api, kube)
            finally:
                running.stop()
        asked = [e for e in kube.emulator.audit if e[0] == CONTROLLER_AGENT]
        refused = [e for e in asked if not kube.emulator.authorize(e)]
        # only team-b's Secrets were refused, and only a few times (2 s apart), never hot
        assert {(e[1], e[3], e[4]) for e in refused} == {("list", "secrets", "team-b")}
        assert 1 <= len(refused) <= 8
        # no cluster-wide Secret request at all
        assert not [e for e in asked if e[3] == "secrets" and e[4] is None]


def _opted_in_and_not(api: ApiClient, kube: Any) -> None:
    for ns in ("team-a", "team-b"):
        create(api, ENDPOINTS, ns, "ArksEndpoint", "qwen-7b", spec={})
        qos = [{"arksEndpoint": {"name": "qwen-7b"}}]
        create(
            api,
            TOKENS,
            ns,
            "ArksToken",
            "alice",
            spec={"tokenSecretRef": {"name": "t"}, "qos": qos},
        )
        create(api, SECRETS, ns, "Secret", "t", metadata=SECRET_META, stringData={"token": "sk-1"})
    # an unrelated Secret, not labelled: never cached, and a token naming it is told why
    create(api, SECRETS, "team-a", "Secret", "db-password", stringData={"token": "hunter2"})
    qos = [{"arksEndpoint": {"name": "qwen-7b"}}]
    spec = {"tokenSecretRef": {"name": "db-password"}, "qos": qos}
    create(api, TOKENS, "team-a", "ArksToken", "mallory", spec=spec)

    eventually(lambda: ready(api, "team-a") == ("True", "Active"), timeout_s=10)
    assert status(api, "team-a")["tokenHash"] == token_digest("sk-1")
    eventually(lambda: ready(api, "team-b") == ("False", "SecretForbidden"), timeout_s=10)
    forbidden = status(api, "team-b")
    assert forbidden["phase"] == "Invalid" and "tokenHash" not in forbidden
    condition = find_condition(forbidden["conditions"], "Ready")
    assert condition and SECRET_READER_ROLE in condition["message"]
    eventually(lambda: ready(api, "team-a", "mallory") == ("False", "SecretNotFound"))
    assert "tokenHash" not in status(api, "team-a", "mallory")

    # rotation: the new digest replaces the old one as soon as the controller sees the change
    rest.request(
        api,
        "PATCH",
        SECRETS.path("team-a", "t"),
        body={"stringData": {"token": "sk-2"}},
        content_type=rest.MERGE_PATCH,
    )
    eventually(lambda: status(api, "team-a").get("tokenHash") == token_digest("sk-2"))
    # the Secret deleted: the digest is withdrawn, so the gateway stops accepting the token
    rest.request(api, "DELETE", SECRETS.path("team-a", "t"))
    eventually(lambda: ready(api, "team-a") == ("False", "SecretNotFound"))
    assert "tokenHash" not in status(api, "team-a")
    assert "tokenHashSecret" not in status(api, "team-a")


def test_quota_status_writes_do_not_recheck_the_tokens_charged_to_it(
    api: ApiClient, ns: str
) -> None:
    """The gateways write each ArksQuota's status every few seconds; a token's status depends
    only on whether its quota exists, so those writes reconcile no token."""
    metrics = ControllerMetrics()
    running = token_controller(api, ns, informer_options=FAST_INFORMERS)
    running.instrument(metrics)
    running.start()
    try:
        quota_spec = {"quotas": [{"type": "total", "value": 10}]}
        create(api, QUOTAS, ns, "ArksQuota", "team-a", spec=quota_spec)
        qos = [{"arksEndpoint": {"name": "qwen-7b"}, "quota": {"name": "team-a"}}]
        for name in ("u1", "u2", "u3"):  # each its own token (one shared is DuplicateToken)
            spec = {"tokenHash": token_digest(f"sk-{name}"), "qos": qos}
            create(api, TOKENS, ns, "ArksToken", name, spec=spec)
        eventually(lambda: all(ready(api, ns, n) == ("True", "Active") for n in ("u1", "u2", "u3")))
        time.sleep(0.5)

        def reconciles() -> float:
            value = metrics.registry.get_sample_value(
                "arks_controller_reconcile_total", {"controller": "arkstoken", "result": "success"}
            )
            return value or 0.0

        settled = reconciles()
        for used in range(5):
            rest.request(
                api,
                "PATCH",
                QUOTAS.path(ns, "team-a", "status"),
                body={"status": {"quotaStatus": [{"used": used}]}},
                content_type=rest.MERGE_PATCH,
            )
        time.sleep(1.0)
        assert reconciles() == settled
        rest.request(api, "DELETE", QUOTAS.path(ns, "team-a"))  # existence does count
        eventually(lambda: "team-a" in str(status(api, ns, "u1").get("conditions")))
        assert reconciles() >= settled + 3
    finally:
        running.stop()


def test_a_secret_that_loses_its_label_stops_the_token(
    api: ApiClient, ns: str, controller: Any
) -> None:
    # The Secrets are watched by label: one unlabelled leaves the selection (the API server
    # sends DELETED), so its digest is withdrawn and the gateway stops taking the token.
    create(api, ENDPOINTS, ns, "ArksEndpoint", "qwen-7b", spec={})
    qos = [{"arksEndpoint": {"name": "qwen-7b"}}]
    spec = {"tokenSecretRef": {"name": "alice-token"}, "qos": qos}
    create(api, TOKENS, ns, "ArksToken", "alice", spec=spec)
    value = base64.b64encode(b"sk-arks-rotate-me").decode()
    create(api, SECRETS, ns, "Secret", "alice-token", data={"token": value}, metadata=SECRET_META)
    eventually(lambda: status(api, ns).get("tokenHash") == token_digest("sk-arks-rotate-me"))

    rest.request(
        api,
        "PATCH",
        SECRETS.path(ns, "alice-token"),
        body={"metadata": {"labels": {LABEL_TOKEN_SECRET: None}}},
        content_type=rest.MERGE_PATCH,
    )
    eventually(lambda: ready(api, ns) == ("False", "SecretNotFound"))
    assert "tokenHash" not in status(api, ns)


def test_two_tokens_with_one_digest_in_two_namespaces_both_say_so_without_naming_the_other() -> (
    None
):
    """A tenant who learned another tenant's digest writes it in its own spec.tokenHash: the
    gateway then accepts neither token (it cannot tell the victim from the copy), so both
    statuses say DuplicateToken instead of Active, naming no token of the other namespace;
    once the copy is gone, the victim's token is Active again."""
    with running_kube_emulator() as kube, kube.api_client() as api:
        running = token_controller(api, None, informer_options=FAST_INFORMERS)
        running.start()
        try:
            qos = [{"arksEndpoint": {"name": "m"}}]
            for ns in ("bank", "mallory"):
                create(api, ENDPOINTS, ns, "ArksEndpoint", "m", spec={})
            create(
                api, TOKENS, "bank", "ArksToken", "alice", spec={"tokenHash": DIGEST, "qos": qos}
            )
            eventually(lambda: ready(api, "bank") == ("True", "Active"))
            create(
                api, TOKENS, "mallory", "ArksToken", "bob", spec={"tokenHash": DIGEST, "qos": qos}
            )
            eventually(lambda: ready(api, "mallory", "bob") == ("False", "DuplicateToken"))
            eventually(lambda: ready(api, "bank") == ("False", "DuplicateToken"))
            for ns, name in (("bank", "alice"), ("mallory", "bob")):
                assert status(api, ns, name)["phase"] == "Invalid"
                said = yaml.safe_dump(status(api, ns, name))
                assert "alice" not in said and "bob" not in said and "carol" not in said
                assert "bank" not in said and "mallory" not in said
            rest.request(api, "DELETE", TOKENS.path("mallory", "bob"))
            eventually(lambda: ready(api, "bank") == ("True", "Active"))
            # a copy being deleted, held by a finalizer, is gone for the gateway: not a duplicate
            meta = {"finalizers": ["tenant.example/keep"]}
            spec = {"tokenHash": DIGEST, "qos": qos}
            create(api, TOKENS, "mallory", "ArksToken", "carol", metadata=meta, spec=spec)
            eventually(lambda: ready(api, "bank") == ("False", "DuplicateToken"))
            rest.request(api, "DELETE", TOKENS.path("mallory", "carol"))
            eventually(lambda: ready(api, "bank") == ("True", "Active"))
        finally:
            running.stop()
