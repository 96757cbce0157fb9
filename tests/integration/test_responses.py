"""The Responses API through real Envoy and extproc to two simulated engines behind one model,
with the official openai client (`responses.create`, `.retrieve`, `.cancel`, streams).

Each answer is charged exactly the engine's `usage.input_tokens` / `output_tokens` (a stream's in
its `response.completed` event). A stored response lives on the engine that made it: retrieving,
cancelling and continuing it (`previous_response_id`) reach that engine every time, whichever
engine least-request would have chosen; an unknown id is a 404; bad bodies are 4xx.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from arks.api import token_digest
from arks.tokens import count_prompt
from launcher.procs import free_port
from launcher.sim import H_INSTANCE, TOKEN
from tests.support.objects import endpoint, pool, token
from tests.support.stack import Stack, Usage, pooled_stack

pytestmark = pytest.mark.timeout(180)
KEY = "sk-arks-test-responses-5a7e"
OTHER = "sk-arks-test-responses-other-77d1"  # another namespace: never sees KEY's responses
MODEL = "qwen"
PROMPT = "Name three lighthouses on the Portuguese coast."


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("responses")
    ports = {name: free_port() for name in ("a", "b")}
    documents = [
        pool("pool", list(ports.values())),
        endpoint(MODEL, "pool", weighting="static"),
        token("alice", [MODEL], tokenHash=token_digest(KEY)),
        pool("pool", list(ports.values()), namespace="team-b"),
        endpoint(MODEL, "pool", namespace="team-b", weighting="static"),
        token("carol", [MODEL], namespace="team-b", tokenHash=token_digest(OTHER)),
    ]
    with pooled_stack(tmp, documents, ports, MODEL) as running:
        yield running


def client(stack: Stack, key: str = KEY) -> openai.OpenAI:
    return stack.client(key)


def charged(stack: Stack, before: Usage, requests: int = 1) -> Usage:
    return stack.wait_usage("alice", MODEL, before, requests)


def test_a_response_is_charged_its_input_and_output_tokens_exactly(stack: Stack) -> None:
    before = stack.usage("alice", MODEL)

    response = client(stack).responses.create(
        model=MODEL, input=PROMPT, max_output_tokens=7, extra_headers={"x-sim-output-tokens": "20"}
    )

    assert response.status == "incomplete"  # cut at max_output_tokens
    assert response.output_text == TOKEN * 7
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (
        count_prompt({"input": PROMPT}),
        7,
    )
    assert charged(stack, before) == Usage(
        requests=1, prompt=response.usage.input_tokens, completion=7, estimated=0
    )


def test_a_streamed_response_is_charged_from_its_completed_event(stack: Stack) -> None:
    before = stack.usage("alice", MODEL)

    events = list(
        client(stack).responses.create(
            model=MODEL, input=PROMPT, stream=True, extra_headers={"x-sim-output-tokens": "12"}
        )
    )

    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 12
    completed = events[-1].response  # type: ignore[union-attr]
    assert completed.usage is not None and completed.usage.output_tokens == 12
    assert charged(stack, before) == Usage(
        requests=1, prompt=count_prompt({"input": PROMPT}), completion=12, estimated=0
    )


def engine_of(stack: Stack, response_id: str) -> str:
    """Which engine holds the response: asked of each engine directly."""
    holders = [
        name
        for name, port in stack.sim_ports.items()
        if httpx.get(f"http://127.0.0.1:{port}/v1/responses/{response_id}").status_code == 200
    ]
    assert len(holders) == 1, holders
    return f"sim-{holders[0]}"


@pytest.mark.parametrize("stream", [False, True])
def test_retrieve_and_previous_response_id_reach_the_engine_that_made_it(
    stack: Stack, stream: bool
) -> None:
    api = client(stack)
    made_on: set[str] = set()
    for _ in range(20):
        if stream:
            events = list(api.responses.create(model=MODEL, input=PROMPT, stream=True))
            first_id = events[-1].response.id  # type: ignore[union-attr]
        else:
            first_id = api.responses.create(model=MODEL, input=PROMPT).id
        home = engine_of(stack, first_id)
        made_on.add(home)

        got = api.responses.with_raw_response.retrieve(first_id)
        assert got.headers[H_INSTANCE] == home
        assert got.parse().id == first_id

        follow_up = api.responses.with_raw_response.create(
            model=MODEL, input="And the oldest?", previous_response_id=first_id
        )
        assert follow_up.headers[H_INSTANCE] == home
        assert follow_up.parse().previous_response_id == first_id
    assert made_on == {"sim-a", "sim-b"}  # least request spread them: affinity was tested


def test_cancel_reaches_the_engine_of_a_background_response(stack: Stack) -> None:
    api = client(stack)
    queued = api.responses.create(model=MODEL, input=PROMPT, background=True)
    assert queued.status == "queued"

    cancelled = api.responses.with_raw_response.cancel(queued.id)

    assert cancelled.headers[H_INSTANCE] == engine_of(stack, queued.id)
    assert cancelled.parse().status == "cancelled"
    assert api.responses.retrieve(queued.id).status == "cancelled"


def test_retrieve_and_cancel_count_as_requests_and_cost_no_tokens(stack: Stack) -> None:
    api = client(stack)
    made = api.responses.create(model=MODEL, input=PROMPT, background=True)
    before = stack.usage("alice", MODEL)

    api.responses.retrieve(made.id)
    api.responses.cancel(made.id)

    assert charged(stack, before, requests=2) == Usage(requests=2)


def test_an_unknown_response_id_is_not_found(stack: Stack) -> None:
    api = client(stack)
    with pytest.raises(openai.NotFoundError) as retrieved:
        api.responses.retrieve("resp_unknown")
    with pytest.raises(openai.NotFoundError) as cancelled:
        api.responses.cancel("resp_unknown")
    with pytest.raises(openai.NotFoundError) as continued:
        api.responses.create(model=MODEL, input="hi", previous_response_id="resp_nope")

    for refused in (retrieved, cancelled, continued):
        assert refused.value.code == "not_found"


def test_another_namespaces_response_is_not_found(stack: Stack) -> None:
    made = client(stack).responses.create(model=MODEL, input=PROMPT)
    assert client(stack).responses.retrieve(made.id).id == made.id

    other = client(stack, OTHER)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=MODEL, input="hi", previous_response_id=made.id)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/v1/responses", {"input": "hi"}, 400, "missing_model"),
        ("POST", "/v1/responses", {"model": MODEL, "input": "hi", "stream": "yes"}, 400,
         "invalid_type"),
        ("POST", "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": -1}, 400,
         "invalid_type"),
        ("POST", "/v1/responses", {"model": MODEL, "input": "hi", "previous_response_id": 7}, 400,
         "invalid_type"),
        ("GET", "/v1/responses", None, 405, "method_not_allowed"),
        ("POST", "/v1/responses/resp_x", {}, 405, "method_not_allowed"),
        ("GET", "/v1/responses/resp_x/cancel", None, 405, "method_not_allowed"),
    ],
)  # fmt: skip
def test_bad_requests_get_an_openai_error(
    stack: Stack, method: str, path: str, body: object, status: int, code: str
) -> None:
    with stack.http() as http:
        answer = http.request(method, path, json=body, headers={"authorization": f"Bearer {KEY}"})

    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code
