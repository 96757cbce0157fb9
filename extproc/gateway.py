"""The gateway's decision for one request: pure, from our own types to a `Decision`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson

from arks.api import PREFIX_CACHE, ArksToken
from arks.metric_rules import UNKNOWN
from arks.policy import Policy
from arks.wire import (
    CREDENTIAL_HEADERS,
    HEALTH_PATH,
    METADATA_NAMESPACE,
    MODEL_HEADER,
    NAMESPACE_HEADER,
    USER_HEADER,
)
from extproc.auth import authenticate
from extproc.decision import Decision, Deny, Forward, Identity, ReadBody, Reply, bad_request
from extproc.estimate import prompt_tokens
from extproc.picking.prefix import prefix_text
from extproc.qos import token_limits
from extproc.request import (
    MODELS_PATH,
    BodyFacts,
    PathKind,
    RequestInfo,
    prompt_count,
    stored_response,
)
from extproc.response_homes import ResponseHome

NO_LENS: Mapping[tuple[str, str], int] = {}


def _model_object(
    model: str, token: ArksToken, lens: Mapping[tuple[str, str], int]
) -> dict[str, Any]:
    namespace = token.key.namespace
    entry: dict[str, Any] = {"id": model, "object": "model", "created": 0, "owned_by": namespace}
    if (length := lens.get((namespace, model))) is not None:
        entry["max_model_len"] = length  # as its engines publish it (extproc/model_info.py)
    return entry


def models_reply(
    policy: Policy, token: ArksToken, path: str, lens: Mapping[tuple[str, str], int] = NO_LENS
) -> Decision:
    """`GET /v1/models` (the models this token may use) and `GET /v1/models/{id}`; `lens`:
    (namespace, model) -> the max_model_len its engines publish, where known."""
    models = policy.models_for(token)
    if path == MODELS_PATH:
        data = [_model_object(m, token, lens) for m in models]
        return Reply(orjson.dumps({"object": "list", "data": data}))
    model = path.removeprefix(MODELS_PATH + "/")
    if model not in models:
        return Deny(404, "model_not_found", f"The model {model!r} does not exist.")
    return Reply(orjson.dumps(_model_object(model, token, lens)))


HEALTHY = Reply(b"ok\n", content_type="text/plain")


def attributed(decision: Decision, token: ArksToken, policy: Policy, model: object) -> Decision:
    """A refusal after the token matched names who was refused (for the denials metric): the
    token's namespace and user, and the model only if it is one configured in that namespace,
    else "unknown" — never the client's string, which would make a label value of anything."""
    if not isinstance(decision, Deny) or decision.identity is not None:
        return decision
    namespace = token.key.namespace
    known = isinstance(model, str) and policy.endpoint(namespace, model) is not None
    shown = model if known and isinstance(model, str) else UNKNOWN
    return dataclasses.replace(decision, identity=Identity(namespace, token.user, shown))


def decide_headers(
    req: RequestInfo,
    policy: Policy,
    now: datetime,
    home: ResponseHome | None = None,
    lens: Mapping[tuple[str, str], int] = NO_LENS,
) -> Decision:
    """Decide on the request-headers message (with the body facts Envoy lifted into metadata);
    `home`: where the stored response a path names lives, looked up for those paths only;
    `lens`: what engines publish of their models' context, for `/v1/models`."""
    if req.path == HEALTH_PATH:
        return HEALTHY  # answering is the health: Envoy says 503 while extproc is away
    token = authenticate(req.headers, policy, now)
    if isinstance(token, Deny):
        return token
    if req.kind is PathKind.STORED:
        return attributed(decide_stored(req, token, policy, home), token, policy, None)
    return attributed(_decide_headers(req, token, policy, lens), token, policy, None)


def response_not_found(response_id: str) -> Deny:
    """As vLLM answers an id it does not hold; also for another namespace's response."""
    return Deny(404, "not_found", f"Response with id {response_id!r} not found.")


