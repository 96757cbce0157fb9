"""The gateway's decisions, from our own request facts to Deny / Reply / ReadBody / Forward."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from arks.api import ArksToken, token_digest
from arks.policy import Policy, build_policy
from arks.tokens import count_prompt
from arks.wire import METADATA_NAMESPACE
from extproc.decision import Decision, Deny, Forward, Identity, ReadBody, Reply
from extproc.gateway import decide_body, decide_headers, decide_route
from extproc.request import ENGINE_PATHS, BodyFacts, PathKind, RequestInfo
from tests.support.engine_paths import ENGINE_ADMIN_PATHS

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
ALICE = "sk-alice"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]


def _object(kind: str, name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _token(
    name: str, secret: str, *models: str, namespace: str = "default", **spec: Any
) -> dict[str, Any]:
    qos = [{"arksEndpoint": {"name": model}} for model in models]
    return _object("ArksToken", name, namespace, tokenHash=token_digest(secret), qos=qos, **spec)


@pytest.fixture(scope="module")
def policy() -> Policy:
    objects = [
        _object("ArksEndpoint", "qwen"),
        _object("ArksEndpoint", "llama"),
        _object("ArksEndpoint", "mistral"),  # exists, granted to nobody
        _object("ArksEndpoint", "phi", "team-b"),
        # Alice's grants: two models that exist and one that does not.
        _token("alice", ALICE, "llama", "retired", "qwen"),
        _token("bob", "sk-bob", "qwen", disabled=True),
        _token("carol", "sk-carol", "qwen", expiresAt="2030-01-01T00:00:00Z"),
        _token("dave", "sk-dave", "qwen", namespace="team-b"),  # qwen lives in default, not team-b
    ]
    return build_policy((f"object {i}", obj) for i, obj in enumerate(objects))


@pytest.fixture(scope="module")
def alice(policy: Policy) -> ArksToken:
    token = policy.token(token_digest(ALICE))
    assert token is not None
    return token


def request(
    path: str = CHAT,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    body: BodyFacts | None = None,
    end_of_stream: bool = False,
    token: str | None = ALICE,
) -> RequestInfo:
    audio = ENGINE_PATHS.get(path) is PathKind.AUDIO
    content_type = "multipart/form-data; boundary=x" if audio else "application/json"
    all_headers = {"content-type": content_type, "x-request-id": "req-1"}
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    facts = BodyFacts(model="qwen", stream=False) if body is None else body
    return RequestInfo(method, path, all_headers, facts, end_of_stream)


def denied(decision: Decision, status: int, code: str) -> Deny:
    assert isinstance(decision, Deny), decision
    assert (decision.status, decision.code) == (status, code), decision
    return decision


def forwarded(decision: Decision) -> Forward:
    assert isinstance(decision, Forward), decision
    return decision


def raw(**body: Any) -> bytes:
    return orjson.dumps(body)


# --- who is calling ---------------------------------------------------------------------------


def test_no_credentials_is_401(policy: Policy) -> None:
    deny = denied(decide_headers(request(token=None), policy, NOW), 401, "invalid_api_key")

    assert "No API key provided" in deny.message
    assert orjson.loads(deny.body()) == {
        "error": {
            "message": deny.message,
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        }
    }


@pytest.mark.parametrize("authorization", ["Basic c2stYWxpY2U=", "Bearer", "Bearer   ", ALICE, " "])
def test_malformed_authorization_is_401(policy: Policy, authorization: str) -> None:
    decision = decide_headers(
        request(token=None, headers={"authorization": authorization}), policy, NOW
    )

    assert "must be 'Bearer <token>'" in denied(decision, 401, "invalid_api_key").message


def test_malformed_authorization_is_not_rescued_by_x_api_key(policy: Policy) -> None:
    headers = {"authorization": "Basic xyz", "x-api-key": ALICE}

    denied(
        decide_headers(request(token=None, headers=headers), policy, NOW), 401, "invalid_api_key"
    )


def test_unknown_token_is_401(policy: Policy) -> None:
    deny = denied(decide_headers(request(token="sk-mallory"), policy, NOW), 401, "invalid_api_key")

    assert deny.message == "Incorrect API key provided."


def test_disabled_token_is_401(policy: Policy) -> None:
    deny = denied(decide_headers(request(token="sk-bob"), policy, NOW), 401, "invalid_api_key")

    assert "disabled" in deny.message


def test_expired_token_is_401(policy: Policy) -> None:
    deny = denied(decide_headers(request(token="sk-carol"), policy, NOW), 401, "invalid_api_key")

    assert "expired" in deny.message


def test_token_works_until_its_expiry(policy: Policy) -> None:
    expiry = datetime(2030, 1, 1, tzinfo=UTC)

    forwarded(decide_headers(request(token="sk-carol"), policy, expiry - timedelta(seconds=1)))
    denied(decide_headers(request(token="sk-carol"), policy, expiry), 401, "invalid_api_key")


def test_x_api_key_is_accepted(policy: Policy) -> None:
    decision = forwarded(
        decide_headers(request(token=None, headers={"x-api-key": ALICE}), policy, NOW)
    )

    assert decision.identity == Identity("default", "alice", "qwen")
    assert "x-api-key" in decision.remove_headers


def test_bearer_scheme_is_case_insensitive_and_space_tolerant(policy: Policy) -> None:
    decision = decide_headers(
        request(token=None, headers={"authorization": f"  bearer  {ALICE} "}), policy, NOW
    )

    assert forwarded(decision).identity.user == "alice"


# --- paths and methods ------------------------------------------------------------------------


def test_models_lists_only_models_granted_that_exist(policy: Policy) -> None:
    decision = decide_headers(request("/v1/models", "GET", body=BodyFacts()), policy, NOW)

    assert isinstance(decision, Reply)
    assert (decision.status, decision.content_type) == (200, "application/json")
    listing = orjson.loads(decision.body)
    assert listing["object"] == "list"
    assert [model["id"] for model in listing["data"]] == ["llama", "qwen"]  # grant order
    assert listing["data"][0] == {
        "id": "llama",
        "object": "model",
        "created": 0,
        "owned_by": "default",
    }


def test_models_carry_the_max_model_len_their_engines_publish_when_known(policy: Policy) -> None:
    lens = {("default", "qwen"): 32768, ("team-b", "llama"): 1}  # another namespace's: not ours
    listed = decide_headers(request("/v1/models", "GET"), policy, NOW, lens=lens)
    one = decide_headers(request("/v1/models/qwen", "GET"), policy, NOW, lens=lens)

    assert isinstance(listed, Reply) and isinstance(one, Reply)
    data = orjson.loads(listed.body)["data"]
    assert [m.get("max_model_len") for m in data] == [None, 32768]  # llama: unknown, left out
    assert orjson.loads(one.body)["max_model_len"] == 32768


def test_models_in_another_namespace_are_not_listed(policy: Policy) -> None:
    decision = decide_headers(request("/v1/models", "GET", token="sk-dave"), policy, NOW)

    assert isinstance(decision, Reply)
    assert orjson.loads(decision.body)["data"] == []


def test_models_needs_a_token(policy: Policy) -> None:
    denied(
        decide_headers(request("/v1/models", "GET", token=None), policy, NOW),
        401,
        "invalid_api_key",
    )


def test_models_only_answers_get(policy: Policy) -> None:
    deny = denied(
        decide_headers(request("/v1/models", "POST"), policy, NOW), 405, "method_not_allowed"
    )

    assert deny.headers == (("allow", "GET"),)


def test_one_granted_model_is_described(policy: Policy) -> None:
    decision = decide_headers(request("/v1/models/llama", "GET"), policy, NOW)

    assert isinstance(decision, Reply)
    assert orjson.loads(decision.body) == {
        "id": "llama",
        "object": "model",
        "created": 0,
        "owned_by": "default",
    }


@pytest.mark.parametrize(
    "model", ["mistral", "retired", "gpt-5"], ids=["not-granted", "granted-but-gone", "unknown"]
)
def test_one_model_not_usable_by_the_token_is_404(policy: Policy, model: str) -> None:
    denied(
        decide_headers(request(f"/v1/models/{model}", "GET"), policy, NOW), 404, "model_not_found"
    )


@pytest.mark.parametrize(
    "path", ["/v1/images/generations", "/v1/chat/completions/", "/", "/v1/modelsx"]
)
def test_unknown_path_is_404(policy: Policy, path: str) -> None:
    denied(decide_headers(request(path), policy, NOW), 404, "not_found")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_inference_paths_only_answer_post(policy: Policy, method: str) -> None:
    deny = denied(decide_headers(request(CHAT, method), policy, NOW), 405, "method_not_allowed")

    assert "use POST" in deny.message
    assert deny.headers == (("allow", "POST"),)


@pytest.mark.parametrize("path", sorted(ENGINE_PATHS))
def test_every_engine_path_is_forwarded(policy: Policy, path: str) -> None:
    forwarded(decide_headers(request(path), policy, NOW))


@pytest.mark.parametrize("path", ENGINE_ADMIN_PATHS)
def test_engine_admin_paths_are_404_to_tenants(policy: Policy, path: str) -> None:
    denied(decide_headers(request(path), policy, NOW), 404, "not_found")


@pytest.mark.parametrize("path", sorted(p for p, k in ENGINE_PATHS.items() if not k.generates))
def test_paths_that_write_no_answer_reserve_no_answer_and_ignore_generation_options(
    policy: Policy, path: str
) -> None:
    facts = BodyFacts(model="qwen", stream=True, max_tokens="many", n=0)
    decision = forwarded(decide_headers(request(path, body=facts), policy, NOW))

    assert (decision.max_tokens, decision.choices) == (0, 1)
    ours = decision.metadata[METADATA_NAMESPACE]
    assert "add_usage_option" not in ours and "check_types" not in ours
    assert ours["stream"] is False


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_tokenizer_requests_are_granted_per_model_and_take_no_tokens(
    alice: ArksToken, policy: Policy, path: str
) -> None:
    assert isinstance(
        decide_headers(request(path, body=BodyFacts(model_missing=True)), policy, NOW), ReadBody
    )
    denied(decide_body(request(path, body=BodyFacts()), b"{}", alice, policy), 400,
           "missing_model")  # fmt: skip
    denied(decide_headers(request(path, body=BodyFacts(model="mistral")), policy, NOW), 403,
           "model_not_allowed")  # fmt: skip
    decision = forwarded(decide_headers(request(path), policy, NOW))

    assert decision.charged is False and decision.prompt_estimate == 0
    assert decision.metadata[METADATA_NAMESPACE]["prompt_estimate"] == 0  # usage.lua: no sample


@pytest.mark.parametrize(
    "body",
    [
        {"model": "qwen", "query": "which?", "documents": ["this one", "that one"]},
        {"model": "qwen", "text_1": "which?", "text_2": ["this one", "that one"]},
    ],
)
def test_a_parsed_rerank_or_score_body_counts_its_pairs(
    alice: ArksToken, policy: Policy, body: dict[str, Any]
) -> None:
    decision = forwarded(decide_body(request("/v1/rerank"), raw(**body), alice, policy))

    assert decision.prompt_estimate == count_prompt(body) > 0


def test_request_without_body_is_400(policy: Policy) -> None:
    denied(
        decide_headers(request(body=BodyFacts(), end_of_stream=True), policy, NOW),
        400,
        "missing_body",
    )


# --- the body ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("facts", "code", "mentions"),
    [
        (BodyFacts(model=42), "invalid_type", "'model'"),
        (BodyFacts(model=""), "invalid_type", "'model'"),
        (BodyFacts(model="qwen", stream="yes"), "invalid_type", "'stream'"),
    ],
    ids=["number-model", "empty-model", "string-stream"],
)
def test_bad_body_facts_are_400(policy: Policy, facts: BodyFacts, code: str, mentions: str) -> None:
    deny = denied(decide_headers(request(body=facts), policy, NOW), 400, code)

    assert mentions in deny.message


@pytest.mark.parametrize(
    ("body", "code", "mentions"),
    [
        (b"{not json", "invalid_json", "JSON"),
        (b"[1, 2]", "invalid_json", "JSON object"),
        (b"", "invalid_json", "JSON"),
        (raw(messages=MESSAGES), "missing_model", "model"),
        (raw(model=None, messages=MESSAGES), "missing_model", "model"),
        (raw(model=["qwen"], messages=MESSAGES), "invalid_type", "'model'"),
        (raw(model="qwen", stream=1, messages=MESSAGES), "invalid_type", "'stream'"),
    ],
    ids=["broken", "array", "empty", "no-model", "null-model", "list-model", "number-stream"],
)
def test_bad_bodies_are_400(
    alice: ArksToken, policy: Policy, body: bytes, code: str, mentions: str
) -> None:
    deny = denied(decide_body(request(body=BodyFacts()), body, alice, policy), 400, code)

    assert mentions in deny.message


def test_a_model_envoy_reads_as_missing_is_read_by_the_gateway(
    alice: ArksToken, policy: Policy
) -> None:
    """json_to_metadata reads a `model` that is a list or an object as missing: only the body
    tells an absent one (missing_model) from one of the wrong type (invalid_type)."""
    decision = decide_headers(request(body=BodyFacts(model_missing=True)), policy, NOW)
    assert isinstance(decision, ReadBody)
    for body, code in [(raw(messages=MESSAGES), "missing_model"),
                       (raw(model=["qwen"], messages=MESSAGES), "invalid_type"),
                       (raw(model={"name": "qwen"}, messages=MESSAGES), "invalid_type")]:  # fmt: skip
        denied(
            decide_body(request(body=BodyFacts(model_missing=True)), body, alice, policy), 400, code
        )


def test_body_errors_have_distinct_codes(alice: ArksToken, policy: Policy) -> None:
    codes = [decide_headers(request(body=BodyFacts(model=42)), policy, NOW)]
    codes.append(decide_body(request(body=BodyFacts()), b"{}", alice, policy))
    unreadable = decide_body(request(body=BodyFacts(invalid_json=True)), b"{x", alice, policy)
    codes.append(unreadable)

    assert len({deny.code for deny in codes if isinstance(deny, Deny)}) == 3


def test_a_body_envoy_could_not_read_is_read_by_the_gateway(
    alice: ArksToken, policy: Policy
) -> None:
    decision = decide_headers(request(body=BodyFacts(invalid_json=True)), policy, NOW)
    assert isinstance(decision, ReadBody) and decision.token == alice


def test_routing_facts_that_say_invalid_json_are_a_400(alice: ArksToken, policy: Policy) -> None:
    facts = BodyFacts(model="qwen", invalid_json=True)
    decision = decide_route(request(body=facts), facts, alice, policy, body=None)
    denied(decision, 400, "invalid_json")


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "qwen", "messages": [], "max_tokens": 9223372036854775808}',
        b'{"model": "qwen", "messages": [], "max_tokens": 1e400}',
        b'{"model": "qwen", "messages": [], "max_tokens": "12"}',
        b'{"model": "qwen", "messages": [], "max_tokens": 12.5}',
        b'{"model": "qwen", "messages": [], "max_tokens": -1}',
    ],
    ids=["2^63", "1e400", "string", "fraction", "negative"],
)
def test_a_max_tokens_that_is_no_token_count_gets_a_precise_400(
    alice: ArksToken, policy: Policy, body: bytes
) -> None:
    facts = BodyFacts(invalid_json=True)  # what Envoy says of the first two; the parse decides
    deny = denied(decide_body(request(body=facts), body, alice, policy), 400, "invalid_type")
    assert "'max_tokens' must be an integer from 0 to 2147483647" in deny.message


def test_unknown_model_is_404(policy: Policy) -> None:
    deny = denied(
        decide_headers(request(body=BodyFacts(model="gpt-5")), policy, NOW), 404, "model_not_found"
    )

    assert "'gpt-5'" in deny.message


def test_granted_model_that_no_longer_exists_is_404(policy: Policy) -> None:
    denied(
        decide_headers(request(body=BodyFacts(model="retired")), policy, NOW),
        404,
        "model_not_found",
    )


def test_existing_model_not_granted_is_403(policy: Policy) -> None:
    deny = denied(
        decide_headers(request(body=BodyFacts(model="mistral")), policy, NOW),
        403,
        "model_not_allowed",
    )

    assert deny.type == "permission_denied"


def test_models_are_looked_up_in_the_token_namespace(policy: Policy) -> None:
    denied(decide_headers(request(token="sk-dave"), policy, NOW), 404, "model_not_found")


def test_unknown_body_facts_ask_for_the_body_with_the_token(
    policy: Policy, alice: ArksToken
) -> None:
    decision = decide_headers(request(body=BodyFacts()), policy, NOW)

    assert isinstance(decision, ReadBody)
    assert decision.token == alice


def test_body_read_after_unknown_facts_is_admitted(policy: Policy) -> None:
    req = request(body=BodyFacts())
    first = decide_headers(req, policy, NOW)
    assert isinstance(first, ReadBody)

    body = {"model": "qwen", "messages": MESSAGES}
    decision = forwarded(decide_body(req, orjson.dumps(body), first.token, policy))

    assert decision.body is None  # nothing to rewrite
    assert decision.prompt_estimate == count_prompt(body) > 0
    assert decision.metadata[METADATA_NAMESPACE]["prompt_estimate"] == decision.prompt_estimate


def test_body_phase_also_checks_the_grant(policy: Policy, alice: ArksToken) -> None:
    decision = decide_body(
        request(body=BodyFacts()), raw(model="mistral", messages=MESSAGES), alice, policy
    )

    denied(decision, 403, "model_not_allowed")


# --- streamed requests: ask the engine for usage ----------------------------------------------


def test_stream_without_include_usage_asks_envoy_to_add_it(
    policy: Policy, alice: ArksToken
) -> None:
    """One message per request: Envoy's Lua filter inserts the option, Python never reads the body."""
    decision = decide_headers(request(body=BodyFacts(model="qwen", stream=True)), policy, NOW)

    assert isinstance(decision, Forward)
    assert decision.body is None
    assert decision.metadata["io.arks"]["add_usage_option"] is True


