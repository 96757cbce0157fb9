"""Who was refused and why, and what is in flight, on the gateway's /metrics through real Envoy."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest

from arks.api import token_digest
from tests.support.objects import token
from tests.support.stack import ALICE, Stack, running_stack
from tests.support.waiting import wait_for

RPM = "sk-arks-test-denials-rpm-01"
QUOTA = "sk-arks-test-denials-quota-02"
TPM = "sk-arks-test-denials-tpm-03"
MESSAGES = [{"role": "user", "content": "hi"}]


def _token(user: str, secret: str, quota: str | None = None, **limits: int) -> dict:
    doc = token(user, ["model-a"], tokenHash=token_digest(secret))
    for grant in doc["spec"]["qos"]:
        if quota:
            grant["quota"] = {"name": quota}
        if limits:
            grant["rateLimits"] = [{"type": kind, "value": v} for kind, v in limits.items()]
    return doc


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    suffix = uuid.uuid4().hex[:6]
    documents = [
        {
            "apiVersion": "arks.ai/v1",
            "kind": "ArksQuota",
            "metadata": {"name": f"tiny-{suffix}", "namespace": "default"},
            "spec": {"quotas": [{"type": "total", "value": 10, "period": "day"}]},
        },
        _token(f"rpm-{suffix}", RPM, rpm=1),
        _token(f"quota-{suffix}", QUOTA, quota=f"tiny-{suffix}"),
        _token(f"tpm-{suffix}", TPM, tpm=10),
    ]
    with running_stack(tmp_path_factory.mktemp("denials"), documents) as running:
        running.suffix = suffix  # type: ignore[attr-defined]
        yield running


def chat(stack: Stack, secret: str, model: str = "model-a", **extra: object) -> httpx.Response:
    return httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, "max_tokens": 20, **extra},
        headers={"authorization": f"Bearer {secret}", "x-sim-output-tokens": "5"},
        timeout=30,
    )


def denials(stack: Stack, **labels: str) -> float:
    return stack.metric("arks_gateway_denials_total", **labels)


def test_a_rate_limited_request_is_counted_with_who_and_why(stack: Stack) -> None:
    user = f"rpm-{stack.suffix}"  # type: ignore[attr-defined]
    assert chat(stack, RPM).status_code == 200
    refused = chat(stack, RPM)
    assert refused.status_code == 429
    labels = {
        "status": "429",
        "code": "rate_limit_exceeded",
        "reason": "rpm",
        "namespace": "default",
    }
    assert denials(stack, **labels, user=user, model="model-a") == 1.0


def test_a_request_over_quota_is_counted_with_who_and_why(stack: Stack) -> None:
    user = f"quota-{stack.suffix}"  # type: ignore[attr-defined]
    assert chat(stack, QUOTA).status_code == 200  # spends the 10 tokens (and more)
    stack.usage(user, "model-a")  # settled
    refused = chat(stack, QUOTA)
    assert refused.status_code == 429
    code = refused.json()["error"]["code"]
    assert code == "insufficient_quota"
    labels = {
        "status": "429",
        "code": code,
        "reason": "quota",
        "namespace": "default",
        "user": user,
    }
    assert denials(stack, **labels, model="model-a") == 1.0


def test_a_request_over_a_token_rate_names_the_limit(stack: Stack) -> None:
    user = f"tpm-{stack.suffix}"  # type: ignore[attr-defined]
    assert chat(stack, TPM).status_code == 200
    stack.usage(user, "model-a")  # settled: more than 10 tokens this minute
    refused = chat(stack, TPM)
    assert refused.status_code == 429
    labels = {"status": "429", "code": "rate_limit_exceeded", "reason": "tpm"}
    assert denials(stack, **labels, namespace="default", user=user, model="model-a") == 1.0


def test_an_unknown_key_is_counted_without_a_user_and_never_with_its_text(stack: Stack) -> None:
    secret = "sk-arks-not-a-real-key-" + uuid.uuid4().hex
    assert chat(stack, secret).status_code == 401
    labels = {"status": "401", "code": "invalid_api_key", "reason": "invalid_api_key"}
    assert denials(stack, **labels, namespace="", user="", model="") >= 1.0
    assert secret not in httpx.get(stack.local.metrics_url, timeout=5).text


def test_a_model_the_token_may_not_use_is_counted_with_who_and_the_configured_model(
    stack: Stack,
) -> None:
    user = f"tpm-{stack.suffix}"  # type: ignore[attr-defined]
    refused = chat(stack, TPM, model="model-b")  # configured, but not granted to this token
    assert refused.status_code == 403
    labels = {"status": "403", "code": "model_not_allowed", "reason": "model_not_allowed"}
    assert denials(stack, **labels, namespace="default", user=user, model="model-b") == 1.0


def test_an_unknown_model_is_counted_as_unknown_never_with_the_clients_string(
    stack: Stack,
) -> None:
    user = f"tpm-{stack.suffix}"  # type: ignore[attr-defined]
    invented = "client-invented-model-" + uuid.uuid4().hex
    for model in (invented, "model-ghost"):  # neither is an ArksEndpoint of the namespace
        assert chat(stack, TPM, model=model).status_code == 404
    labels = {"status": "404", "code": "model_not_found", "reason": "model_not_found"}
    assert denials(stack, **labels, namespace="default", user=user, model="unknown") == 2.0
    assert invented not in httpx.get(stack.local.metrics_url, timeout=5).text


def test_a_bad_request_after_the_token_matched_names_the_token(stack: Stack) -> None:
    user = f"rpm-{stack.suffix}"  # type: ignore[attr-defined]
    refused = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"messages": MESSAGES},  # no model
        headers={"authorization": f"Bearer {RPM}"},
        timeout=30,
    )
    assert refused.status_code == 400
    code = refused.json()["error"]["code"]
    labels = {"status": "400", "code": code, "reason": code}
    assert denials(stack, **labels, namespace="default", user=user, model="unknown") == 1.0


def test_a_stream_is_in_flight_until_it_ends(stack: Stack) -> None:
    def in_flight() -> float:
        return stack.metric("arks_in_flight_requests", namespace="default", model="model-a")

    assert in_flight() == 0.0
    answer: list[int] = []

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{stack.url}/v1/chat/completions",
            json={"model": "model-a", "messages": MESSAGES, "max_tokens": 20, "stream": True},
            headers={"authorization": f"Bearer {ALICE}", "x-sim-tpot-ms": "300"},
            timeout=30,
        ) as response:
            answer.append(response.status_code)
            response.read()

    thread = threading.Thread(target=stream)
    thread.start()
    wait_for(in_flight, lambda value: value == 1.0)
    thread.join()
    assert answer == [200]
    wait_for(in_flight, lambda value: value == 0.0)