def decide_stored(
    req: RequestInfo, token: ArksToken, policy: Policy, home: ResponseHome | None
) -> Decision:
    """`GET /v1/responses/{id}` or `POST /v1/responses/{id}/cancel`: to the engine that made the
    response, for the model it was made with; a request (rpm), no tokens."""
    found = stored_response(req.path)
    assert found is not None  # PathKind.STORED
    response_id, cancel = found
    method = "POST" if cancel else "GET"
    if req.method != method:
        return not_allowed(req, method)
    if home is None or home.namespace != token.key.namespace:
        return response_not_found(response_id)
    if policy.endpoint(home.namespace, home.model) is None:
        return Deny(404, "model_not_found", f"The model {home.model!r} does not exist.")
    qos = token.grants(home.model)
    if qos is None:
        return Deny(
            403,
            "model_not_allowed",
            f"This API key may not use the model {home.model!r}.",
            type="permission_denied",
        )
    metadata = {
        "namespace": home.namespace,
        "user": token.user,
        "model": home.model,
        "stream": False,
        "prompt_estimate": 0,
    }
    return Forward(
        identity=Identity(home.namespace, token.user, home.model),
        set_headers=(
            (MODEL_HEADER, home.model),
            (NAMESPACE_HEADER, home.namespace),
            (USER_HEADER, token.user),
        ),
        remove_headers=tuple(
            name for name in (*req.spoofed_headers, *CREDENTIAL_HEADERS) if name in req.headers
        ),
        metadata={METADATA_NAMESPACE: metadata},
        prompt_estimate=0,
        max_tokens=0,
        qos=qos,
        charged=False,
        engine=home.engine,
    )


def follow(decision: Decision, home: ResponseHome | None) -> Decision:
    """A Responses request continuing a stored response (`previous_response_id`) goes to the
    engine holding it; one this namespace's model did not make is not found."""
    if not isinstance(decision, Forward) or decision.follows is None:
        return decision
    who = decision.identity
    if home is None or (home.namespace, home.model) != (who.namespace, who.model):
        return dataclasses.replace(response_not_found(decision.follows), identity=who)
    return dataclasses.replace(decision, engine=home.engine)


def not_allowed(req: RequestInfo, allowed: str) -> Deny:
    """405 naming the method the path takes, in an Allow header as HTTP requires."""
    return Deny(
        405,
        "method_not_allowed",
        f"{req.method} is not allowed on {req.path}; use {allowed}.",
        headers=(("allow", allowed),),
    )


def _decide_headers(
    req: RequestInfo, token: ArksToken, policy: Policy, lens: Mapping[tuple[str, str], int]
) -> Decision:
    if req.path == MODELS_PATH or req.path.startswith(MODELS_PATH + "/"):
        if req.method != "GET":
            return not_allowed(req, "GET")
        return models_reply(policy, token, req.path, lens)
    if req.kind is None:  # the engines' admin paths too: never a tenant's
        return Deny(404, "not_found", f"Unknown path {req.path!r}.")
    if req.method != "POST":
        return not_allowed(req, "POST")
    if req.end_of_stream:
        return bad_request(
            "The request has no body: send a JSON object with a 'model'.", "missing_body"
        )
    if req.kind is PathKind.AUDIO:
        return _decide_upload(req, token, policy)
    if not req.body.known:
        return ReadBody("the body was not lifted into metadata", token)
    if req.body.invalid_json:  # or valid JSON Envoy cannot read (a number beyond 64 bits)
        return ReadBody("Envoy could not read the body: a precise answer needs it", token)
    if req.body.model_missing:  # json_to_metadata reads a list or an object as missing too
        return ReadBody("'model' is absent or not a scalar: a precise answer needs the body", token)
    decision = decide_route(req, req.body, token, policy, body=None)
    if isinstance(decision, Forward) and decision.weighting == PREFIX_CACHE:
        return ReadBody(
            "prefix-cache picking needs the prompt", token
        )  # one more message, this endpoint only
    return decision


def _decide_upload(req: RequestInfo, token: ArksToken, policy: Policy) -> Decision:
    """An audio upload: multipart/form-data, its `model` lifted by arks.form_to_metadata (Envoy
    keeps the file; extproc never reads it)."""
    if not is_form(req.headers.get("content-type", "")):
        return bad_request(
            f"{req.path} takes multipart/form-data (a 'file' and a 'model' field).",
            "invalid_content_type",
        )
    if req.body.invalid_form or not req.body.known:
        return bad_request("We could not read the multipart/form-data body.", "invalid_multipart")
    return decide_route(req, req.body, token, policy, body=None)


def is_form(content_type: str) -> bool:
    """multipart/form-data with a boundary, as arks.form_to_metadata reads it."""
    media, _, params = content_type.partition(";")
    return media.strip().lower() == "multipart/form-data" and "boundary=" in params.lower()


