"""The controller's work queue and condition bookkeeping, with a fake clock and no API server."""

from __future__ import annotations

import datetime
import threading
import time

import pytest

from arks.adapters.kube.conditions import set_condition
from arks.adapters.kube.queue import WorkQueue
from tests.support.clock import FakeClock

A = ("ns", "a")
B = ("ns", "b")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(clock: FakeClock) -> WorkQueue:
    return WorkQueue(clock=clock, base_delay_s=0.05, max_delay_s=1.0)


def test_adding_a_pending_key_again_is_merged(queue: WorkQueue) -> None:
    queue.add(A)
    queue.add(B)
    queue.add(A)

    assert len(queue) == 2
    assert [queue.get(0), queue.get(0), queue.get(0)] == [A, B, None]


def test_a_key_added_while_processing_waits_for_done(queue: WorkQueue) -> None:
    queue.add(A)
    assert queue.get(0) == A

    queue.add(A)
    queue.add(A)
    assert queue.get(0) is None  # never handed to a second worker while the first runs

    queue.done(A)
    assert queue.get(0) == A
    queue.done(A)
    assert queue.get(0) is None


def test_two_workers_never_process_the_same_key_at_once(queue: WorkQueue) -> None:
    active: set[tuple[str, str]] = set()
    overlaps: list[tuple[str, str]] = []
    processed = [0]
    lock = threading.Lock()

    def worker() -> None:
        while (key := queue.get(0.2)) is not None:
            with lock:
                if key in active:
                    overlaps.append(key)
                active.add(key)
                processed[0] += 1
                again = processed[0] < 200
            if again:
                queue.add(key)  # re-added while it is being processed
            time.sleep(0.0005)
            with lock:
                active.discard(key)
            queue.done(key)

    queue.add(A)
    queue.add(B)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

    assert processed[0] >= 200
    assert overlaps == []


def test_backoff_doubles_per_failure_up_to_the_cap(queue: WorkQueue) -> None:
    delays = [queue.add_rate_limited(A) for _ in range(7)]

    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert queue.num_requeues(A) == 7


def test_forget_resets_the_backoff(queue: WorkQueue) -> None:
    queue.add_rate_limited(A)
    queue.add_rate_limited(A)

    queue.forget(A)

    assert queue.num_requeues(A) == 0
    assert queue.add_rate_limited(A) == 0.05


def test_backoff_is_per_key(queue: WorkQueue) -> None:
    queue.add_rate_limited(A)
    queue.add_rate_limited(A)

    assert queue.add_rate_limited(B) == 0.05


def test_add_after_becomes_ready_only_when_the_delay_passed(
    queue: WorkQueue, clock: FakeClock
) -> None:
    queue.add_after(A, 2.0)

    assert queue.get(0) is None
    clock.advance(1.99)
    assert queue.get(0) is None
    clock.advance(0.01)
    assert queue.get(0) == A


def test_an_earlier_add_after_wins_and_fires_once(queue: WorkQueue, clock: FakeClock) -> None:
    queue.add_after(A, 5.0)
    queue.add_after(A, 1.0)
    queue.add_after(A, 3.0)

    clock.advance(1.0)
    assert queue.get(0) == A
    queue.done(A)
    clock.advance(10.0)
    assert queue.get(0) is None


def test_a_rate_limited_retry_uses_the_given_delay(queue: WorkQueue, clock: FakeClock) -> None:
    assert queue.add_rate_limited(A, delay_s=3.0) == 3.0
    clock.advance(2.9)
    assert queue.get(0) is None
    clock.advance(0.1)
    assert queue.get(0) == A


def test_get_blocks_until_an_add_and_shutdown_releases_waiters() -> None:
    queue = WorkQueue()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(queue.get(5)))
    waiter.start()
    queue.add(A)
    waiter.join(5)
    assert got == [A]

    waiter = threading.Thread(target=lambda: got.append(queue.get(5)))
    waiter.start()
    queue.shutdown()
    waiter.join(5)
    assert got == [A, None]
    queue.add(B)
    assert queue.get(0) is None


