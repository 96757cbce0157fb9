"""What a finished request is charged: the engine's usage when reported, an estimate otherwise."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from extproc.usage import Finished, Usage, streamed_tokens_estimate, usage_of
from launcher.sim import Plan, Shape

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"

DONE = Finished(
    request_id="req-1",
    namespace="default",
    user="alice",
    model="qwen",
    path=CHAT,
    stream=False,
    status=200,
    prompt_tokens=None,
    completion_tokens=None,
    prompt_estimate=None,
    request_body_bytes=0,
    response_body_bytes=0,
)


def finished(**changes: object) -> Finished:
    return replace(DONE, **changes)  # type: ignore[arg-type]


def simulated_stream(
    tokens: int, path: str, model: str, *, usage_chunk: bool, disconnect_after: int | None = None
) -> bytes:
    """The bytes the engine simulator sends for a streamed answer of `tokens` tokens."""
    plan = Plan(
        model=model,
        body={"stream_options": {"include_usage": True}},
        stream=True,
        prompt_tokens=20,
        tokens=tokens,
        finish_reason="stop",
        ttft=0.0,
        tpot=0.0,
        disconnect_after=disconnect_after,
        omit_usage=not usage_chunk,
    )
    head, token, last, tail = Shape.new(path == CHAT, model).stream_parts(plan)
    if disconnect_after is not None:  # what the simulator sends before it drops the connection
        return head + token * disconnect_after
    return head + token * (tokens - 1) + last + tail


# --- engine-reported usage --------------------------------------------------------------------


def test_reported_usage_is_charged_exactly() -> None:
    usage = usage_of(
        finished(
            prompt_tokens=12, completion_tokens=34, prompt_estimate=99, response_body_bytes=5000
        )
    )

    assert usage == Usage("default", "alice", "qwen", 12, 34, estimated=None)
    assert usage.total_tokens == 46


def test_reported_usage_wins_over_an_interruption() -> None:
    usage = usage_of(
        finished(
            stream=True, prompt_tokens=12, completion_tokens=3, interrupted="client_disconnected"
        )
    )

    assert usage == Usage("default", "alice", "qwen", 12, 3)


def test_reported_zero_usage_is_still_reported() -> None:
    assert usage_of(finished(prompt_tokens=0, completion_tokens=0)) == Usage(
        "default", "alice", "qwen", 0, 0
    )


def test_reported_embedding_usage_is_charged_exactly() -> None:
    # OpenAI-shaped embedding answers report prompt_tokens and total_tokens, no completion_tokens.
    usage = usage_of(
        finished(
            path=EMBEDDINGS,
            prompt_tokens=7,
            prompt_estimate=9,
            request_body_bytes=400,
            response_body_bytes=900,
        )
    )

    assert usage == Usage("default", "alice", "qwen", 7, 0, estimated=None)


# --- no usage: estimate, and say why ----------------------------------------------------------


def test_missing_usage_is_estimated_with_a_reason() -> None:
    usage = usage_of(finished(prompt_estimate=25, response_body_bytes=250 + 4 * 30))

    assert usage == Usage("default", "alice", "qwen", 25, 30, estimated="no_usage_reported")


def test_interrupted_request_is_estimated_with_the_interruption_as_reason() -> None:
    usage = usage_of(finished(prompt_estimate=25, interrupted="client_disconnected"))

    assert usage is not None
    assert usage.estimated == "client_disconnected"
    assert usage.prompt_tokens == 25


def test_reset_before_any_answer_is_not_charged() -> None:
    # Envoy answers 503 itself when the engine resets before answering: the client got no answer.
    assert usage_of(finished(status=503, prompt_estimate=25, interrupted="upstream_reset")) is None


def test_client_leaving_before_the_answer_is_charged_the_prompt() -> None:
    # No status reached the client (0), but the engine already read the prompt.
    usage = usage_of(
        finished(
            status=0, prompt_estimate=25, response_body_bytes=0, interrupted="client_disconnected"
        )
    )

    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (
        25,
        0,
        "client_disconnected",
    )


@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
def test_error_answer_without_usage_costs_nothing(status: int) -> None:
    assert usage_of(finished(status=status, prompt_estimate=25, response_body_bytes=120)) is None


def test_prompt_estimate_is_used_when_present() -> None:
    usage = usage_of(finished(prompt_estimate=17, request_body_bytes=100_000))

    assert usage is not None and usage.prompt_tokens == 17


def test_prompt_is_estimated_from_the_body_size_without_an_estimate() -> None:
    usage = usage_of(finished(request_body_bytes=40 + 4 * 50 + 1))

    assert usage is not None and usage.prompt_tokens == 51  # rounded up: a partial token is a token


def test_tiny_bodies_estimate_zero_not_negative_tokens() -> None:
    usage = usage_of(finished(request_body_bytes=10, response_body_bytes=10))

    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (0, 0)


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank", "/score", "/pooling",
                                  "/classify", "/v1/classify"])  # fmt: skip
def test_pooling_answers_are_charged_their_prompt_and_no_completion(path: str) -> None:
    reported = usage_of(finished(path=path, prompt_tokens=12))  # usage.lua: total-only is prompt
    unreported = usage_of(finished(path=path, prompt_estimate=9, response_body_bytes=50_000))

    assert reported == Usage("default", "alice", "qwen", 12, 0)
    assert unreported == Usage("default", "alice", "qwen", 9, 0, estimated="no_usage_reported")


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_tokenizer_requests_cost_no_tokens_and_no_estimate(path: str) -> None:
    answered = finished(path=path, prompt_sample='{"model":"qwen","prompt":"a long text"}',
                        answer_sample="%7B%22count%22%3A3%7D", response_body_bytes=900)  # fmt: skip

    assert usage_of(answered) == Usage("default", "alice", "qwen", 0, 0)
    assert usage_of(replace(answered, status=400)) is None


def test_unreported_embeddings_cost_no_completion_tokens() -> None:
    usage = usage_of(finished(path=EMBEDDINGS, prompt_estimate=8, response_body_bytes=50_000))

    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (8, 0)


def test_unreported_streamed_answer_estimates_from_streamed_bytes() -> None:
    body = simulated_stream(50, CHAT, "qwen", usage_chunk=False)

    usage = usage_of(finished(stream=True, prompt_estimate=20, response_body_bytes=len(body)))

    assert usage is not None
    assert usage.completion_tokens == streamed_tokens_estimate(len(body), "qwen", CHAT)
    assert usage.estimated == "no_usage_reported"


# --- the streamed estimate is calibrated on the chunks engines send ---------------------------


def _within(estimate: int, actual: int, tolerance: float = 0.02) -> bool:
    """Within 2 % and a token: the chunk shapes are known, so the estimate is near exact (a
    20 % band let a chat stream be measured with the completions chunk, or the chunk size be
    8 bytes off, unnoticed)."""
    return abs(estimate - actual) <= tolerance * actual + 1


@pytest.mark.parametrize("tokens", [5, 50, 500, 5000])
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("model", ["qwen", "meta-llama/Llama-3.1-8B-Instruct"])
def test_streamed_estimate_is_within_2_percent_of_the_tokens_sent(
    tokens: int, path: str, model: str
) -> None:
    body = simulated_stream(tokens, path, model, usage_chunk=False)

    estimate = streamed_tokens_estimate(len(body), model, path)

    assert _within(estimate, tokens), f"{estimate} estimated for {tokens} tokens"


@pytest.mark.parametrize("sent", [5, 50, 500])
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_streamed_estimate_of_a_cut_stream_is_within_2_percent(sent: int, path: str) -> None:
    body = simulated_stream(1000, path, "qwen", usage_chunk=False, disconnect_after=sent)

    estimate = streamed_tokens_estimate(len(body), "qwen", path)

    assert _within(estimate, sent), f"{estimate} estimated for {sent} tokens"


def test_streamed_estimate_of_nothing_is_zero() -> None:
    assert streamed_tokens_estimate(0, "qwen", CHAT) == 0
    assert streamed_tokens_estimate(0, "qwen", COMPLETIONS) == 0


def test_streamed_estimate_grows_with_the_bytes() -> None:
    small = streamed_tokens_estimate(10_000, "qwen", CHAT)
    large = streamed_tokens_estimate(1_000_000, "qwen", CHAT)

    assert 0 < small < large
    assert math.isclose(
        large / small, 100, rel_tol=0.1
    )  # linear, but for the fixed role and finish chunks


def test_a_reported_prompt_without_a_completion_count_is_still_an_estimate() -> None:
    usage = usage_of(finished(prompt_tokens=12, response_body_bytes=250 + 80))
    assert usage is not None and usage.estimated == "no_usage_reported"
    assert usage.completion_tokens > 0


def test_a_streamed_estimate_uses_the_requests_model_name() -> None:
    model = "meta-llama/Llama-3.1-8B-Instruct"
    body = simulated_stream(500, CHAT, model, usage_chunk=False)
    usage = usage_of(finished(model=model, stream=True, response_body_bytes=len(body)))
    assert usage is not None
    assert usage.completion_tokens == streamed_tokens_estimate(len(body), model, CHAT)
    assert _within(usage.completion_tokens, 500)