def test_non_streamed_or_usage_given_is_not_marked(policy: Policy, alice: ArksToken) -> None:
    for facts in (
        BodyFacts(model="qwen"),
        BodyFacts(model="qwen", stream=True, include_usage=False),
        BodyFacts(model="qwen", stream=True, include_usage=True),
    ):
        decision = decide_headers(request(body=facts), policy, NOW)
        assert isinstance(decision, Forward)
        assert "add_usage_option" not in decision.metadata["io.arks"]


def test_a_stream_envoy_did_not_read_as_true_is_type_checked_by_envoy(policy: Policy) -> None:
    """json_to_metadata reads `stream: {}` as absent: usage.lua looks at such bodies."""
    for facts, marked in (
        (BodyFacts(model="qwen"), True),
        (BodyFacts(model="qwen", stream=False), True),
        (BodyFacts(model="qwen", stream=True, include_usage=True), False),
        (BodyFacts(model="qwen", stream=True), False),  # add_usage_option checks it there
    ):
        decision = decide_headers(request(body=facts), policy, NOW)
        assert isinstance(decision, Forward)
        assert decision.metadata["io.arks"].get("check_types", False) is marked, facts


@pytest.mark.parametrize("options", ["yes", 1, [], True])
def test_a_parsed_body_with_stream_options_of_another_type_is_refused(
    policy: Policy, alice: ArksToken, options: object
) -> None:
    body = {"model": "qwen", "messages": MESSAGES, "stream_options": options}
    decision = decide_body(request(body=BodyFacts()), orjson.dumps(body), alice, policy)
    assert decision == Deny(
        400,
        "invalid_type",
        "'stream_options' must be an object.",
        identity=Identity("default", "alice", "qwen"),
    )