def decide_body(req: RequestInfo, raw: bytes, token: ArksToken, policy: Policy) -> Decision:
    """Decide on the buffered request body (asked for by `ReadBody`)."""
    return attributed(_decide_body(req, raw, token, policy), token, policy, None)


def _decide_body(req: RequestInfo, raw: bytes, token: ArksToken, policy: Policy) -> Decision:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # valid JSON with a number orjson will not hold (beyond 64 bits, 1e400) is not
            body = json.loads(raw)  # "unparseable": its field gets a precise answer below
        except ValueError:
            return bad_request("We could not parse the JSON body of your request.", "invalid_json")
        except RecursionError:  # orjson stops at 1,024 levels; Python's json at its stack
            return bad_request("The JSON body is nested too deeply.", "invalid_json")
        if _has_lone_surrogate(body):
            return bad_request(
                "The JSON body holds an unpaired UTF-16 surrogate escape (such as \\ud800), "
                "which is no Unicode text.",
                "invalid_json",
            )
    if not isinstance(body, dict):
        return bad_request("The request body must be a JSON object.", "invalid_json")
    if req.body.known and _picks_by_prefix(policy, token, req.body.model):
        # Read for its prompt only: decide as on the headers (Envoy's lifted facts, no tokenizer
        # pass, no body rewrite: usage.lua adds include_usage), so this mode costs one more
        # message and the prompt's hashing, nothing else.
        facts = dataclasses.replace(req.body, prompts=prompt_count(body.get("prompt")))
        return decide_route(req, facts, token, policy, body=None, prompt=prefix_text(body))
    facts = BodyFacts.from_body(body)
    prompt = prefix_text(body) if _picks_by_prefix(policy, token, facts.model) else None
    return decide_route(req, facts, token, policy, body=body, prompt=prompt)


def _has_lone_surrogate(body: object) -> bool:
    """Python's json accepts "\\ud800" alone; orjson, engines and every encoder refuse it."""
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


def _picks_by_prefix(policy: Policy, token: ArksToken, model: object) -> bool:
    endpoint = policy.endpoint(token.key.namespace, model) if isinstance(model, str) else None
    return endpoint is not None and endpoint.weighting == PREFIX_CACHE


def decide_route(
    req: RequestInfo,
    facts: BodyFacts,
    token: ArksToken,
    policy: Policy,
    body: dict[str, Any] | None,
    prompt: str | None = None,
) -> Decision:
    """Route a request whose token matched; a refusal names the model when it is configured."""
    kind = req.kind
    assert kind is not None  # decide_headers answered any other path
    return attributed(
        _decide_route(req, kind, facts, token, policy, body, prompt), token, policy, facts.model
    )


