"""An ArksToken's rate limits, enforced by the gateway through real Envoy: rpm, rpd, tpm, tpd."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from arks.adapters.redis.backend import RedisBackend
from arks.api import parse_token, token_digest
from arks.limits.backends import MemoryBackend
from arks.limits.config import RateLimitConfig
from arks.limits.limiter import Limiter
from arks.limits.metrics import RateLimitMetrics
from extproc import qos
from extproc.decision import Identity
from tests.support.objects import token
from tests.support.stack import Stack, running_stack

RPM_TOKEN = "sk-arks-test-rpm-1b2c3d"
TPM_TOKEN = "sk-arks-test-tpm-4e5f6a"
BUSY_TOKEN = "sk-arks-test-busy-7c8d9e"
MESSAGES = [{"role": "user", "content": "Count to three."}]


def limited(user: str, secret: str, **limits: int) -> dict:
    doc = token(user, ["model-a", "model-b"], tokenHash=token_digest(secret))
    for grant in doc["spec"]["qos"]:
        grant["rateLimits"] = [{"type": kind, "value": value} for kind, value in limits.items()]
    return doc


@pytest.fixture(scope="module", params=["memory", "redis"])
def qos_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    redis = "redis://127.0.0.1:6379/0" if request.param == "redis" else None
    # Fresh user names per run: counters in the shared Redis outlive a test run.
    suffix = uuid.uuid4().hex[:6]
    documents = [
        limited(f"rpm-{suffix}", RPM_TOKEN, rpm=3),
        limited(f"tpm-{suffix}", TPM_TOKEN, tpm=400),
        limited(f"busy-{suffix}", BUSY_TOKEN, rpm=4, concurrency=1),
    ]
    with running_stack(tmp_path_factory.mktemp("qos"), documents, redis=redis) as running:
        running.suffix = suffix  # type: ignore[attr-defined]
        yield running


def test_the_request_over_rpm_gets_429_with_retry_after_and_headers(qos_stack: Stack) -> None:
    client = qos_stack.client(RPM_TOKEN)
    for _ in range(3):
        client.chat.completions.create(model="model-a", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as limited_error:
        client.chat.completions.create(model="model-a", messages=MESSAGES)
    response = limited_error.value.response
    assert limited_error.value.code == "rate_limit_exceeded"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["ratelimit-remaining"] == "0"
    assert response.headers["ratelimit-limit"].startswith("3")
    # per model: the same token still has its budget on another model
    client.chat.completions.create(model="model-b", messages=MESSAGES)


def test_tpm_is_charged_the_engine_reported_tokens_of_streamed_answers(qos_stack: Stack) -> None:
    user = f"tpm-{qos_stack.suffix}"  # type: ignore[attr-defined]
    client = qos_stack.client(TPM_TOKEN)
    before = qos_stack.usage(user, "model-a")
    usage = None
    for chunk in client.chat.completions.create(
        model="model-a",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},  # the client sees the usage the gateway reads
        max_tokens=150,
        extra_headers={"x-sim-output-tokens": "150"},
    ):
        usage = chunk.usage or usage
    assert usage is not None
    qos_stack.wait_usage(user, "model-a", before)
    # A request whose reservation does not fit is refused, and says what the minute holds:
    # exactly the tokens the engine reported, nothing reserved any more.
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="model-a", messages=MESSAGES, max_tokens=400)
    assert f"{usage.total_tokens} used and 0 reserved" in refused.value.message
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 60
    # one that fits still goes through
    client.chat.completions.create(
        model="model-a",
        messages=MESSAGES,
        max_tokens=100,
        extra_headers={"x-sim-output-tokens": "5"},
    )


def test_requests_refused_for_concurrency_do_not_use_up_rpm(qos_stack: Stack) -> None:
    """40 clients at once on a token with one slot: one runs, 39 are refused, and those refusals
    leave the minute's rpm untouched, so the tenant is not locked out by its own refused calls."""
    body = {"model": "model-a", "messages": MESSAGES}
    slow = {"authorization": f"Bearer {BUSY_TOKEN}", "x-sim-ttft-ms": "1500"}
    if time.time() % 60 > 45:  # the test takes ~2 s and must stay within one rpm window
        time.sleep(60.5 - time.time() % 60)
    with qos_stack.http() as http, ThreadPoolExecutor(40) as pool:
        answers = list(
            pool.map(
                lambda _: http.post("/v1/chat/completions", json=body, headers=slow), range(40)
            )
        )
        codes = sorted(a.status_code for a in answers)
        assert codes == [200] + [429] * 39, codes
        refusals = {a.json()["error"]["message"] for a in answers if a.status_code == 429}
        assert all("concurrent" in m for m in refusals), refusals
        fast = {"authorization": f"Bearer {BUSY_TOKEN}"}
        # rpm 4: the one admitted above and three more fit in this minute, one at a time (a slot
        # is free once the access log has settled the request before)
        user = f"busy-{qos_stack.suffix}"  # type: ignore[attr-defined]
        for _ in range(3):
            qos_stack.usage(user, "model-a")
            assert http.post("/v1/chat/completions", json=body, headers=fast).status_code == 200
        qos_stack.usage(user, "model-a")
        over = http.post("/v1/chat/completions", json=body, headers=fast)
    assert over.status_code == 429 and over.headers["ratelimit-limit"].startswith("4")


# --- request limits with a controlled clock (the limiter as extproc uses it) -------------------


@pytest.fixture(params=["memory", "redis"])
async def limiter_and_clock(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[Limiter, list[float]]]:
    now = [1_800_000_000.0]  # a fixed instant, moved by the test
    backend = (
        RedisBackend("redis://127.0.0.1:6379/0", prefix=f"arks:test:{uuid.uuid4().hex}:")
        if request.param == "redis"
        else MemoryBackend()
    )
    yield Limiter(RateLimitConfig, backend, RateLimitMetrics.create(), clock=lambda: now[0]), now
    await backend.close()


async def test_rpd_allows_the_days_budget_then_resets_at_midnight_utc(limiter_and_clock) -> None:  # type: ignore[no-untyped-def]
    limiter, now = limiter_and_clock
    identity = Identity("default", "dora", "model-a")
    parsed = parse_token(limited("dora", "x", rpd=5)).qos[0]
    day_start = now[0] // 86400 * 86400
    now[0] = day_start + 3600  # 01:00 UTC
    results = [(await limiter.decide(qos.admission(identity, parsed))).over_limit for _ in range(6)]
    assert results == [False] * 5 + [True]
    now[0] = day_start + 86400 - 1  # 23:59:59, same day
    assert (await limiter.decide(qos.admission(identity, parsed))).over_limit
    now[0] = day_start + 86400  # midnight: a new day
    assert not (await limiter.decide(qos.admission(identity, parsed))).over_limit