def test_stream_body_gets_include_usage_and_keeps_other_stream_options(
    policy: Policy, alice: ArksToken
) -> None:
    req = request(body=BodyFacts(model="qwen", stream=True))
    body = {
        "model": "qwen",
        "stream": True,
        "messages": MESSAGES,
        "stream_options": {"continuous_usage_stats": True},
    }

    decision = forwarded(decide_body(req, orjson.dumps(body), alice, policy))

    assert decision.body is not None
    sent = orjson.loads(decision.body)
    assert sent["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {
        k: v for k, v in body.items() if k != "stream_options"
    }
    assert decision.prompt_estimate == count_prompt(body)
    assert decision.metadata[METADATA_NAMESPACE]["stream"] is True


def test_stream_body_without_stream_options_gets_them(policy: Policy, alice: ArksToken) -> None:
    raw_body = raw(model="qwen", stream=True, messages=MESSAGES)

    decision = forwarded(decide_body(request(body=BodyFacts()), raw_body, alice, policy))

    assert decision.body is not None
    assert orjson.loads(decision.body)["stream_options"] == {"include_usage": True}


def test_include_usage_false_is_respected_in_the_headers_phase(policy: Policy) -> None:
    facts = BodyFacts(model="qwen", stream=True, include_usage=False)

    decision = forwarded(decide_headers(request(body=facts), policy, NOW))

    assert decision.body is None
    assert decision.prompt_estimate is None


