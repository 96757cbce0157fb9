"""Rerank, score, pooling, classify and the tokenizer through real Envoy and extproc to the
simulated engines (plain HTTP: the openai client has no method for these).

Each pooling answer is charged exactly the prompt tokens the engine reported (`count_prompt` of
the body, as the simulator counts it), no completion tokens, in the usage metrics, the quota
status and the usage ledger; the engine's older total-only usage too; without usage, the estimate
from the body. A tokenizer request counts as a request (rpm) and never as tokens. The engines'
admin paths are a 404 that never reaches an engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from arks.api import token_digest
from arks.tokens import count_prompt
from arks.wire import HEALTH_PATH
from extproc.request import ENGINE_PATHS, PathKind
from tests.support.engine_paths import ENGINE_ADMIN_PATHS
from tests.support.objects import token
from tests.support.stack import ALICE, BOB, Stack, Usage, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(180)
POOLER = "sk-arks-test-pooler-3c1d"  # a quota, and a ledger record per request
TOKENIZER = "sk-arks-test-tokenizer-9e0b"  # rpm 3, tpm 1: any token reservation is refused
QUOTA_TOKENS = 1_000_000

QUERY = "Which harbour town has the oldest lighthouse?"
DOCS = ["The lighthouse at Cascais dates from 1523.", "Lisbon's trams are yellow.", "Porto."]
BODIES: dict[str, dict[str, Any]] = {
    "/rerank": {"query": QUERY, "documents": DOCS},
    "/v1/rerank": {"query": QUERY, "documents": DOCS, "top_n": 2},
    "/v2/rerank": {"query": QUERY, "documents": DOCS},
    "/score": {"text_1": QUERY, "text_2": DOCS},
    "/v1/score": {"queries": [QUERY, "Which is yellow?"], "documents": DOCS[:2]},
    "/pooling": {"input": ["a lighthouse keeper", "the harbour at night"]},
    "/classify": {"input": "What a wonderful evening by the sea."},
    "/v1/classify": {"messages": [{"role": "user", "content": "Is this spam? Win a boat now!"}]},
}


def documents() -> list[dict[str, Any]]:
    quota = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksQuota",
        "metadata": {"name": "poolers", "namespace": "default"},
        "spec": {"quotas": [{"type": "total", "value": QUOTA_TOKENS, "period": "month"}]},
    }
    pooler = token("pooler", ["model-a"], tokenHash=token_digest(POOLER))
    pooler["spec"]["qos"][0]["quota"] = {"name": "poolers"}
    tokenizer = token("tokenizer", ["model-a"], tokenHash=token_digest(TOKENIZER))
    tokenizer["spec"]["qos"][0]["rateLimits"] = [
        {"type": "rpm", "value": 3},
        {"type": "tpm", "value": 1},
    ]
    return [quota, pooler, tokenizer]


@pytest.fixture(scope="module")
def pooling_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("pooling"), documents(), ledger="sqlite:///{state_dir}/usage.db"
    ) as running:
        yield running


def post(stack: Stack, path: str, body: dict[str, Any], key: str = POOLER, **headers: str) -> Any:
    with stack.http() as http:
        return http.post(path, json=body, headers={"authorization": f"Bearer {key}", **headers})


def quota_used(stack: Stack) -> int:
    state = stack.local.settings.state_dir / "quota-state.json"
    used = json.loads(state.read_text())["used"] if state.exists() else {}
    return sum(v for k, v in used.items() if k.startswith("quota/default/poolers/total/"))


def ledger_totals(stack: Stack, user: str) -> dict[str, Any]:
    """`arks usage` for one user over this month, in one row."""
    url = f"sqlite:///{stack.local.settings.state_dir / 'usage.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "usage", "--ledger", url, "--user", user,
         "--by", "none", "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    return rows[0] if rows else {"requests": 0, "prompt_tokens": 0, "total_tokens": 0}


def check_answer(path: str, answer: dict[str, Any], body: dict[str, Any]) -> None:
    """The answer has vLLM's shape for its endpoint."""
    if path.endswith("rerank"):
        wanted = body.get("top_n") or len(DOCS)
        assert [r["document"]["text"] for r in answer["results"]] == [
            DOCS[r["index"]] for r in answer["results"]
        ]
        assert len(answer["results"]) == wanted
    elif path.endswith("score"):
        assert [d["object"] for d in answer["data"]] == ["score"] * len(answer["data"])
    elif path == "/pooling":
        assert [d["object"] for d in answer["data"]] == ["pooling", "pooling"]
    else:
        assert answer["data"][0]["num_classes"] == 2 and len(answer["data"][0]["probs"]) == 2


