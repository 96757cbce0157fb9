"""The controller machinery against the Kubernetes API emulator, through the real client.

A toy reconcile (ArksApplication → ConfigMap child + status + event) exercises the pieces as a
real controller will: informer → queue → worker → server-side apply → status subresource.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client import ApiClient

from arks.adapters.kube import rest
from arks.adapters.kube.apply import (
    delete,
    ensure_finalizer,
    patch_status,
    remove_finalizer,
    server_side_apply,
    set_owner,
)
from arks.adapters.kube.conditions import find_condition, set_condition
from arks.adapters.kube.errors import TemporaryError
from arks.adapters.kube.events import record_event
from arks.adapters.kube.leader import LeaderElector
from arks.adapters.kube.queue import Key, WorkQueue
from arks.adapters.kube.runner import Controller
from arks.adapters.kube.watch import Informer, watch_owned
from arks.resources import APPLICATIONS, CONFIGMAPS, EVENTS, LEASES, Resource
from controller.metrics import ControllerMetrics
from tests.support.kube import FAST_INFORMERS, RunningKubeEmulator, eventually
from tests.support.kube import get_object as get
from tests.support.stall_proxy import stall_proxy

FINALIZER = "arks.ai/cleanup"
MANAGER = "arks-controller"

pytestmark = pytest.mark.timeout(60)


def create_app(api: ApiClient, ns: str, name: str, **spec: Any) -> dict[str, Any]:
    body = {"apiVersion": "arks.ai/v1", "kind": "ArksApplication", "metadata": {"name": name}}
    return rest.request(api, "POST", APPLICATIONS.path(ns), body={**body, "spec": spec})


# --- informer -----------------------------------------------------------------------------


def test_informer_sees_added_modified_deleted_and_keeps_its_cache(api: ApiClient, ns: str) -> None:
    create_app(api, ns, "before")
    seen: list[tuple[str, str]] = []
    informer = Informer(api, APPLICATIONS, ns, **FAST_INFORMERS)
    informer.add_handler(lambda kind, obj: seen.append((kind, obj["metadata"]["name"])))
    informer.start()
    try:
        assert informer.wait_synced(5)
        assert informer.keys() == [(ns, "before")]
        create_app(api, ns, "app", replicas=1)
        rest.request(
            api,
            "PATCH",
            APPLICATIONS.path(ns, "app"),
            body={"spec": {"replicas": 2}},
            content_type=rest.MERGE_PATCH,
        )
        eventually(lambda: (informer.get((ns, "app")) or {}).get("spec") == {"replicas": 2})
        rest.request(api, "DELETE", APPLICATIONS.path(ns, "app"))
        eventually(lambda: ("DELETED", "app") in seen)
    finally:
        informer.stop()

    assert seen == [("ADDED", "before"), ("ADDED", "app"), ("MODIFIED", "app"), ("DELETED", "app")]
    assert informer.get((ns, "app")) is None


def test_informer_resync_re_enqueues_every_known_key(api: ApiClient, ns: str) -> None:
    create_app(api, ns, "a")
    create_app(api, ns, "b")
    queue = WorkQueue()
    informer = Informer(api, APPLICATIONS, ns, **{**FAST_INFORMERS, "resync_s": 0.2})
    informer.add_handler(lambda kind, obj: queue.add((ns, obj["metadata"]["name"])))
    informer.start()
    try:
        assert informer.wait_synced(5)
        first = {queue.get(1), queue.get(1)}
        for key in first:
            assert key is not None
            queue.done(key)
        again = {queue.get(2), queue.get(2)}  # nothing changed: only the resync adds them
    finally:
        informer.stop()

    assert first == again == {(ns, "a"), (ns, "b")}


# --- a toy controller ---------------------------------------------------------------------


class ToyReconciler:
    """ArksApplication → ConfigMap `<name>-config`, a Ready condition and an event."""

    def __init__(self, api: ApiClient, informer: Informer) -> None:
        self.api = api
        self.informer = informer
        self.calls: list[Key] = []

    def __call__(self, key: Key) -> None:
        self.calls.append(key)
        namespace, name = key
        app = get(
            self.api, APPLICATIONS, namespace, name
        )  # read fresh, the cache may lag our writes
        if app is None:
            return
        if app["metadata"].get("deletionTimestamp"):
            remove_finalizer(self.api, APPLICATIONS, app, FINALIZER)
            return
        app = ensure_finalizer(self.api, APPLICATIONS, app, FINALIZER)
        child = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": f"{name}-config",
                "namespace": namespace,
                # watch_owned caches only what is labelled as the controller's
                "labels": {"app.kubernetes.io/managed-by": "arks"},
            },
            "data": {"replicas": str(app["spec"].get("replicas", 1))},
        }
        server_side_apply(self.api, CONFIGMAPS, set_owner(child, app), MANAGER)
        conditions = set_condition(
            (app.get("status") or {}).get("conditions"),
            "Ready",
            "True",
            "Applied",
            "config applied",
            app["metadata"]["generation"],
            datetime.datetime.now(datetime.UTC),
        )
        if conditions != (app.get("status") or {}).get("conditions"):
            patch_status(self.api, APPLICATIONS, namespace, name, {"conditions": conditions})
            record_event(self.api, app, "Normal", "Applied", "config applied", MANAGER)


@pytest.fixture
def toy(api: ApiClient, ns: str) -> Iterator[tuple[Controller, ToyReconciler]]:
    queue = WorkQueue(max_delay_s=0.5)
    informer = Informer(api, APPLICATIONS, ns, **FAST_INFORMERS)
    children = watch_owned(
        api, CONFIGMAPS, queue, "arks.ai/v1", "ArksApplication", ns, **FAST_INFORMERS
    )
    reconciler = ToyReconciler(api, informer)
    controller = Controller("toy", informer, reconciler, workers=2, queue=queue, owned=[children])
    controller.start()
    try:
        yield controller, reconciler
    finally:
        controller.stop()


def test_reconcile_applies_an_owned_child_sets_status_and_records_an_event(
    api: ApiClient, ns: str, toy: tuple[Controller, ToyReconciler]
) -> None:
    app = create_app(api, ns, "llama", replicas=3)

    child = eventually(lambda: get(api, CONFIGMAPS, ns, "llama-config"))
    status = eventually(lambda: (get(api, APPLICATIONS, ns, "llama") or {}).get("status"))

    assert child["data"] == {"replicas": "3"}
    (ref,) = child["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"]) == (
        "ArksApplication",
        "llama",
        app["metadata"]["uid"],
    )
    assert ref["controller"] is True and ref["blockOwnerDeletion"] is True
    ready = find_condition(status["conditions"], "Ready")
    assert ready is not None and (ready["status"], ready["observedGeneration"]) == ("True", 1)
    events = eventually(
        lambda: rest.request(api, "GET", EVENTS.path(ns))["items"]
    )  # after the status
    assert [(e["reason"], e["involvedObject"]["name"]) for e in events] == [("Applied", "llama")]


def test_reconciling_twice_changes_nothing(
    api: ApiClient, ns: str, toy: tuple[Controller, ToyReconciler]
) -> None:
    _, reconciler = toy
    create_app(api, ns, "llama", replicas=1)
    eventually(lambda: (get(api, APPLICATIONS, ns, "llama") or {}).get("status"))
    time.sleep(0.3)  # let the wake-ups from our own writes settle
    child_rv = get(api, CONFIGMAPS, ns, "llama-config")["metadata"]["resourceVersion"]  # type: ignore[index]
    app_rv = get(api, APPLICATIONS, ns, "llama")["metadata"]["resourceVersion"]  # type: ignore[index]

    reconciler((ns, "llama"))
    reconciler((ns, "llama"))

    assert get(api, CONFIGMAPS, ns, "llama-config")["metadata"]["resourceVersion"] == child_rv  # type: ignore[index]
    assert get(api, APPLICATIONS, ns, "llama")["metadata"]["resourceVersion"] == app_rv  # type: ignore[index]


def test_a_deleted_child_is_recreated_through_the_owned_watch(
    api: ApiClient, ns: str, toy: tuple[Controller, ToyReconciler]
) -> None:
    create_app(api, ns, "llama")
    old = eventually(lambda: get(api, CONFIGMAPS, ns, "llama-config"))

    rest.request(api, "DELETE", CONFIGMAPS.path(ns, "llama-config"))

    new = eventually(
        lambda: (
            (c := get(api, CONFIGMAPS, ns, "llama-config"))
            and c["metadata"]["uid"] != old["metadata"]["uid"]
            and c
        )
    )
    assert new["data"] == old["data"]


def test_a_spec_change_is_reconciled_into_the_child(
    api: ApiClient, ns: str, toy: tuple[Controller, ToyReconciler]
) -> None:
    create_app(api, ns, "llama", replicas=1)
    eventually(lambda: get(api, CONFIGMAPS, ns, "llama-config"))

    rest.request(
        api,
        "PATCH",
        APPLICATIONS.path(ns, "llama"),
        body={"spec": {"replicas": 4}},
        content_type=rest.MERGE_PATCH,
    )

    eventually(
        lambda: (get(api, CONFIGMAPS, ns, "llama-config") or {}).get("data") == {"replicas": "4"}
    )


def test_the_finalizer_holds_deletion_until_the_reconcile_removes_it(
    api: ApiClient, ns: str, toy: tuple[Controller, ToyReconciler]
) -> None:
    create_app(api, ns, "llama")
    eventually(
        lambda: (
            FINALIZER
            in (get(api, APPLICATIONS, ns, "llama") or {}).get("metadata", {}).get("finalizers", [])
        )
    )
    eventually(lambda: get(api, CONFIGMAPS, ns, "llama-config"))

    rest.request(api, "DELETE", APPLICATIONS.path(ns, "llama"))

    eventually(lambda: get(api, APPLICATIONS, ns, "llama") is None)
    # and the garbage collector takes the owned child with it
    eventually(lambda: get(api, CONFIGMAPS, ns, "llama-config") is None)


def test_a_conflict_is_a_temporary_error_that_is_retried_until_it_succeeds(
    api: ApiClient, ns: str
) -> None:
    stale = create_app(api, ns, "llama", replicas=1)
    rest.request(
        api,
        "PATCH",
        APPLICATIONS.path(ns, "llama"),
        body={"spec": {"replicas": 2}},
        content_type=rest.MERGE_PATCH,
    )
    errors: list[Exception] = []

    def reconcile(key: Key) -> None:
        obj = stale if not errors else get(api, APPLICATIONS, *key)
        assert obj is not None
        try:
            ensure_finalizer(api, APPLICATIONS, obj, FINALIZER)
        except TemporaryError as e:
            errors.append(e)
            raise

    informer = Informer(api, APPLICATIONS, ns, **FAST_INFORMERS)
    controller = Controller("conflict", informer, reconcile, queue=WorkQueue(max_delay_s=0.2))
    controller.start()
    try:
        eventually(
            lambda: (
                FINALIZER
                in (get(api, APPLICATIONS, ns, "llama") or {})["metadata"].get("finalizers", [])
            )
        )
    finally:
        controller.stop()

    assert len(errors) == 1 and "409" in str(errors[0])
    assert controller.queue.num_requeues((ns, "llama")) == 0  # success reset the backoff


def test_a_permanent_error_is_not_retried(api: ApiClient, ns: str) -> None:
    from arks.adapters.kube.errors import PermanentError

    calls: list[Key] = []

    def reconcile(key: Key) -> None:
        calls.append(key)
        raise PermanentError("spec names an unknown runtime")

    create_app(api, ns, "bad")
    informer = Informer(api, APPLICATIONS, ns, **FAST_INFORMERS)
    controller = Controller("permanent", informer, reconcile)
    controller.start()
    try:
        eventually(lambda: calls)
        time.sleep(0.3)
    finally:
        controller.stop()

    assert calls == [(ns, "bad")]


def test_events_for_the_same_occurrence_aggregate_into_one_with_a_count(
    api: ApiClient, ns: str
) -> None:
    app = create_app(api, ns, "llama")

    record_event(api, app, "Warning", "Degraded", "1/2 replicas ready", MANAGER)
    record_event(api, app, "Warning", "Degraded", "1/2 replicas ready", MANAGER)
    record_event(api, app, "Normal", "Ready", "2/2 replicas ready", MANAGER)

    events = rest.request(api, "GET", EVENTS.path(ns))["items"]
    assert sorted((e["reason"], e["count"]) for e in events) == [("Degraded", 2), ("Ready", 1)]
    assert all(e["involvedObject"]["uid"] == app["metadata"]["uid"] for e in events)


# --- leader election ----------------------------------------------------------------------


def test_exactly_one_elector_leads_and_the_other_takes_over_when_it_stops(
    api: ApiClient, ns: str
) -> None:
    electors = [
        LeaderElector(api, ns, "arks-controller", identity, lease_s=1.0, renew_s=0.1)
        for identity in ("a", "b")
    ]
    for elector in electors:
        elector.start()
    try:
        leader = eventually(lambda: next((e for e in electors if e.is_leader()), None))
        for _ in range(10):  # it stays so while it renews
            assert [e.is_leader() for e in electors].count(True) == 1
            assert leader.is_leader()
            time.sleep(0.05)
        follower = next(e for e in electors if e is not leader)

        leader.stop()

        assert follower.wait_leader(3)
        assert not leader.is_leader()
        lease = rest.request(api, "GET", LEASES.path(ns, "arks-controller"))
        assert lease["spec"]["holderIdentity"] == follower.identity
        assert lease["spec"]["leaseTransitions"] == 1
    finally:
        for elector in electors:
            elector.stop()


def test_a_follower_takes_over_an_expired_lease_of_a_crashed_leader(
    api: ApiClient, ns: str
) -> None:
    crashed = LeaderElector(api, ns, "lease", "crashed", lease_s=1.0, renew_s=0.1)
    assert crashed.try_acquire_or_renew()  # then never renews again
    follower = LeaderElector(api, ns, "lease", "follower", lease_s=1.0, renew_s=0.1)

    assert not follower.try_acquire_or_renew()
    started = time.monotonic()
    eventually(follower.try_acquire_or_renew, timeout_s=3)

    assert time.monotonic() - started >= 0.9  # not before the lease's duration
    assert not crashed.try_acquire_or_renew()  # its renewal now fails: it stops leading


def test_a_leader_whose_lease_calls_hang_stops_leading_before_a_follower_takes_over(
    kube: RunningKubeEmulator, api: ApiClient, ns: str
) -> None:
    """The API server stalls the leader's calls (they would take up to 30 s against a 1 s lease):
    the leader stops leading at its renew deadline, while its call still hangs, and only after
    that can the follower take the lease: never two leaders at once."""
    with stall_proxy(kube.url) as proxy:
        import kubernetes.client

        stalled_api = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=proxy.url))
        leader = LeaderElector(stalled_api, ns, "lease", "stalled", lease_s=1.0, renew_s=0.1)
        follower = LeaderElector(api, ns, "lease", "follower", lease_s=1.0, renew_s=0.1)
        leader.start()
        try:
            assert leader.wait_leader(3)
            follower.start()
            proxy.stalled = True
            stalled_at = time.monotonic()
            both: list[float] = []
            while not follower.is_leader() and time.monotonic() - stalled_at < 5:
                if leader.is_leader() and follower.is_leader():
                    both.append(time.monotonic() - stalled_at)
                time.sleep(0.01)
            assert follower.is_leader()
            assert not leader.is_leader() and both == []
            # it let go within its deadline (2/3 of the lease), not when the call returned
            assert time.monotonic() - stalled_at >= 0.9  # the follower waited the lease out
        finally:
            proxy.stalled = False
            follower.stop()
            leader.stop()
            stalled_api.close()


def test_workers_reconcile_only_while_leading(api: ApiClient, ns: str) -> None:
    create_app(api, ns, "llama")
    calls: list[Key] = []

    class Switch:
        leading = threading.Event()

        def is_leader(self) -> bool:
            return self.leading.is_set()

    switch = Switch()
    informer = Informer(api, APPLICATIONS, ns, **FAST_INFORMERS)
    controller = Controller("gated", informer, calls.append, leader=switch, poll_s=0.02)
    controller.start()
    try:
        assert informer.wait_synced(5)
        time.sleep(0.2)
        assert calls == []
        switch.leading.set()
        eventually(lambda: calls == [(ns, "llama")])
    finally:
        controller.stop()


def test_queue_wait_is_the_time_from_the_watch_event_to_the_reconcile(
    api: ApiClient, ns: str
) -> None:
    """`arks_controller_queue_wait_seconds`: a key queued while no worker may take it (this
    replica does not lead yet) waited at least that long; one taken at once waited little."""
    calls: list[Key] = []

    class Switch:
        leading = threading.Event()

        def is_leader(self) -> bool:
            return self.leading.is_set()

    switch = Switch()
    metrics = ControllerMetrics()
    informer = Informer(api, APPLICATIONS, ns, **FAST_INFORMERS)
    controller = Controller("waits", informer, calls.append, leader=switch, poll_s=0.02)
    controller.instrument(metrics)
    metrics.known("waits")

    def waited(sample: str) -> float:
        value = metrics.registry.get_sample_value(
            f"arks_controller_queue_wait_seconds_{sample}", {"controller": "waits"}
        )
        assert value is not None
        return value

    controller.start()
    try:
        assert informer.wait_synced(5)
        assert waited("count") == 0
        create_app(api, ns, "llama")
        depth = {"controller": "waits"}
        eventually(
            lambda: metrics.registry.get_sample_value("arks_controller_queue_depth", depth) == 1
        )
        held_s = 1.0
        time.sleep(held_s)
        switch.leading.set()
        eventually(lambda: calls == [(ns, "llama")])
        assert waited("count") == 1
        assert waited("sum") >= held_s
        create_app(api, ns, "qwen")  # taken as soon as the watch delivers it
        eventually(lambda: len(calls) == 2)
        assert waited("count") == 2
        quick = metrics.registry.get_sample_value(
            "arks_controller_queue_wait_seconds_bucket", {"controller": "waits", "le": "0.5"}
        )
        assert quick == 1  # the second one, not the one held for a second
    finally:
        controller.stop()


def test_discovery_tells_which_optional_crds_are_installed(api: ApiClient) -> None:
    assert rest.serves(api, Resource("leaderworkerset.x-k8s.io", "v1", "leaderworkersets"))
    assert rest.serves(api, Resource("", "v1", "services"))
    assert not rest.serves(api, Resource("leaderworkerset.x-k8s.io", "v1", "widgets"))
    assert not rest.serves(api, Resource("example.invalid", "v1", "widgets"))


def test_a_delete_with_a_uid_precondition_spares_a_re_created_object(
    api: ApiClient, ns: str
) -> None:
    """Pruning reads a child, then deletes it: one re-created under that name in between (a
    new uid) must survive, and the stale delete is no error."""
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}
    first = rest.request(api, "POST", CONFIGMAPS.path(ns), body=body)
    rest.request(api, "DELETE", CONFIGMAPS.path(ns, "c"))
    second = rest.request(api, "POST", CONFIGMAPS.path(ns), body=body)

    delete(api, CONFIGMAPS, ns, "c", uid=first["metadata"]["uid"])
    assert get(api, CONFIGMAPS, ns, "c") is not None

    delete(api, CONFIGMAPS, ns, "c", uid=second["metadata"]["uid"])
    assert get(api, CONFIGMAPS, ns, "c") is None
    delete(api, CONFIGMAPS, ns, "c", uid=second["metadata"]["uid"])  # already gone: fine
