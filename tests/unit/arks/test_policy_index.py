"""The incremental cluster policy is build_policy's, one change at a time: after any sequence of
adds, updates and deletes of tokens, endpoints, quotas and Backends, the index's snapshot and
warnings equal build_policy over all the objects then present (the contract test)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from arks import api
from arks.api import ObjectKey, token_digest
from arks.policy import Policy, build_policy
from arks.policy_index import BACKEND, ENDPOINT, QUOTA, TOKEN, PolicyIndex, where

PARSERS = {
    TOKEN: ("arks.ai/v1", api.parse_token),
    ENDPOINT: ("arks.ai/v1", api.parse_endpoint),
    QUOTA: ("arks.ai/v1", api.parse_quota),
    BACKEND: ("gateway.envoyproxy.io/v1alpha1", api.parse_backend),
}
NAMESPACES = ("a", "b")
NAMES = ("x", "y", "z")
DIGESTS = tuple(token_digest(f"sk-{i}") for i in range(3))  # few: clashes are common


def meta(name: str, namespace: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace}


@st.composite
def token_obj(draw: st.DrawFn, name: str, namespace: str) -> dict[str, Any]:
    qos = [
        {
            "arksEndpoint": {"name": endpoint},
            **({"quota": {"name": draw(st.sampled_from(NAMES))}} if draw(st.booleans()) else {}),
        }
        for endpoint in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=2))
    ]
    spec: dict[str, Any] = {"qos": qos, "disabled": draw(st.booleans())}
    obj: dict[str, Any] = {"metadata": meta(name, namespace), "spec": spec}
    source = draw(st.sampled_from(["hash", "secret", "plain", "broken"]))
    if source == "hash":
        spec["tokenHash"] = draw(st.sampled_from(DIGESTS))
    elif source == "plain":
        spec["token"] = f"sk-{draw(st.integers(0, 2))}"
    elif source == "broken":
        spec["tokenHash"] = "not-a-digest"  # does not parse: left out
    else:
        spec["tokenSecretRef"] = {"name": draw(st.sampled_from(("s1", "s2")))}
        if draw(st.booleans()):  # the controller published a digest (maybe for another Secret)
            obj["status"] = {
                "tokenHash": draw(st.sampled_from(DIGESTS)),
                "tokenHashSecret": {"name": draw(st.sampled_from(("s1", "s2"))), "key": "token"},
            }
    return obj


@st.composite
def endpoint_obj(draw: st.DrawFn, name: str, namespace: str) -> dict[str, Any]:
    refs = [
        {"group": "gateway.envoyproxy.io", "kind": "Backend", "name": b}
        for b in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=2))
    ]
    return {"metadata": meta(name, namespace), "spec": {"routeConfigs": refs}}


@st.composite
def quota_obj(draw: st.DrawFn, name: str, namespace: str) -> dict[str, Any]:
    value = draw(st.integers(0, 3))
    return {
        "metadata": meta(name, namespace),
        "spec": {"quotas": [{"type": "total", "value": value}]},
    }


@st.composite
def backend_obj(draw: st.DrawFn, name: str, namespace: str) -> dict[str, Any]:
    port = draw(st.sampled_from((1, 2)))
    endpoints = [{"ip": {"address": "10.0.0.1", "port": port}}]
    return {"metadata": meta(name, namespace), "spec": {"endpoints": endpoints}}


BUILDERS = {TOKEN: token_obj, ENDPOINT: endpoint_obj, QUOTA: quota_obj, BACKEND: backend_obj}


@st.composite
def event(draw: st.DrawFn) -> tuple[str, str, str, dict[str, Any] | None]:
    kind = draw(st.sampled_from(tuple(BUILDERS)))
    namespace, name = draw(st.sampled_from(NAMESPACES)), draw(st.sampled_from(NAMES))
    if draw(st.integers(0, 4)) == 0:
        return kind, namespace, name, None  # deleted
    return kind, namespace, name, draw(BUILDERS[kind](name, namespace))


def typed(kind: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    return {**obj, "apiVersion": PARSERS[kind][0], "kind": kind}


def parse(kind: str, obj: Mapping[str, Any] | None) -> Any | None:
    if obj is None:
        return None
    try:
        return PARSERS[kind][1](typed(kind, obj))
    except api.ObjectError:
        return None  # left out, as the cluster source leaves it out


def from_scratch(objects: Mapping[tuple[str, str, str], dict[str, Any]]) -> Policy:
    """What the cluster source built before: every valid object, in one order, built whole."""
    valid = []
    for kind, namespace, name in sorted(objects):
        obj = typed(kind, objects[(kind, namespace, name)])
        if parse(kind, obj) is not None:
            valid.append((where(kind, ObjectKey(namespace, name)), obj))
    return build_policy(valid, drop_duplicate_tokens=True)


@settings(max_examples=400, deadline=None)
@given(st.lists(event(), max_size=40))
def test_the_index_equals_build_policy_after_any_sequence_of_changes(
    events: list[tuple[str, str, str, dict[str, Any] | None]],
) -> None:
    index = PolicyIndex()
    objects: dict[tuple[str, str, str], dict[str, Any]] = {}
    for step, (kind, namespace, name, obj) in enumerate(events):
        if obj is None:
            objects.pop((kind, namespace, name), None)
        else:
            objects[(kind, namespace, name)] = obj
        index.apply(kind, ObjectKey(namespace, name), parse(kind, obj))
        if step % 3 == 0 or step == len(events) - 1:  # snapshots between bursts, too
            expected = from_scratch(objects)
            got = index.snapshot(str(step))
            assert got.tokens_by_digest == expected.tokens_by_digest
            assert got.endpoints == expected.endpoints
            assert got.quotas == expected.quotas
            assert got.backends == expected.backends
            assert index.warnings() == sorted(expected.warnings)


def test_an_unchanged_object_changes_nothing_and_unchanged_maps_are_shared() -> None:
    index = PolicyIndex()
    token = api.parse_token(
        typed(TOKEN, {"metadata": meta("x", "a"), "spec": {"tokenHash": DIGESTS[0]}})
    )
    quota = api.parse_quota(
        typed(
            QUOTA, {"metadata": meta("q", "a"), "spec": {"quotas": [{"type": "total", "value": 1}]}}
        )
    )
    assert index.apply(TOKEN, token.key, token)
    assert index.apply(QUOTA, quota.key, quota)
    first = index.snapshot("1")
    assert not index.apply(TOKEN, token.key, token)  # equal value: no change
    other = api.parse_token(
        typed(TOKEN, {"metadata": meta("y", "a"), "spec": {"tokenHash": DIGESTS[1]}})
    )
    assert index.apply(TOKEN, other.key, other)
    second = index.snapshot("2")
    assert second.quotas is first.quotas  # a token change copies only the token map
    assert first.tokens_by_digest.keys() == {DIGESTS[0]}  # an old snapshot never changes
    assert second.tokens_by_digest.keys() == {DIGESTS[0], DIGESTS[1]}