@pytest.mark.parametrize("path", BODIES)
def test_pooling_answers_are_charged_the_engines_prompt_tokens_exactly(
    pooling_stack: Stack, path: str
) -> None:
    body = {"model": "model-a", **BODIES[path]}
    before = pooling_stack.usage("pooler", "model-a")
    quota_before = quota_used(pooling_stack)
    ledger_before = ledger_totals(pooling_stack, "pooler")

    answer = post(pooling_stack, path, body)

    assert answer.status_code == 200, answer.text
    check_answer(path, answer.json(), body)
    prompt = count_prompt(body)
    assert prompt > 0 and answer.json()["usage"]["prompt_tokens"] == prompt
    charged = pooling_stack.wait_usage("pooler", "model-a", before)
    assert charged == Usage(requests=1, prompt=prompt, completion=0, estimated=0)
    assert wait_for(lambda: quota_used(pooling_stack), lambda used: used > quota_before) == (
        quota_before + prompt
    )
    ledger = wait_for(
        lambda: ledger_totals(pooling_stack, "pooler"),
        lambda row: row["requests"] > ledger_before["requests"],
        timeout=30,
    )
    assert ledger["prompt_tokens"] - ledger_before["prompt_tokens"] == prompt
    assert ledger["total_tokens"] - ledger_before["total_tokens"] == prompt


def test_a_rerank_reporting_its_total_only_is_charged_that_total(pooling_stack: Stack) -> None:
    body = {"model": "model-a", "query": QUERY, "documents": DOCS}
    before = pooling_stack.usage("pooler", "model-a")

    answer = post(pooling_stack, "/rerank", body, **{"x-sim-usage-total-only": "1"})

    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"] == {"total_tokens": count_prompt(body)}
    charged = pooling_stack.wait_usage("pooler", "model-a", before)
    assert charged == Usage(requests=1, prompt=count_prompt(body), completion=0, estimated=0)


@pytest.mark.parametrize("path", ["/v1/rerank", "/score", "/pooling", "/classify"])
def test_a_pooling_answer_without_usage_is_charged_the_bodys_prompt(
    pooling_stack: Stack, path: str
) -> None:
    body = {"model": "model-a", **BODIES[path]}
    before = pooling_stack.usage("pooler", "model-a")

    answer = post(pooling_stack, path, body, **{"x-sim-omit-usage": "1"})

    assert answer.status_code == 200 and "usage" not in answer.json(), answer.text
    charged = pooling_stack.wait_usage("pooler", "model-a", before)
    assert charged == Usage(requests=1, prompt=count_prompt(body), completion=0, estimated=1)


def test_sglangs_rerank_answer_a_list_without_usage_is_charged_the_bodys_prompt(
    pooling_stack: Stack,
) -> None:
    """SGLang answers /v1/rerank with a bare list (per item `meta_info`, no usage object): the
    answer passes whole and the request is charged the estimate of its body's prompt."""
    body = {"model": "model-a", **BODIES["/v1/rerank"]}
    before = pooling_stack.usage("pooler", "model-a")

    answer = post(pooling_stack, "/v1/rerank", body, **{"x-sim-sglang-rerank": "1"})

    assert answer.status_code == 200, answer.text
    ranked = answer.json()
    assert isinstance(ranked, list) and len(ranked) == body["top_n"]
    assert all(0 <= item["index"] < len(DOCS) and "meta_info" in item for item in ranked)
    charged = pooling_stack.wait_usage("pooler", "model-a", before)
    assert charged == Usage(requests=1, prompt=count_prompt(body), completion=0, estimated=1)


