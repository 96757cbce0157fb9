"""The gateway's cluster policy is updated per change, not rebuilt (issue 11, item 3): one
token changed among many parses that one object; the gateway's own ArksQuota status writes (and
any status- or metadata-only update) are dropped unparsed; an ArksToken's published digest, a
status field, is applied."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from arks.adapters.kube import rest
from arks.api import token_digest
from arks.resources import ENDPOINTS, QUOTAS, TOKENS, Resource
from extproc.cluster_policy import ClusterPolicySource
from tests.support.kube import FAST_INFORMERS, RunningKubeEmulator, eventually

pytestmark = pytest.mark.timeout(60)
TOKENS_LOADED = 300


def merge(api: Any, resource: Resource, ns: str, name: str, body: Any, sub: str = "") -> None:
    path = resource.path(ns, name, sub) if sub else resource.path(ns, name)
    rest.request(api, "PATCH", path, body=body, content_type=rest.MERGE_PATCH)


@pytest.fixture
def source(kube: RunningKubeEmulator, api: Any, ns: str) -> Iterator[ClusterPolicySource]:
    quota = {"metadata": {"name": "team"}, "spec": {"quotas": [{"type": "total", "value": 10}]}}
    rest.request(api, "POST", QUOTAS.path(ns), body=quota)
    for i in range(TOKENS_LOADED):
        qos = [{"arksEndpoint": {"name": "m"}, "quota": {"name": "team"}}]
        body = {
            "metadata": {"name": f"u{i}"},
            "spec": {"tokenHash": token_digest(f"sk-{i}"), "qos": qos},
        }
        rest.request(api, "POST", TOKENS.path(ns), body=body)
    running = ClusterPolicySource(api, ns, informer_options=FAST_INFORMERS)
    running.start()
    yield running
    running.stop()


def test_one_change_parses_one_object_and_status_writes_parse_nothing(
    api: Any, ns: str, source: ClusterPolicySource
) -> None:
    assert source.parsed == TOKENS_LOADED + 1
    assert len(source.current().tokens_by_digest) == TOKENS_LOADED
    reloads = source.reloads

    # the gateway's quota status write, five times: no parse, no new snapshot
    for used in range(5):
        merge(api, QUOTAS, ns, "team", {"status": {"quotaStatus": [{"used": used}]}}, "status")
    merge(api, TOKENS, ns, "u1", {"metadata": {"labels": {"team": "a"}}})  # metadata only
    eventually(lambda: source.skipped >= 6)
    assert (source.parsed, source.reloads) == (TOKENS_LOADED + 1, reloads)

    # one token disabled among hundreds: that token is parsed, once
    merge(api, TOKENS, ns, "u7", {"spec": {"disabled": True}})
    eventually(lambda: source.reloads == reloads + 1)
    assert source.parsed == TOKENS_LOADED + 2
    disabled = source.current().token(token_digest("sk-7"))
    assert disabled is not None and disabled.disabled

    # the published digest of a Secret-held token is a status field, and it is applied
    ref = {"name": "sec", "key": "token"}
    body = {"metadata": {"name": "held"}, "spec": {"tokenSecretRef": ref, "qos": []}}
    rest.request(api, "POST", TOKENS.path(ns), body=body)
    eventually(lambda: source.reloads == reloads + 2)
    assert source.current().token(token_digest("sk-held")) is None
    status = {"tokenHash": token_digest("sk-held"), "tokenHashSecret": ref}
    merge(api, TOKENS, ns, "held", {"status": status}, "status")
    eventually(lambda: source.current().token(token_digest("sk-held")) is not None)
    assert source.parsed == TOKENS_LOADED + 4

    # deleted: gone from the snapshot
    rest.request(api, "DELETE", TOKENS.path(ns, "u7"))
    eventually(lambda: source.current().token(token_digest("sk-7")) is None)
    assert len(source.current().tokens_by_digest) == TOKENS_LOADED


def test_a_token_deleted_and_recreated_while_the_watch_was_down_is_the_new_one(
    kube: RunningKubeEmulator, api: Any, ns: str
) -> None:
    """Revoking a token by deleting it and creating one of the same name with a new digest,
    while the gateway's watch is down (a relist follows, as after 410 Gone): the relist shows
    the same name with generation 1 again, which is not "nothing changed" (its uid is new).
    The old digest must stop working."""

    def token(digest: str) -> dict[str, Any]:
        qos = [{"arksEndpoint": {"name": "m"}}]
        return {"metadata": {"name": "alice"}, "spec": {"tokenHash": digest, "qos": qos}}

    rest.request(api, "POST", TOKENS.path(ns), body=token(token_digest("sk-old")))
    options = {**FAST_INFORMERS, "forbidden_retry_s": 0.2}
    source = ClusterPolicySource(api, ns, informer_options=options)
    source.start()
    try:
        assert source.current().token(token_digest("sk-old")) is not None
        # the gateway may not list or watch tokens for a while (its watch ends within 1 s)
        kube.emulator.authorize = lambda e: not (e[3] == "arkstokens" and e[1] in ("list", "watch"))
        eventually(lambda: source._informers["ArksToken"].forbidden)
        rest.request(api, "DELETE", TOKENS.path(ns, "alice"))
        rest.request(api, "POST", TOKENS.path(ns), body=token(token_digest("sk-new")))
        kube.emulator.authorize = None
        eventually(lambda: source.current().token(token_digest("sk-new")) is not None)
        assert source.current().token(token_digest("sk-old")) is None
    finally:
        kube.emulator.authorize = None
        source.stop()


def test_a_deleted_token_held_by_a_finalizer_no_longer_authenticates(
    kube: RunningKubeEmulator, api: Any, ns: str
) -> None:
    """Deleting an ArksToken revokes it, even while a finalizer (a tenant may add any, and
    `--cascade=foreground` adds one) keeps the object, marked with a deletionTimestamp: the
    gateway counts a token being deleted as gone."""
    qos = [{"arksEndpoint": {"name": "m"}}]
    meta = {"name": "alice", "finalizers": ["tenant.example/keep"]}
    body = {"metadata": meta, "spec": {"tokenHash": token_digest("sk-alice"), "qos": qos}}
    rest.request(api, "POST", TOKENS.path(ns), body=body)
    source = ClusterPolicySource(api, ns, informer_options=FAST_INFORMERS)
    source.start()
    try:
        assert source.current().token(token_digest("sk-alice")) is not None
        rest.request(api, "DELETE", TOKENS.path(ns, "alice"))
        held = rest.request(api, "GET", TOKENS.path(ns, "alice"))
        assert held["metadata"]["deletionTimestamp"] and held["metadata"]["generation"] == 2
        eventually(lambda: source.current().token(token_digest("sk-alice")) is None)
    finally:
        source.stop()


def test_a_kind_the_gateway_may_not_read_leaves_the_others_served(
    kube: RunningKubeEmulator, api: Any, ns: str
) -> None:
    """Its RBAC missing one kind (or Envoy Gateway's Backend CRD not installed: 404), the
    gateway starts with the other kinds after its start timeout, and takes the missing kind in
    once it may read it (the informer asks again every forbidden_retry_s)."""
    qos = [{"arksEndpoint": {"name": "m"}}]
    body = {"metadata": {"name": "alice"}, "spec": {"tokenHash": token_digest("sk-a"), "qos": qos}}
    rest.request(api, "POST", TOKENS.path(ns), body=body)
    rest.request(api, "POST", ENDPOINTS.path(ns), body={"metadata": {"name": "m"}, "spec": {}})
    kube.emulator.authorize = lambda e: e[3] != "arksendpoints"
    options = {**FAST_INFORMERS, "forbidden_retry_s": 0.2}
    source = ClusterPolicySource(api, ns, informer_options=options)
    try:
        source.start(timeout_s=1.0)
        assert source.current().token(token_digest("sk-a")) is not None
        assert source.current().endpoint(ns, "m") is None
        kube.emulator.authorize = None
        eventually(lambda: source.current().endpoint(ns, "m") is not None)
    finally:
        kube.emulator.authorize = None
        source.stop()