def _decide_route(
    req: RequestInfo,
    kind: PathKind,
    facts: BodyFacts,
    token: ArksToken,
    policy: Policy,
    body: dict[str, Any] | None,
    prompt: str | None,
) -> Decision:
    if facts.invalid_json:
        return bad_request("We could not parse the JSON body of your request.", "invalid_json")
    if facts.model_missing or facts.model is None:
        return bad_request("You must provide a model parameter.", "missing_model")
    model = facts.model
    if not isinstance(model, str) or not model:
        return bad_request("'model' must be a non-empty string.", "invalid_type")
    if kind.generates:
        refused = _generation_options_error(facts, body)
        if refused is not None:
            return refused
    else:  # no answer is written: stream, n, max_tokens … are none of the engine's options here
        facts = BodyFacts(model=model)
    previous = facts.previous_response_id if kind is PathKind.RESPONSES else None
    if previous is not None and (not isinstance(previous, str) or not previous):
        return bad_request("'previous_response_id' must be a non-empty string.", "invalid_type")
    namespace = token.key.namespace
    endpoint = policy.endpoint(namespace, model)
    if endpoint is None:
        return Deny(404, "model_not_found", f"The model {model!r} does not exist.")
    qos = token.grants(model)
    if qos is None:
        return Deny(
            403,
            "model_not_allowed",
            f"This API key may not use the model {model!r}.",
            type="permission_denied",
        )

    limits = token_limits(qos) if kind.charged else {}
    if facts.prompts is None and kind is PathKind.COMPLETIONS and (limits or qos.quota):
        # Envoy cannot count a list of prompts (it reads a list as absent), and each prompt gets
        # its answers: a reservation against token limits needs the count from the body.
        return ReadBody("a completions prompt may be a list of prompts", token)

    # A streamed answer carries usage only when asked; ask for it unless the client said no.
    # Envoy inserts it (usage.lua) when we only saw metadata; here when we parsed the body.
    needs_usage_option = kind.usage_option and facts.stream is True and facts.include_usage is None
    metadata: dict[str, Any] = {
        "namespace": namespace,
        "user": token.user,
        "model": model,
        "stream": facts.stream is True,
    }
    if needs_usage_option and body is None:
        metadata["add_usage_option"] = True
    elif kind.usage_option and body is None and facts.stream is not True:
        # Envoy cannot tell an object or array from an absent `stream`, nor type-check
        # `stream_options`: usage.lua looks (a pattern search of the body; type_error there).
        metadata["check_types"] = True
    if limits:
        metadata["limits"] = limits
    if kind is PathKind.RESPONSES:  # usage.lua reads the answer's id: its engine is remembered
        metadata["stored_response"] = True
    new_body = None
    estimate = None
    if not kind.charged or kind is PathKind.AUDIO:
        # Nothing to count (a tokenizer request, an audio file): usage.lua keeps no sample.
        estimate = metadata["prompt_estimate"] = 0
    elif body is not None:
        # Parsed anyway (the rare path): its prompt is counted now. On the headers alone it is
        # not: usage.lua keeps the body's head and it is counted only if no usage comes back.
        estimate = metadata["prompt_estimate"] = prompt_tokens(body)
        if needs_usage_option:
            options = body.get("stream_options")
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
            new_body = orjson.dumps(body)
    set_headers: tuple[tuple[str, str], ...] = (
        (MODEL_HEADER, model),
        (NAMESPACE_HEADER, namespace),
        (USER_HEADER, token.user),
    )
    if kind is not PathKind.AUDIO:  # a form keeps its boundary
        # The body is a JSON object, whatever the client said.
        set_headers += (("content-type", "application/json"),)
    ours = {name for name, _ in set_headers}
    remove = tuple(
        name
        for name in (*req.spoofed_headers, *CREDENTIAL_HEADERS)
        if name in req.headers and name not in ours
    )
    choices = (facts.prompts or 1) * max(int(facts.n or 1), int(facts.best_of or 1))
    if choices > 1:  # its usage sums them: no one time per output token (GatewayMetrics.latency)
        metadata["choices"] = choices
    return Forward(
        identity=Identity(namespace, token.user, model),
        set_headers=set_headers,
        remove_headers=remove,
        metadata={METADATA_NAMESPACE: metadata},
        body=new_body,
        prompt_estimate=estimate,
        max_tokens=_count(facts.max_tokens) if kind.generates else 0,
        choices=choices,
        answer_limit=endpoint.max_tokens,
        qos=qos,
        charged=kind.charged,
        weighting=endpoint.weighting,
        prompt=prompt,
        follows=previous,
    )


def _generation_options_error(facts: BodyFacts, body: dict[str, Any] | None) -> Deny | None:
    """A chat or completions request's answer options, type-checked as the engine would."""
    if facts.stream is not None and not isinstance(facts.stream, bool):
        return bad_request("'stream' must be a boolean.", "invalid_type")
    if body is not None and body.get("stream_options") is not None:
        if not isinstance(body["stream_options"], dict):
            return bad_request("'stream_options' must be an object.", "invalid_type")
    for name, value in (("n", facts.n), ("best_of", facts.best_of)):
        if value is not None and not _positive_int(value):
            return bad_request(f"'{name}' must be a positive integer.", "invalid_type")
    if facts.max_tokens is not None and _count(facts.max_tokens) is None:
        return bad_request(
            f"'max_tokens' must be an integer from 0 to {MAX_TOKENS_LIMIT}.", "invalid_type"
        )
    return None


def _positive_int(value: object) -> bool:
    count = _count(value)
    return count is not None and count >= 1


MAX_TOKENS_LIMIT = 2**31 - 1  # beyond any model's context; engines parse it as a 32-bit int


def _count(value: object) -> int | None:
    """A token count: a JSON integer (1024 or 1024.0) from 0 to MAX_TOKENS_LIMIT, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not 0 <= value <= MAX_TOKENS_LIMIT or not float(value).is_integer():
        return None
    return int(value)