def test_tokenizer_requests_count_against_rpm_and_cost_no_tokens(pooling_stack: Stack) -> None:
    """tpm 1 refuses any request that reserves a token; rpm 3 lets three through."""
    text = "The lighthouse keeper counted the ships. " * 50
    before = pooling_stack.usage("tokenizer", "model-a")

    tokenized = post(
        pooling_stack, "/tokenize", {"model": "model-a", "prompt": text}, key=TOKENIZER
    )
    assert tokenized.status_code == 200, tokenized.text
    assert (
        tokenized.json()["count"]
        == count_prompt({"prompt": text})
        == len(tokenized.json()["tokens"])
    )
    detokenized = post(
        pooling_stack,
        "/detokenize",
        {"model": "model-a", "tokens": tokenized.json()["tokens"]},
        key=TOKENIZER,
    )
    assert detokenized.status_code == 200 and detokenized.json()["prompt"] == text
    chat = {"model": "model-a", "messages": [{"role": "user", "content": text}]}
    assert post(pooling_stack, "/tokenize", chat, key=TOKENIZER).status_code == 200

    charged = pooling_stack.wait_usage("tokenizer", "model-a", before, requests=3)
    assert charged == Usage(requests=3, prompt=0, completion=0, estimated=0)
    over = post(pooling_stack, "/tokenize", {"model": "model-a", "prompt": "x"}, key=TOKENIZER)
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_tokenizer_requests_need_a_model_the_token_is_granted(
    pooling_stack: Stack, path: str
) -> None:
    missing = post(pooling_stack, path, {"prompt": "hi", "tokens": [1]}, key=ALICE)
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_model"
    refused = post(pooling_stack, path, {"model": "model-b", "prompt": "hi"}, key=BOB)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    anonymous = pooling_stack.http().post(path, json={"model": "model-a", "prompt": "hi"})
    assert anonymous.status_code == 401


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_engine_admin_paths_are_404_and_never_reach_an_engine(
    pooling_stack: Stack, method: str
) -> None:
    """The simulator names itself (x-sim-instance) on every answer it writes, its 404s too."""
    with pooling_stack.http() as http:
        for path in ENGINE_ADMIN_PATHS:
            answer = http.request(
                method,
                path,
                json={"model": "model-a", "lora_name": "x", "lora_path": "/tmp"},
                headers={"authorization": f"Bearer {ALICE}"},
            )
            assert answer.status_code == 404, (path, answer.text)
            assert answer.json()["error"]["code"] == "not_found", path
            assert "x-sim-instance" not in answer.headers, path
        assert http.get(HEALTH_PATH).status_code == 200  # the gateway's own health stays open


def test_every_routed_path_is_one_the_simulator_serves(pooling_stack: Stack) -> None:
    """So that every path the gateway routes is exercised against an engine's answers above."""
    port = pooling_stack.sim_ports["a"]
    for path in ENGINE_PATHS:
        answer = httpx.post(f"http://127.0.0.1:{port}{path}", json={"model": "model-a"})
        assert answer.status_code == 400, (path, answer.text)  # served: the body is refused


HOSTILE = [
    b"not json",
    b"[1, 2]",
    b'{"model": 7, "query": "q", "documents": ["d"]}',
    b'{"model": "model-a", "query": {"a": 1}, "documents": "d", "text_1": 3, "input": null}',
    b'{"model": "model-a", "tokens": "12", "prompt": ["x", 1], "stream": "yes", "n": -1}',
    b'{"model": "model-a"' + b', "input": [' * 3000 + b"]" * 3000 + b"}",
]


@pytest.mark.parametrize(
    "path",
    sorted(p for p, kind in ENGINE_PATHS.items() if kind in (PathKind.POOLING, PathKind.TOKENIZER)),
)
def test_bad_bodies_on_the_new_paths_are_openai_shaped_4xx(pooling_stack: Stack, path: str) -> None:
    with pooling_stack.http() as http:
        for raw in HOSTILE:
            answer = http.post(
                path,
                content=raw,
                headers={"authorization": f"Bearer {POOLER}", "content-type": "application/json"},
            )
            assert 400 <= answer.status_code < 500, (path, raw[:60], answer.text[:200])
            error = answer.json()["error"]
            assert isinstance(error["message"], str) and isinstance(error["type"], str), error