def test_include_usage_false_is_respected_in_the_body_phase(
    policy: Policy, alice: ArksToken
) -> None:
    body = {
        "model": "qwen",
        "stream": True,
        "messages": MESSAGES,
        "stream_options": {"include_usage": False},
    }

    decision = forwarded(decide_body(request(body=BodyFacts()), orjson.dumps(body), alice, policy))

    assert decision.body is None
    assert decision.prompt_estimate == count_prompt(body)


def test_stream_with_include_usage_is_forwarded_from_the_headers(policy: Policy) -> None:
    facts = BodyFacts(model="qwen", stream=True, include_usage=True)

    decision = forwarded(decide_headers(request(body=facts), policy, NOW))

    assert decision.body is None
    assert decision.metadata[METADATA_NAMESPACE]["stream"] is True


def test_unstreamed_body_is_not_rewritten(policy: Policy, alice: ArksToken) -> None:
    decision = forwarded(
        decide_body(request(body=BodyFacts()), raw(model="qwen", prompt="hello"), alice, policy)
    )

    assert decision.body is None
    assert decision.metadata[METADATA_NAMESPACE]["stream"] is False


# --- what is forwarded ------------------------------------------------------------------------


def test_forward_sets_routing_headers(policy: Policy) -> None:
    decision = forwarded(decide_headers(request(), policy, NOW))

    assert dict(decision.set_headers) == {
        "x-arks-model": "qwen",
        "x-arks-namespace": "default",
        "x-arks-user": "alice",
        "content-type": "application/json",
    }
    assert decision.identity == Identity("default", "alice", "qwen")


