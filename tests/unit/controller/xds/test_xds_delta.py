"""Delta ADS bookkeeping for one stream, without sockets: resources travel one by one, with
their versions, and what went away is named."""

from __future__ import annotations

from controller.xds.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot
from controller.xds.delta import DeltaRequest, DeltaResponse, DeltaStreamState
from controller.xds.stream import Kind
from tests.support.xds import assignment, cluster, snapshot


def sent(response: DeltaResponse) -> list[str]:
    return [r.name for r in response.resources]


def acked_stream(snap: Snapshot) -> DeltaStreamState:
    """A stream subscribed as Envoy does (LDS/CDS wildcard, RDS/EDS by name) that ACKed all."""
    state = DeltaStreamState(node="n")
    for type_url, names in (
        (CLUSTER, ()),
        (ENDPOINT, ("a", "b")),
        (LISTENER, ()),
        (ROUTE, ("local",)),
    ):
        assert state.receive(DeltaRequest(type_url, subscribe=names)).kind is Kind.SUBSCRIBE
    for response in state.due(snap):
        assert state.receive(DeltaRequest(response.type_url, nonce=response.nonce)).kind is Kind.ACK
    return state


def test_a_new_stream_gets_what_it_subscribed_to_in_push_order_with_versions() -> None:
    snap = snapshot()
    state = DeltaStreamState(node="n")
    state.receive(DeltaRequest(LISTENER))
    state.receive(DeltaRequest(CLUSTER, subscribe=["*"]))
    state.receive(DeltaRequest(ENDPOINT, subscribe=["a"]))
    responses = state.due(snap)
    assert [(r.type_url, sent(r)) for r in responses] == [
        (CLUSTER, ["a", "b"]),
        (ENDPOINT, ["a"]),
        (LISTENER, ["ingress"]),
    ]
    assert responses[0].resources[0].version == snap.resource_versions[CLUSTER]["a"]
    assert responses[0].system_version == snap.versions[CLUSTER]
    assert len({r.nonce for r in responses}) == 3


def test_nothing_is_due_once_everything_is_acked() -> None:
    snap = snapshot()
    state = acked_stream(snap)
    assert state.due(snap) == []
    assert state.due(snapshot("relabelled")) == []


def test_one_changed_endpoint_assignment_travels_alone() -> None:
    state = acked_stream(snapshot())
    [response] = state.due(snapshot(weight=7))  # only "a"'s weight changed
    assert (response.type_url, sent(response), response.removed) == (ENDPOINT, ["a"], [])


def test_a_sent_cluster_brings_its_endpoints_so_it_can_warm() -> None:
    state = acked_stream(snapshot())
    changed = snapshot(clusters=[cluster("a"), {**cluster("b"), "connect_timeout": "3s"}])
    responses = state.due(changed)
    assert [(r.type_url, sent(r)) for r in responses] == [(CLUSTER, ["b"]), (ENDPOINT, ["b"])]


def test_a_resource_that_went_away_is_removed() -> None:
    state = acked_stream(snapshot())
    fewer = snapshot(clusters=[cluster("a")], endpoints=[assignment("a", 1001)])
    responses = state.due(fewer)
    assert [(r.type_url, sent(r), r.removed) for r in responses] == [
        (CLUSTER, [], ["b"]),
        (ENDPOINT, [], ["b"]),
    ]
    for response in responses:
        state.receive(DeltaRequest(response.type_url, nonce=response.nonce))
    assert state.due(fewer) == []  # said once


def test_a_name_the_snapshot_lacks_is_answered_as_absent_once() -> None:
    snap = snapshot()
    state = acked_stream(snap)
    state.receive(DeltaRequest(ENDPOINT, subscribe=["ghost"]))
    [response] = state.due(snap)
    assert (sent(response), response.removed) == ([], ["ghost"])
    assert state.due(snap) == []
    arrived = snapshot(
        endpoints=[assignment("a", 1001), assignment("b", 1002), assignment("ghost", 1003)]
    )
    [response] = state.due(arrived)
    assert sent(response) == ["ghost"]


def test_a_nack_keeps_envoys_versions_and_the_refused_one_is_not_sent_again() -> None:
    state = acked_stream(snapshot())
    bad = snapshot("bad", weight=9)
    [response] = state.due(bad)
    received = state.receive(DeltaRequest(ENDPOINT, nonce=response.nonce, error="no"))
    assert (received.kind, received.version, received.message) == (
        Kind.NACK,
        bad.versions[ENDPOINT],
        "no",
    )
    assert state.due(bad) == []
    [fixed] = state.due(snapshot("fixed", weight=2))
    assert sent(fixed) == ["a"]
    # Back to what Envoy kept (the version before the NACK): nothing to send.
    state.receive(DeltaRequest(ENDPOINT, nonce=fixed.nonce, error="again"))
    assert state.due(snapshot()) == []


def test_a_reconnecting_envoy_gets_only_what_changed_since_its_versions() -> None:
    old = snapshot()
    new = snapshot(weight=3)
    state = DeltaStreamState(node="n")
    held = dict(old.resource_versions[ENDPOINT])
    state.receive(DeltaRequest(CLUSTER, initial_versions=dict(old.resource_versions[CLUSTER])))
    state.receive(DeltaRequest(ENDPOINT, subscribe=["a", "b"], initial_versions=held))
    [response] = state.due(new)
    assert (response.type_url, sent(response)) == (ENDPOINT, ["a"])


def test_subscribing_again_resends_and_unsubscribing_stops_updates() -> None:
    snap = snapshot()
    state = acked_stream(snap)
    state.receive(DeltaRequest(ENDPOINT, subscribe=["b"]))  # e.g. a replaced cluster warming
    [response] = state.due(snap)
    assert sent(response) == ["b"]
    state.receive(DeltaRequest(ENDPOINT, nonce=response.nonce))
    state.receive(DeltaRequest(ENDPOINT, unsubscribe=["a"]))
    assert state.due(snapshot(weight=5)) == []  # only "a" changed, and nobody wants it


def test_an_unknown_nonce_is_a_subscription_change_not_an_ack() -> None:
    state = DeltaStreamState(node="n")
    received = state.receive(DeltaRequest(CLUSTER, nonce="41"))
    assert received.kind is Kind.SUBSCRIBE
    assert [r.type_url for r in state.due(snapshot())] == [CLUSTER]
