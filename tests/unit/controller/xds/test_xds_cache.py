"""The xDS cache and the per-stream protocol bookkeeping, without sockets."""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import any_pb2

from arks import envoy_config
from arks.policy import load_policy_file
from controller.xds.cache import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    RESOURCE_TYPES,
    ROUTE,
    Snapshot,
    SnapshotCache,
    SnapshotError,
    snapshot_from_json,
    snapshot_from_messages,
)
from controller.xds.stream import Kind, StreamState, XdsRequest
from tests.support.paths import DEMO_POLICY
from tests.support.xds import cluster, snapshot

# --- snapshots ---------------------------------------------------------------------------------


def test_the_rendered_gateway_config_parses_with_its_nested_extension_types() -> None:
    policy = load_policy_file(DEMO_POLICY)
    settings = envoy_config.EnvoySettings(listen_port=8080, admin_port=9901, extproc_port=9002)
    resources = {
        LISTENER: [envoy_config.listener(settings)],
        ROUTE: [envoy_config.route_configuration(policy, settings)],
        CLUSTER: [envoy_config.extproc_cluster(settings)],
    }
    snap = snapshot_from_json(policy.version, resources)
    assert snap.names(LISTENER) == {r["name"] for r in resources[LISTENER]}
    assert snap.names(ROUTE) == {envoy_config.ROUTE_CONFIG}
    assert [a.type_url for a in snap.packed(CLUSTER)] == [CLUSTER]


def test_versions_are_per_type_content_hashes() -> None:
    first, same, heavier = snapshot("v1"), snapshot("v2"), snapshot("v3", weight=5)
    assert first.versions == same.versions  # the label does not matter, the content does
    changed = {t for t in RESOURCE_TYPES if first.versions[t] != heavier.versions[t]}
    assert changed == {ENDPOINT}


def test_resource_order_does_not_change_the_version() -> None:
    forward = snapshot(clusters=[cluster("a"), cluster("b")])
    backward = snapshot(clusters=[cluster("b"), cluster("a")])
    assert forward.versions[CLUSTER] == backward.versions[CLUSTER]


def test_packed_resources_are_sorted_and_filtered_by_name() -> None:
    snap = snapshot()
    assert [a.type_url for a in snap.packed(ENDPOINT)] == [ENDPOINT, ENDPOINT]
    only_b = snap.packed(ENDPOINT, {"b", "missing"})
    assert len(only_b) == 1
    unpacked = endpoint_pb2.ClusterLoadAssignment()
    assert only_b[0].Unpack(unpacked) and unpacked.cluster_name == "b"
    assert snap.packed(LISTENER, set()) == []


def test_messages_and_anys_make_the_same_snapshot() -> None:
    message = cluster_pb2.Cluster(name="a", type=cluster_pb2.Cluster.EDS)
    packed = any_pb2.Any()
    packed.Pack(message)
    from_message = Snapshot("v", {CLUSTER: {"a": message}})
    from_any = Snapshot("v", {CLUSTER: {"a": packed}})
    assert from_message.versions == from_any.versions
    assert snapshot_from_messages("v", {CLUSTER: [message]}).versions == from_message.versions


@pytest.mark.parametrize(
    ("resources", "error"),
    [
        ({CLUSTER: [cluster("a"), cluster("a")]}, "'a': given twice"),
        ({CLUSTER: [{"type": "EDS"}]}, "has no name"),
        ({CLUSTER: [{"name": "a", "lb_policy": "NO_SUCH_POLICY"}]}, "Cluster 'a'"),
        ({CLUSTER: [{"name": "a", "no_such_field": 1}]}, "no_such_field"),
        ({CLUSTER: [{"@type": LISTENER, "name": "a"}]}, "declares @type"),
        ({"type.googleapis.com/envoy.NotAType": [{"name": "a"}]}, "unknown resource type"),
        (
            {
                LISTENER: [
                    {
                        "name": "l",
                        "listener_filters": [
                            {
                                "name": "x",
                                "typed_config": {"@type": "type.googleapis.com/no.such.Type"},
                            }
                        ],
                    }
                ]
            },
            "no.such.Type",
        ),
    ],
)
def test_malformed_resources_are_refused_with_their_name(
    resources: dict[str, Any], error: str
) -> None:
    with pytest.raises(SnapshotError, match=re.escape(error)):
        snapshot_from_json("v", resources)


def test_a_resource_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(SnapshotError, match=re.escape("is a envoy.config.cluster.v3.Cluster")):
        Snapshot("v", {LISTENER: {"a": cluster_pb2.Cluster(name="a")}})


# --- the cache ---------------------------------------------------------------------------------


def test_nodes_get_the_default_unless_they_have_their_own() -> None:
    cache = SnapshotCache()
    assert cache.get("any") is None
    default, special = snapshot("default"), snapshot("special", weight=3)
    cache.set(default)
    cache.set(special, node_id="canary")
    assert cache.get("any") is default
    assert cache.get("canary") is special
    cache.clear("canary")
    assert cache.get("canary") is default
    assert cache.generation == 3


