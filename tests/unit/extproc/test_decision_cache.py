"""The kept headers decisions: the same decision and the same answer to Envoy as made afresh,
never a stale one (a new policy, an expired token), never a refusal kept."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from arks.api import token_digest
from arks.policy import Policy, build_policy
from extproc import codec
from extproc.decision import Deny, Forward
from extproc.decision_cache import DecisionCache
from extproc.gateway import decide_headers
from extproc.request import BodyFacts, RequestInfo
from extproc.reservation import Reservation

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
ALICE = "sk-alice"
EXPIRES = datetime(2030, 6, 1, 12, 30, tzinfo=UTC)


def _object(kind: str, name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _policy(*, alice_disabled: bool = False, rpm: int = 100) -> Policy:
    qos = [
        {
            "arksEndpoint": {"name": model},
            "rateLimits": [{"type": "rpm", "value": rpm}, {"type": "tpm", "value": 10_000}],
        }
        for model in ("qwen", "embed")
    ]
    objects = [
        _object("ArksEndpoint", "qwen"),
        _object("ArksEndpoint", "embed"),
        _object(
            "ArksToken",
            "alice",
            tokenHash=token_digest(ALICE),
            qos=qos,
            disabled=alice_disabled,
        ),
        _object(
            "ArksToken",
            "carol",
            tokenHash=token_digest("sk-carol"),
            qos=qos,
            expiresAt=EXPIRES.isoformat().replace("+00:00", "Z"),
        ),
    ]
    return build_policy((f"object {i}", obj) for i, obj in enumerate(objects))


def request(
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
    body: BodyFacts | None = None,
    request_id: str = "req-1",
    token: str = ALICE,
) -> RequestInfo:
    all_headers = {
        "authorization": f"Bearer {token}",
        "content-type": "application/json",
        "content-length": "80",
        "x-request-id": request_id,
        **(headers or {}),
    }
    return RequestInfo("POST", path, all_headers, body or BodyFacts(model="qwen", stream=False))


REQUESTS = {
    "chat": request(),
    "stream asking usage": request(body=BodyFacts(model="qwen", stream=True, include_usage=True)),
    "stream, the gateway adds usage": request(body=BodyFacts(model="qwen", stream=True)),
    "max_tokens and n": request(body=BodyFacts(model="qwen", max_tokens=64, n=2)),
    "x-api-key": RequestInfo(
        "POST",
        "/v1/chat/completions",
        {"x-api-key": ALICE, "x-request-id": "r"},
        BodyFacts(model="qwen"),
    ),
    "client-sent routing headers": request(headers={"x-arks-user": "mallory", "x-arks-tier": "1"}),
    "embeddings": request("/v1/embeddings", body=BodyFacts(model="embed")),
    "tokenizer": request("/tokenize"),
}


@pytest.mark.parametrize("name", REQUESTS)
def test_a_kept_decision_is_the_decision_and_its_answer_the_same_answer(name: str) -> None:
    policy, cache = _policy(), DecisionCache()
    info = REQUESTS[name]
    fresh = decide_headers(info, policy, NOW)
    assert isinstance(fresh, Forward)

    first, kept = cache.decide(info, policy, NOW)
    # Another request of the same kind: another id, another body length.
    again = dataclasses.replace(
        info, headers={**info.headers, "x-request-id": "req-2", "content-length": "999"}
    )
    second, kept_again = cache.decide(again, policy, NOW)

    assert first == fresh and second == fresh
    assert kept is not None and kept_again is kept and second is first
    for reservation in (None, Reservation(1.9e9), Reservation(1.9e9, "team", True)):
        admitted = dataclasses.replace(fresh, reservation=reservation)
        assert codec.forward_prebuilt(kept.prebuilt(), reservation) == codec.forward_headers(
            admitted
        )


def test_what_the_decision_reads_is_in_the_key() -> None:
    policy, cache = _policy(), DecisionCache()
    plain, _ = cache.decide(request(), policy, NOW)
    spoofed, _ = cache.decide(request(headers={"x-arks-tier": "gold"}), policy, NOW)
    streamed, _ = cache.decide(request(body=BodyFacts(model="qwen", stream=True)), policy, NOW)
    other_model, _ = cache.decide(request(body=BodyFacts(model="embed")), policy, NOW)

    assert isinstance(spoofed, Forward) and "x-arks-tier" in spoofed.remove_headers
    assert isinstance(plain, Forward) and "x-arks-tier" not in plain.remove_headers
    assert isinstance(streamed, Forward) and streamed.metadata != plain.metadata
    assert isinstance(other_model, Forward) and other_model.identity.model == "embed"
    assert len(cache) == 4


def test_refusals_are_answered_afresh_and_never_kept() -> None:
    policy, cache = _policy(), DecisionCache()
    for info in (
        request(token="sk-nobody"),
        request(body=BodyFacts(model="unknown")),
        request(body=BodyFacts(model_missing=True)),
        request("/v1/models/qwen"),
    ):
        decision, kept = cache.decide(info, policy, NOW)
        assert decision == decide_headers(info, policy, NOW)
        assert not isinstance(decision, Forward) and kept is None
    assert len(cache) == 0


def test_a_new_policy_is_decided_afresh() -> None:
    cache = DecisionCache()
    first, _ = cache.decide(request(), _policy(), NOW)
    assert isinstance(first, Forward)

    disabled, kept = cache.decide(request(), _policy(alice_disabled=True), NOW)
    assert isinstance(disabled, Deny) and disabled.code == "invalid_api_key" and kept is None

    tighter = _policy(rpm=1)
    decision, _ = cache.decide(request(), tighter, NOW)
    assert decision == decide_headers(request(), tighter, NOW) and decision != first


def test_a_kept_decision_ends_when_its_token_expires() -> None:
    policy, cache = _policy(), DecisionCache()
    carols = request(token="sk-carol")
    before, kept = cache.decide(carols, policy, EXPIRES - timedelta(seconds=1))
    assert isinstance(before, Forward) and kept is not None

    after, kept = cache.decide(carols, policy, EXPIRES)
    assert isinstance(after, Deny) and after.message == "This API key has expired."
    assert kept is None


def test_a_full_cache_starts_again_and_a_list_in_the_facts_is_not_kept() -> None:
    policy, cache = _policy(), DecisionCache(capacity=3)
    for n in range(1, 8):  # every n is another key
        decision, _ = cache.decide(request(body=BodyFacts(model="qwen", n=n)), policy, NOW)
        assert isinstance(decision, Forward)
        assert len(cache) <= 3

    cache = DecisionCache()
    # A fact chat does not read, lifted as a list (Envoy's metadata can hold one): unhashable.
    odd = request(body=BodyFacts(model="qwen", previous_response_id=["resp_1"]))
    decision, kept = cache.decide(odd, policy, NOW)
    assert decision == decide_headers(odd, policy, NOW) and isinstance(decision, Forward)
    assert kept is None and len(cache) == 0


def test_stored_response_and_upload_paths_are_not_kept() -> None:
    policy, cache = _policy(), DecisionCache()
    for info in (
        request("/v1/responses/resp_1"),
        request("/v1/audio/transcriptions", body=BodyFacts(model="qwen", form=True)),
    ):
        _, kept = cache.decide(info, policy, NOW)
        assert kept is None
    assert len(cache) == 0