def test_forward_removes_spoofed_arks_headers_and_credentials(policy: Policy) -> None:
    spoofed = {
        "x-arks-model": "llama",
        "x-arks-user": "root",
        "x-arks-tier": "gold",
        "x-api-key": "sk-other",
    }

    decision = forwarded(decide_headers(request(headers=spoofed), policy, NOW))

    # Ours are overwritten rather than removed; the rest go, and so do the credentials.
    assert sorted(decision.remove_headers) == ["authorization", "x-api-key", "x-arks-tier"]
    assert dict(decision.set_headers)["x-arks-model"] == "qwen"
    assert dict(decision.set_headers)["x-arks-user"] == "alice"


def test_forward_removes_only_headers_that_were_sent(policy: Policy) -> None:
    decision = forwarded(decide_headers(request(), policy, NOW))

    assert decision.remove_headers == ("authorization",)


def test_forward_metadata_under_io_arks(policy: Policy) -> None:
    decision = forwarded(decide_headers(request(body=BodyFacts(model="llama")), policy, NOW))

    assert decision.metadata == {
        METADATA_NAMESPACE: {
            "namespace": "default",
            "user": "alice",
            "model": "llama",
            "stream": False,
            "check_types": True,
        }
    }
    assert METADATA_NAMESPACE == "io.arks"