def test_get_wakes_for_a_delayed_key_in_real_time() -> None:
    queue = WorkQueue()
    queue.add_after(A, 0.05)

    assert queue.get(2) == A


# --- conditions ---------------------------------------------------------------------------

T0 = datetime.datetime(2025, 1, 1, 12, 0, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)


def test_a_new_condition_gets_the_current_transition_time() -> None:
    conditions = set_condition([], "Ready", "False", "Pending", "waiting", 1, T0)

    assert conditions == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "Pending",
            "message": "waiting",
            "lastTransitionTime": "2025-01-01T12:00:00Z",
            "observedGeneration": 1,
        }
    ]


def test_an_unchanged_status_keeps_the_transition_time_but_updates_the_rest() -> None:
    before = set_condition([], "Ready", "False", "Pending", "waiting", 1, T0)

    after = set_condition(before, "Ready", "False", "Scaling", "2/3 up", 2, T1)

    assert after[0]["lastTransitionTime"] == "2025-01-01T12:00:00Z"
    assert (after[0]["reason"], after[0]["message"], after[0]["observedGeneration"]) == (
        "Scaling",
        "2/3 up",
        2,
    )
    assert before[0]["reason"] == "Pending"  # the input list is not modified


def test_a_status_change_moves_the_transition_time() -> None:
    before = set_condition([], "Ready", "False", "Pending", "waiting", 1, T0)

    after = set_condition(before, "Ready", "True", "Ready", "serving", 1, T1)

    assert after[0]["lastTransitionTime"] == "2025-01-01T12:05:00Z"


def test_re_setting_an_identical_condition_is_a_no_op() -> None:
    before = set_condition([], "Ready", "True", "Ready", "ok", 3, T0)

    assert set_condition(before, "Ready", "True", "Ready", "ok", 3, T1) == before


def test_other_conditions_keep_their_order() -> None:
    conditions = set_condition([], "Available", "True", "Up", "", 1, T0)
    conditions = set_condition(conditions, "Ready", "False", "Pending", "", 1, T0)

    conditions = set_condition(conditions, "Available", "False", "Down", "", 1, T1)

    assert [c["type"] for c in conditions] == ["Available", "Ready"]
    assert conditions[1]["status"] == "False"


def test_a_condition_status_outside_true_false_unknown_is_rejected() -> None:
    with pytest.raises(ValueError, match="True, False or Unknown"):
        set_condition([], "Ready", "yes", "R", "", None, T0)


def test_a_key_s_wait_runs_from_its_first_add_until_taken(
    queue: WorkQueue, clock: FakeClock
) -> None:
    waits: list[float] = []
    queue.on_wait = waits.append
    queue.add(A)
    clock.advance(2.0)
    queue.add(A)  # merged: the wait still runs from the first add
    clock.advance(1.0)
    assert queue.get(0) == A
    assert waits == [3.0]


def test_a_key_added_while_processing_waits_from_that_add_until_taken_again(
    queue: WorkQueue, clock: FakeClock
) -> None:
    waits: list[float] = []
    queue.on_wait = waits.append
    queue.add(A)
    assert queue.get(0) == A
    clock.advance(1.0)
    queue.add(A)  # held while the first run goes on: that hold is waiting too
    clock.advance(4.0)
    queue.done(A)
    clock.advance(0.5)
    assert queue.get(0) == A
    assert waits == [0.0, 4.5]


def test_a_delayed_key_waits_from_when_its_delay_ran_out(
    queue: WorkQueue, clock: FakeClock
) -> None:
    waits: list[float] = []
    queue.on_wait = waits.append
    queue.add_after(A, 10.0)
    clock.advance(10.0)
    assert len(queue) == 1  # promoted now
    clock.advance(0.25)
    assert queue.get(0) == A
    assert waits == [0.25]