async def test_waiters_wake_on_a_change_made_from_another_thread() -> None:
    cache = SnapshotCache(snapshot())
    seen = cache.generation
    assert await cache.wait(seen - 1) == seen  # already moved on: no waiting
    waiter = asyncio.create_task(cache.wait(seen))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    threading.Thread(target=cache.set, args=(snapshot("v2"),)).start()
    assert await asyncio.wait_for(waiter, 2) == seen + 1


async def test_a_cancelled_waiter_is_forgotten() -> None:
    cache = SnapshotCache()
    waiter = asyncio.create_task(cache.wait(cache.generation))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    cache.set(snapshot())
    assert cache._waiters == []


# --- one stream --------------------------------------------------------------------------------


def subscribed_stream(snap: Snapshot) -> tuple[StreamState, dict[str, str]]:
    """A stream that subscribed to all four types and ACKed everything; returns the nonces."""
    state = StreamState(node="n")
    for type_url, names in (
        (CLUSTER, ()),
        (ENDPOINT, ("a", "b")),
        (LISTENER, ()),
        (ROUTE, ("local",)),
    ):
        assert state.receive(XdsRequest(type_url, names)).kind is Kind.SUBSCRIBE
    nonces = {r.type_url: r.nonce for r in state.due(snap)}
    for type_url, nonce in nonces.items():
        received = state.receive(
            XdsRequest(type_url, _names(type_url), snap.versions[type_url], nonce)
        )
        assert received.kind is Kind.ACK
    return state, nonces


def _names(type_url: str) -> tuple[str, ...]:
    return {ENDPOINT: ("a", "b"), ROUTE: ("local",)}.get(type_url, ())


def test_a_new_stream_gets_every_subscribed_type_in_push_order() -> None:
    snap = snapshot()
    state = StreamState(node="n")
    state.receive(XdsRequest(LISTENER))
    state.receive(XdsRequest(CLUSTER, ["*"]))
    responses = state.due(snap)
    assert [r.type_url for r in responses] == [CLUSTER, LISTENER]
    assert [len(r.resources) for r in responses] == [2, 1]
    assert [r.version for r in responses] == [snap.versions[CLUSTER], snap.versions[LISTENER]]
    assert len({r.nonce for r in responses}) == 2


def test_nothing_is_due_once_everything_is_acked() -> None:
    snap = snapshot()
    state, _ = subscribed_stream(snap)
    assert state.due(snap) == []
    assert state.due(snapshot("relabelled")) == []


def test_an_endpoint_change_sends_only_endpoints() -> None:
    state, _ = subscribed_stream(snapshot())
    responses = state.due(snapshot(weight=7))
    assert [r.type_url for r in responses] == [ENDPOINT]


def test_a_cluster_change_resends_endpoints_so_replaced_clusters_can_warm() -> None:
    state, _ = subscribed_stream(snapshot())
    changed = snapshot(clusters=[cluster("a"), {**cluster("b"), "connect_timeout": "3s"}])
    assert [r.type_url for r in state.due(changed)] == [CLUSTER, ENDPOINT]


def test_named_types_send_what_was_asked_for_and_answer_a_change_of_names() -> None:
    snap = snapshot()
    state, nonces = subscribed_stream(snap)
    state.receive(XdsRequest(ENDPOINT, ["a"], snap.versions[ENDPOINT], nonces[ENDPOINT]))
    [response] = state.due(snap)
    assert (response.type_url, len(response.resources)) == (ENDPOINT, 1)
    state.receive(XdsRequest(ENDPOINT, [], snap.versions[ENDPOINT], response.nonce))
    assert state.due(snap) == []  # Envoy wants no endpoints now


def test_a_nack_names_the_rejected_version_and_it_is_not_sent_again() -> None:
    good = snapshot()
    state, _ = subscribed_stream(good)
    bad = snapshot("bad", weight=9)
    [response] = state.due(bad)
    received = state.receive(
        XdsRequest(ENDPOINT, ["a", "b"], good.versions[ENDPOINT], response.nonce, error="no")
    )
    assert (received.kind, received.version, received.message) == (
        Kind.NACK,
        bad.versions[ENDPOINT],
        "no",
    )
    assert state.due(bad) == []
    assert [r.type_url for r in state.due(snapshot("fixed", weight=2))] == [ENDPOINT]


def test_a_request_for_an_older_response_is_stale() -> None:
    snap = snapshot()
    state, nonces = subscribed_stream(snap)
    state.due(snapshot(weight=4))  # a newer endpoints response is on its way
    received = state.receive(XdsRequest(ENDPOINT, ["a"], snap.versions[ENDPOINT], nonces[ENDPOINT]))
    assert received.kind is Kind.STALE
    assert state.due(snapshot(weight=4)) == []  # the stale request's names were not taken


def test_a_reconnecting_envoy_with_an_old_nonce_is_answered() -> None:
    snap = snapshot()
    state = StreamState(node="n")
    received = state.receive(XdsRequest(CLUSTER, (), snap.versions[CLUSTER], nonce="41"))
    assert received.kind is Kind.SUBSCRIBE
    assert [r.type_url for r in state.due(snap)] == [CLUSTER]


def test_no_snapshot_means_no_responses() -> None:
    state = StreamState(node="n")
    state.receive(XdsRequest(LISTENER))
    assert state.due(None) == []
    state.receive(
        XdsRequest("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", ["x"])
    )
    assert [r.type_url for r in state.due(snapshot())] == [LISTENER]