# --- endpoint picking: what the picker is given ----------------------------------------------


@pytest.fixture(scope="module")
def picking_policy() -> Policy:
    objects = [
        _object("ArksEndpoint", "qwen", weighting="least-load"),
        _object("ArksEndpoint", "llama", weighting="prefix-cache"),
        _object("ArksEndpoint", "mistral"),
        _token("alice", ALICE, "llama", "qwen", "mistral"),
    ]
    return build_policy((f"object {i}", obj) for i, obj in enumerate(objects))


def test_the_endpoints_weighting_travels_with_the_forward(picking_policy: Policy) -> None:
    least = forwarded(decide_headers(request(body=BodyFacts(model="qwen")), picking_policy, NOW))
    weighted = forwarded(
        decide_headers(request(body=BodyFacts(model="mistral")), picking_policy, NOW)
    )

    assert (least.weighting, least.prompt) == ("least-load", None)  # decided on one message
    assert (weighted.weighting, weighted.prompt) == ("weighted", None)


def test_prefix_cache_reads_the_prompt_then_decides_as_on_the_headers(
    picking_policy: Policy,
) -> None:
    req = request(body=BodyFacts(model="llama", stream=True))
    asked = decide_headers(req, picking_policy, NOW)
    assert isinstance(asked, ReadBody)

    body = {"model": "llama", "stream": True, "messages": MESSAGES}
    decision = forwarded(decide_body(req, orjson.dumps(body), asked.token, picking_policy))

    assert decision.prompt == "user: Tell me a short story about a lighthouse keeper.\n"
    assert decision.weighting == "prefix-cache"
    assert decision.body is None  # not rewritten: Envoy's Lua filter adds include_usage
    assert decision.metadata[METADATA_NAMESPACE]["add_usage_option"] is True
    assert decision.prompt_estimate is None  # no tokenizer pass, as on the one-message path


