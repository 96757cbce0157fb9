"""Admitted requests awaiting their access-log entry: struck off when it comes, charged when it never does."""

from __future__ import annotations

from extproc.decision import Identity
from extproc.inflight import Admitted, InFlight
from extproc.usage import Usage
from tests.support.clock import FakeClock

MAX_AGE = 60.0
ALICE = Identity("default", "alice", "qwen")


def admitted(
    request_id: str,
    at: float,
    identity: Identity = ALICE,
    prompt: int | None = 10,
    max_tokens: int | None = 100,
) -> Admitted:
    return Admitted(request_id, identity, prompt, max_tokens, at)


def ids(entries: list[Admitted]) -> list[str]:
    return [entry.request_id for entry in entries]


def test_nothing_expires_before_max_age() -> None:
    clock = FakeClock(1000.0)
    inflight = InFlight(MAX_AGE)
    inflight.add(admitted("a", clock()))

    clock.advance(MAX_AGE)

    assert inflight.expire(clock()) == []  # exactly max_age old is still waiting
    assert len(inflight) == 1


def test_entries_older_than_max_age_expire_oldest_first() -> None:
    clock = FakeClock(1000.0)
    inflight = InFlight(MAX_AGE)
    for request_id in ("a", "b", "c"):
        inflight.add(admitted(request_id, clock()))
        clock.advance(10)

    clock.advance(MAX_AGE - 15)  # a is 75 s old, b 65 s, c 55 s

    assert ids(inflight.expire(clock())) == ["a", "b"]
    assert len(inflight) == 1
    assert inflight.expire(clock()) == []  # expired entries are removed, not returned twice


def test_finished_entries_never_expire() -> None:
    clock = FakeClock(1000.0)
    inflight = InFlight(MAX_AGE)
    inflight.add(admitted("a", clock()))
    inflight.add(admitted("b", clock()))

    inflight.finish("a")
    clock.advance(MAX_AGE + 1)

    assert ids(inflight.expire(clock())) == ["b"]
    assert len(inflight) == 0


def test_finishing_an_unknown_id_is_harmless() -> None:
    inflight = InFlight(MAX_AGE)
    inflight.add(admitted("a", 0.0))

    inflight.finish("never-admitted")
    inflight.finish("a")
    inflight.finish("a")

    assert len(inflight) == 0


def test_reused_id_counts_from_its_latest_admission() -> None:
    clock = FakeClock(1000.0)
    inflight = InFlight(MAX_AGE)
    inflight.add(admitted("a", clock()))
    clock.advance(10)
    inflight.add(admitted("b", clock()))
    clock.advance(10)
    inflight.add(admitted("a", clock(), prompt=99))  # a retry with the same x-request-id

    assert len(inflight) == 2
    clock.advance(MAX_AGE - 5)  # b is 65 s old, the second a 55 s

    expired = inflight.expire(clock())
    assert ids(expired) == ["b"]
    clock.advance(10)
    expired = inflight.expire(clock())
    assert ids(expired) == ["a"]
    assert expired[0].prompt_estimate == 99


def test_empty_request_ids_are_ignored() -> None:
    inflight = InFlight(MAX_AGE)

    inflight.add(admitted("", 0.0))

    assert len(inflight) == 0
    assert inflight.expire(1e9) == []


def test_expire_on_an_empty_set_returns_nothing() -> None:
    assert InFlight(MAX_AGE).expire(1e9) == []


def test_lost_entry_is_charged_its_admission_estimate() -> None:
    entry = admitted("a", 0.0, Identity("team-a", "bob", "llama"), prompt=42, max_tokens=256)

    assert entry.usage() == Usage("team-a", "bob", "llama", 42, 256, estimated="access_log_lost")


def test_lost_entry_without_estimates_is_charged_zero_tokens_but_still_counted() -> None:
    usage = admitted("a", 0.0, prompt=None, max_tokens=None).usage()

    assert (usage.prompt_tokens, usage.completion_tokens) == (0, 0)
    assert usage.estimated == "access_log_lost"
