"""The newer endpoints (rerank, score, pooling, Anthropic Messages, the Responses API) attacked as
a heavy or hostile user would, through real Envoy and extproc to two simulated engines behind one
model.

Proven: 120 concurrent clients mixing them, streamed and not, all get a 200 and the token is
charged exactly the sum of what each answer's own `usage` reported (a pooling answer its
`prompt_tokens` only; a message or a response its input and output tokens), one request each.
Malformed JSON, a missing `model`, a `model` of the wrong type, an unknown model and the wrong
method, 20 at once on each path, are the documented 4xx with an OpenAI error body, never a 5xx,
and are never charged. Thirty stored responses made at once are each found again, at once, on
the engine that made it, and each retrieval is a request costing no tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from arks.api import token_digest
from arks.tokens import count_prompt
from launcher.procs import free_port
from launcher.sim import H_INSTANCE, H_OUTPUT_TOKENS
from tests.support.objects import endpoint, pool, token
from tests.support.stack import Stack, Usage, pooled_stack

pytestmark = pytest.mark.timeout(180)
HEAVY = "sk-arks-test-heavy-4b2e"  # the concurrent mix
HOSTILE = "sk-arks-test-hostile-8d3a"  # the bad requests
KEEPER = "sk-arks-test-keeper-1f6c"  # stored responses
MODEL = "qwen"
CLIENTS = 120
QUERY = "Which harbour town has the oldest lighthouse?"
DOCS = ["The lighthouse at Cascais dates from 1523.", "Lisbon's trams are yellow.", "Porto."]
PROMPT = "Name three lighthouses on the Portuguese coast."


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """As tests/integration/test_responses.py: one model on a pool of two engines."""
    tmp: Path = tmp_path_factory.mktemp("under-load")
    ports = {name: free_port() for name in ("a", "b")}
    documents = [
        pool("pool", list(ports.values())),
        endpoint(MODEL, "pool", weighting="static"),
        token("heavy", [MODEL], tokenHash=token_digest(HEAVY)),
        token("hostile", [MODEL], tokenHash=token_digest(HOSTILE)),
        token("keeper", [MODEL], tokenHash=token_digest(KEEPER)),
    ]
    with pooled_stack(tmp, documents, ports, MODEL) as running:
        yield running


def concurrent_http(stack: Stack, clients: int) -> httpx.Client:
    """One connection per client, all open at once."""
    return httpx.Client(
        base_url=stack.url,
        timeout=60,
        limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients),
    )


def all_at_once(work: Callable[[int], Any], count: int) -> list[Any]:
    with ThreadPoolExecutor(max_workers=count) as threads:
        return list(threads.map(work, range(count)))


def events(text: str) -> list[dict[str, Any]]:
    """A stream's JSON events (the `data:` lines), without a closing [DONE]."""
    return [
        json.loads(line.removeprefix("data: "))
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


# --- 1. the concurrent mix --------------------------------------------------------------------

POOLING_BODIES: dict[str, dict[str, Any]] = {
    "/v1/rerank": {"model": MODEL, "query": QUERY, "documents": DOCS, "top_n": 2},
    "/v1/score": {"model": MODEL, "queries": [QUERY, "Which is yellow?"], "documents": DOCS[:2]},
    "/pooling": {"model": MODEL, "input": ["a lighthouse keeper", "the harbour at night"]},
}


def pooling_usage(path: str) -> Callable[[httpx.Client, int], tuple[int, int]]:
    def send(http: httpx.Client, i: int) -> tuple[int, int]:
        body = POOLING_BODIES[path]
        answer = http.post(path, json=body, headers={"authorization": f"Bearer {HEAVY}"})
        assert answer.status_code == 200, (path, answer.text)
        usage = answer.json()["usage"]
        assert usage["prompt_tokens"] == count_prompt(body), (path, usage)
        return usage["prompt_tokens"], 0  # a prompt read: no completion is charged

    return send


def message_usage(stream: bool) -> Callable[[httpx.Client, int], tuple[int, int]]:
    def send(http: httpx.Client, i: int) -> tuple[int, int]:
        body = {
            "model": MODEL,
            "max_tokens": 16,
            "stream": stream,
            "messages": [{"role": "user", "content": f"Lighthouse number {i}?"}],
        }
        headers = {
            "x-api-key": HEAVY,
            "anthropic-version": "2023-06-01",
            H_OUTPUT_TOKENS: str(1 + i % 9),
        }
        answer = http.post("/v1/messages", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
        if stream:
            (delta,) = [e for e in events(answer.text) if e["type"] == "message_delta"]
            usage = delta["usage"]
        else:
            usage = answer.json()["usage"]
        assert usage["output_tokens"] == 1 + i % 9, usage
        return usage["input_tokens"], usage["output_tokens"]

    return send


def response_usage(stream: bool) -> Callable[[httpx.Client, int], tuple[int, int]]:
    def send(http: httpx.Client, i: int) -> tuple[int, int]:
        body = {"model": MODEL, "input": f"{PROMPT} ({i})", "stream": stream}
        headers = {"authorization": f"Bearer {HEAVY}", H_OUTPUT_TOKENS: str(1 + i % 7)}
        answer = http.post("/v1/responses", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
        if stream:
            completed = [e for e in events(answer.text) if e.get("type") == "response.completed"]
            assert len(completed) == 1, answer.text[-500:]
            usage = completed[0]["response"]["usage"]
        else:
            usage = answer.json()["usage"]
        assert usage["output_tokens"] == 1 + i % 7, usage
        return usage["input_tokens"], usage["output_tokens"]

    return send


MIX = [
    pooling_usage("/v1/rerank"),
    pooling_usage("/v1/score"),
    pooling_usage("/pooling"),
    message_usage(stream=False),
    message_usage(stream=True),
    response_usage(stream=False),
    response_usage(stream=True),
]


def test_a_concurrent_mix_is_charged_exactly_what_each_answer_reported(stack: Stack) -> None:
    before = stack.usage("heavy", MODEL)

    with concurrent_http(stack, CLIENTS) as http:
        reported = all_at_once(lambda i: MIX[i % len(MIX)](http, i), CLIENTS)

    prompt = sum(p for p, _ in reported)
    completion = sum(c for _, c in reported)
    assert prompt > 0 and completion > 0
    charged = stack.wait_usage("heavy", MODEL, before, requests=CLIENTS, timeout=30)
    assert charged == Usage(requests=CLIENTS, prompt=prompt, completion=completion, estimated=0)


# --- 2. bad input -----------------------------------------------------------------------------

NEW_PATHS = ["/v1/rerank", "/v1/score", "/pooling", "/v1/messages", "/v1/responses"]
# (what is wrong, method, raw body, status, code)
BAD: list[tuple[str, str, bytes | None, int, str]] = [
    ("malformed JSON", "POST", b'{"model": "qwen", "input": [', 400, "invalid_json"),
    ("model missing", "POST", b'{"input": "hi", "query": "q", "documents": ["d"]}', 400,
     "missing_model"),
    ("model a number", "POST", b'{"model": 7, "input": "hi"}', 400, "invalid_type"),
    ("model a list", "POST", b'{"model": ["qwen"], "input": "hi"}', 400, "invalid_type"),
    ("model an object", "POST", b'{"model": {"name": "qwen"}, "input": "hi"}', 400,
     "invalid_type"),
    ("unknown model", "POST", b'{"model": "no-such-model", "input": "hi"}', 404,
     "model_not_found"),
    ("wrong method", "GET", None, 405, "method_not_allowed"),
    ("wrong method", "PUT", b'{"model": "qwen", "input": "hi"}', 405, "method_not_allowed"),
]  # fmt: skip
ATTACKERS = 20
GOOD_GENERATING: dict[str, dict[str, Any]] = {
    "/v1/messages": {
        "model": MODEL,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
    },
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 4},
}


def user_usage(stack: Stack, user: str) -> Usage:
    """The user's usage over every model label (a refused request's model may be "unknown")."""
    stack.usage(user, MODEL)  # waits for every admitted request to be charged
    metrics = stack.metrics()

    def get(name: str, **extra: str) -> int:
        wanted = {"namespace": "default", "user": user, **extra}
        return int(
            sum(
                v
                for (n, labels), v in metrics.items()
                if n == name and all(dict(labels).get(k) == x for k, x in wanted.items())
            )
        )

    return Usage(
        requests=get("arks_requests_total"),
        prompt=get("arks_usage_tokens_total", type="prompt"),
        completion=get("arks_usage_tokens_total", type="completion"),
        estimated=get("arks_usage_estimated_requests_total"),
    )


@pytest.mark.parametrize(
    ("path", "what", "method", "raw", "status", "code"),
    [(path, *case) for path in NEW_PATHS for case in BAD],
    ids=[f"{path}-{case[0]}-{case[1]}" for path in NEW_PATHS for case in BAD],
)
def test_bad_input_on_the_new_paths_is_an_openai_4xx_and_never_charged(
    stack: Stack, path: str, what: str, method: str, raw: bytes | None, status: int, code: str
) -> None:
    before = user_usage(stack, "hostile")
    headers = {"authorization": f"Bearer {HOSTILE}"}
    if raw is not None:
        headers["content-type"] = "application/json"

    with concurrent_http(stack, ATTACKERS) as http:
        answers = all_at_once(
            lambda _: http.request(method, path, content=raw, headers=headers), ATTACKERS
        )
        # One good request after them: what is charged since `before` is that request alone,
        # so a refused request charged (late or not) would show here.
        good = http.post(
            path,
            json=POOLING_BODIES.get(path) or GOOD_GENERATING[path],
            headers={"authorization": f"Bearer {HOSTILE}", H_OUTPUT_TOKENS: "3"},
        )

    assert good.status_code == 200, good.text
    usage = good.json()["usage"]
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("output_tokens", 0)
    charged = user_usage(stack, "hostile") - before
    assert charged == Usage(requests=1, prompt=prompt, completion=completion, estimated=0)
    for answer in answers:
        assert answer.status_code == status, (answer.status_code, answer.text)
        error = answer.json()["error"]
        assert isinstance(error["message"], str) and error["message"], error
        assert isinstance(error["type"], str) and error["type"], error
        assert error["code"] == code, error


# --- 3. stored responses at once --------------------------------------------------------------

STORED = 30


def test_responses_stored_at_once_are_all_found_on_their_engine_at_once(stack: Stack) -> None:
    before = stack.usage("keeper", MODEL)
    headers = {"authorization": f"Bearer {KEEPER}", H_OUTPUT_TOKENS: "4"}

    with concurrent_http(stack, STORED) as http:
        made = all_at_once(
            lambda i: http.post(
                "/v1/responses",
                json={"model": MODEL, "input": f"{PROMPT} ({i})", "store": True},
                headers=headers,
            ),
            STORED,
        )
        for answer in made:
            assert answer.status_code == 200, answer.text
        homes = {answer.json()["id"]: answer.headers[H_INSTANCE] for answer in made}
        assert len(homes) == STORED
        assert set(homes.values()) == {"sim-a", "sim-b"}  # both engines hold some: affinity tested

        ids = list(homes)
        found = all_at_once(lambda i: http.get(f"/v1/responses/{ids[i]}", headers=headers), STORED)

    for response_id, answer in zip(ids, found, strict=True):
        assert answer.status_code == 200, (response_id, answer.status_code, answer.text)
        assert answer.json()["id"] == response_id
        assert answer.headers[H_INSTANCE] == homes[response_id], response_id
    prompt = sum(a.json()["usage"]["input_tokens"] for a in made)
    completion = sum(a.json()["usage"]["output_tokens"] for a in made)
    assert completion == 4 * STORED
    charged = stack.wait_usage("keeper", MODEL, before, requests=2 * STORED, timeout=30)
    assert charged == Usage(requests=2 * STORED, prompt=prompt, completion=completion)