def test_prefix_cache_with_unknown_facts_takes_the_full_body_path(picking_policy: Policy) -> None:
    req = request(body=BodyFacts())
    asked = decide_headers(req, picking_policy, NOW)
    assert isinstance(asked, ReadBody)

    body = {"model": "llama", "messages": MESSAGES}
    decision = forwarded(decide_body(req, orjson.dumps(body), asked.token, picking_policy))

    assert decision.prompt == "user: Tell me a short story about a lighthouse keeper.\n"
    assert decision.prompt_estimate == count_prompt(body)


def test_a_client_sent_destination_header_is_removed(policy: Policy) -> None:
    sent = {"x-gateway-destination-endpoint": "10.9.9.9:80"}

    decision = forwarded(decide_headers(request(headers=sent), policy, NOW))

    assert "x-gateway-destination-endpoint" in decision.remove_headers


# --- what one request can cost: every answer it asks for ----------------------------------------


@pytest.mark.parametrize(
    ("facts", "choices"),
    [
        (BodyFacts(model="qwen"), 1),
        (BodyFacts(model="qwen", n=3), 3),
        (BodyFacts(model="qwen", n=2, best_of=5), 5),
        (BodyFacts(model="qwen", n=2.0), 2),  # a JSON number with no fraction
    ],
)
def test_a_request_asking_for_several_answers_reserves_for_each(
    policy: Policy, facts: BodyFacts, choices: int
) -> None:
    assert forwarded(decide_headers(request(body=facts), policy, NOW)).choices == choices


def test_a_list_of_prompts_counts_once_per_prompt_and_answer(
    alice: ArksToken, policy: Policy
) -> None:
    body = raw(model="qwen", prompt=["one", "two", "three"], n=2)
    decision = forwarded(
        decide_body(request("/v1/completions", body=BodyFacts()), body, alice, policy)
    )
    assert decision.choices == 6


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True, [2], {"n": 2}])
@pytest.mark.parametrize("name", ["n", "best_of"])
def test_a_count_of_answers_that_is_not_a_positive_integer_is_400(
    policy: Policy, name: str, value: object
) -> None:
    deny = denied(
        decide_headers(request(body=BodyFacts(model="qwen", **{name: value})), policy, NOW),
        400,
        "invalid_type",
    )
    assert f"'{name}' must be a positive integer" in deny.message


# --- reservations: what a request can cost ----------------------------------------------------


@pytest.fixture(scope="module")
def limited() -> Policy:
    """Erin's qwen grant has a token limit (reservations matter); Frank's has none."""
    erin = _token("erin", "sk-erin", "qwen")
    erin["spec"]["qos"][0]["rateLimits"] = [{"type": "tpm", "value": 10_000}]
    objects = [
        _object("ArksEndpoint", "qwen", maxTokens=4096),
        erin,
        _token("frank", "sk-frank", "qwen"),
    ]
    return build_policy((f"object {i}", obj) for i, obj in enumerate(objects))


def test_completions_with_token_limits_read_the_body_to_count_its_prompts(limited: Policy) -> None:
    """Envoy reads a list of prompts as absent: the reservation would cover one prompt only."""
    facts = BodyFacts(model="qwen", stream=False)
    asked = decide_headers(request("/v1/completions", body=facts, token="sk-erin"), limited, NOW)
    assert isinstance(asked, ReadBody)
    unlimited = decide_headers(
        request("/v1/completions", body=facts, token="sk-frank"), limited, NOW
    )
    assert isinstance(unlimited, Forward)  # nothing to reserve: one message, as ever
    chat = decide_headers(request(CHAT, body=facts, token="sk-erin"), limited, NOW)
    assert isinstance(chat, Forward)


def test_every_prompt_and_every_answer_per_prompt_is_reserved(limited: Policy) -> None:
    req = request("/v1/completions", body=BodyFacts(model="qwen", stream=False), token="sk-erin")
    asked = decide_headers(req, limited, NOW)
    assert isinstance(asked, ReadBody)
    body = {"model": "qwen", "prompt": ["a", "b", "c"], "n": 2, "best_of": 4, "max_tokens": 7}
    decision = forwarded(decide_body(req, orjson.dumps(body), asked.token, limited))
    assert (decision.choices, decision.max_tokens, decision.answer_limit) == (3 * 4, 7, 4096)


def test_health_is_answered_without_a_credential(policy: Policy) -> None:
    decision = decide_headers(request("/healthz", method="GET", token=None), policy, NOW)
    assert decision == Reply(b"ok\n", content_type="text/plain")


