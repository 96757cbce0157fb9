"""Stored responses (the Responses API): which paths name one, the decisions that send a request
to the engine holding it, and the bounded map of those engines."""

from __future__ import annotations

import pytest

from arks.policy import Policy, build_policy
from arks.wire import MODEL_HEADER, NAMESPACE_HEADER
from extproc.decision import Deny, Forward, Identity
from extproc.gateway import decide_headers, follow
from extproc.request import BodyFacts, PathKind, path_kind, stored_response
from extproc.response_homes import MemoryHomes, ResponseHome
from extproc.usage import Finished, usage_of
from tests.unit.extproc.test_gateway import ALICE, NOW, _object, _token, request

HOME = ResponseHome("default", "qwen", "10.0.0.7:8000")


@pytest.fixture(scope="module")
def policy() -> Policy:
    objects = [
        _object("ArksEndpoint", "qwen"),
        _object("ArksEndpoint", "llama"),
        _token("alice", ALICE, "llama", "qwen"),
    ]
    return build_policy((f"object {i}", obj) for i, obj in enumerate(objects))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/responses/resp_1", ("resp_1", False)),
        ("/v1/responses/resp_1/cancel", ("resp_1", True)),
        ("/v1/responses", None),
        ("/v1/responses/", None),
        ("/v1/responses//cancel", None),
        ("/v1/responses/a/b", None),
        ("/v1/responsesX/resp_1", None),
    ],
)
def test_stored_response_paths(path: str, expected: tuple[str, bool] | None) -> None:
    assert stored_response(path) == expected
    assert (path_kind(path) is PathKind.STORED) == (expected is not None)


def test_the_responses_and_messages_paths_generate_without_the_usage_option() -> None:
    for path in ("/v1/responses", "/v1/messages"):
        kind = path_kind(path)
        assert kind is not None and kind.generates and kind.charged and not kind.usage_option


def test_max_output_tokens_is_the_answer_limit() -> None:
    assert BodyFacts.from_metadata({"model": "m", "max_output_tokens": 40}).max_tokens == 40
    assert BodyFacts.from_body({"model": "m", "max_output_tokens": 40}).max_tokens == 40


def test_a_retrieve_goes_to_the_engine_that_made_it_under_its_model(policy: Policy) -> None:
    decision = decide_headers(
        request("/v1/responses/resp_1", "GET", body=BodyFacts(), end_of_stream=True),
        policy,
        NOW,
        HOME,
    )

    assert isinstance(decision, Forward)
    assert decision.engine == HOME.engine
    assert not decision.charged and decision.max_tokens == 0
    assert (MODEL_HEADER, "qwen") in decision.set_headers
    assert (NAMESPACE_HEADER, "default") in decision.set_headers
    assert "authorization" in decision.remove_headers


@pytest.mark.parametrize(
    "home",
    [None, ResponseHome("team-b", "qwen", "10.0.0.7:8000")],  # unknown, another namespace's
)
def test_an_unknown_or_foreign_response_is_not_found(
    policy: Policy, home: ResponseHome | None
) -> None:
    decision = decide_headers(request("/v1/responses/resp_1", "GET"), policy, NOW, home)

    assert isinstance(decision, Deny) and (decision.status, decision.code) == (404, "not_found")


@pytest.mark.parametrize(
    ("path", "method", "allowed"),
    [("/v1/responses/resp_1", "POST", "GET"), ("/v1/responses/resp_1/cancel", "GET", "POST")],
)
def test_a_stored_response_takes_one_method(
    policy: Policy, path: str, method: str, allowed: str
) -> None:
    decision = decide_headers(request(path, method), policy, NOW, HOME)

    assert isinstance(decision, Deny) and decision.status == 405
    assert decision.headers == (("allow", allowed),)


def test_previous_response_id_follows_its_engine_or_is_not_found(policy: Policy) -> None:
    facts = BodyFacts(model="qwen", previous_response_id="resp_1")
    decision = decide_headers(request("/v1/responses", body=facts), policy, NOW)
    assert isinstance(decision, Forward) and decision.follows == "resp_1"
    assert decision.metadata["io.arks"]["stored_response"] is True
    assert "add_usage_option" not in decision.metadata["io.arks"]

    followed = follow(decision, HOME)
    assert isinstance(followed, Forward) and followed.engine == HOME.engine
    for home in (None, ResponseHome("default", "llama", "x:1")):  # unknown; another model's
        refused = follow(decision, home)
        assert isinstance(refused, Deny) and refused.status == 404
        assert refused.identity == Identity("default", "alice", "qwen")


def test_previous_response_id_must_be_a_string(policy: Policy) -> None:
    facts = BodyFacts(model="qwen", previous_response_id=7)
    decision = decide_headers(request("/v1/responses", body=facts), policy, NOW)

    assert isinstance(decision, Deny) and (decision.status, decision.code) == (400, "invalid_type")


def test_a_stored_response_request_costs_no_tokens_whatever_its_answer() -> None:
    done = Finished("r", "default", "alice", "qwen", "/v1/responses/resp_1", False, 200,
                    None, None, 0, 0, 5000)  # fmt: skip
    usage = usage_of(done)
    assert usage is not None and usage.total_tokens == 0 and usage.estimated is None


async def test_the_memory_map_forgets_the_oldest_and_the_expired() -> None:
    now = [0.0]
    homes = MemoryHomes(capacity=2, ttl_s=10.0, clock=lambda: now[0])
    for ident in ("a", "b", "c"):
        await homes.remember(ident, HOME)

    assert await homes.find("a") is None  # over capacity: the oldest went
    assert await homes.find("b") == HOME
    now[0] = 10.0
    assert await homes.find("c") is None  # expired