@pytest.mark.parametrize("text", ["a\\ud800b", "\\udc00", "x\\ud83d"])
def test_an_unpaired_surrogate_is_a_400_not_a_crash(
    policy: Policy, alice: ArksToken, text: str
) -> None:
    """orjson refuses it, Python's json takes it, and rewriting the body then failed (503)."""
    head = b'{"model": "qwen", "stream": true, "messages": [{"role": "user", "content": "'
    raw = head + text.encode() + b'"}]}'
    decision = decide_body(request(body=BodyFacts()), raw, alice, policy)
    assert isinstance(decision, Deny) and decision.status == 400
    assert decision.code == "invalid_json" and "surrogate" in decision.message


def test_a_body_nested_too_deeply_is_a_400_not_a_crash(policy: Policy, alice: ArksToken) -> None:
    raw = b'{"model": "qwen", "messages": [], "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    decision = decide_body(request(body=BodyFacts()), raw, alice, policy)
    assert decision == Deny(
        400,
        "invalid_json",
        "The JSON body is nested too deeply.",
        identity=Identity("default", "alice", "unknown"),  # the body was never read
    )


@pytest.mark.parametrize("max_tokens", [0, 2**31 - 1])
def test_max_tokens_at_either_end_of_its_range_is_forwarded(
    policy: Policy, max_tokens: int
) -> None:
    facts = BodyFacts(model="qwen", max_tokens=max_tokens, n=1, best_of=1)
    decision = forwarded(decide_headers(request(body=facts), policy, NOW))
    assert (decision.max_tokens, decision.choices) == (max_tokens, 1)


def test_a_parsed_body_for_an_endpoint_not_picking_by_prefix_carries_no_prompt(
    alice: ArksToken, policy: Policy
) -> None:
    body = raw(model="qwen", messages=[{"role": "user", "content": "hello"}])
    decision = forwarded(decide_body(request(body=BodyFacts()), body, alice, policy))
    assert decision.prompt is None and decision.prompt_estimate


# Who a refusal names (arks_gateway_denials_total) --------------------------------------------


def test_a_refusal_before_the_token_matched_names_nobody(policy: Policy) -> None:
    decision = denied(
        decide_headers(request(token="sk-nobody"), policy, NOW), 401, "invalid_api_key"
    )
    assert decision.identity is None  # the servicer shows empty labels


def test_a_model_the_token_may_not_use_is_named_when_it_is_configured(policy: Policy) -> None:
    facts = BodyFacts(model="mistral")  # exists in default, not granted to alice
    decision = denied(decide_headers(request(body=facts), policy, NOW), 403, "model_not_allowed")
    assert decision.identity == Identity("default", "alice", "mistral")


def test_a_model_that_is_not_configured_is_unknown_never_the_clients_string(policy: Policy) -> None:
    for model in ("retired", "no-such-model-" + "x" * 40):
        facts = BodyFacts(model=model)
        decision = denied(decide_headers(request(body=facts), policy, NOW), 404, "model_not_found")
        assert decision.identity == Identity("default", "alice", "unknown")


def test_a_model_of_another_namespace_is_unknown(policy: Policy) -> None:
    dave = policy.token(token_digest("sk-dave"))
    assert dave is not None
    facts = BodyFacts(model="qwen")  # qwen lives in default; dave in team-b
    decision = denied(
        decide_route(request(body=facts, token="sk-dave"), facts, dave, policy, body=None),
        404,
        "model_not_found",
    )
    assert decision.identity == Identity("team-b", "dave", "unknown")


def test_a_refusal_before_the_model_is_read_names_the_token_and_an_unknown_model(
    alice: ArksToken, policy: Policy
) -> None:
    decision = denied(decide_headers(request(path="/v1/nothing"), policy, NOW), 404, "not_found")
    assert decision.identity == Identity("default", "alice", "unknown")
    missing = denied(
        decide_body(request(body=BodyFacts(model_missing=True)), b"{}", alice, policy),
        400,
        "missing_model",
    )
    assert missing.identity == Identity("default", "alice", "unknown")


def test_a_bad_field_of_a_configured_model_names_it(policy: Policy) -> None:
    facts = BodyFacts(model="qwen", n=0)
    decision = denied(decide_headers(request(body=facts), policy, NOW), 400, "invalid_type")
    assert decision.identity == Identity("default", "alice", "qwen")
