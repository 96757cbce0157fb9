"""Shared pieces of the attacks: what a correct answer looks like, the engine's own token counts,
and a wave of concurrent clients."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.stack import Stack


def error_problem(status: int, headers: Mapping[str, str], body: bytes) -> str | None:
    """Why an error answer is not OpenAI-shaped (`{"error": {"message", "type", "code"}}` as
    JSON), or None when it is."""
    if not headers.get("content-type", "").startswith("application/json"):
        return f"{status} with content-type {headers.get('content-type')!r}: {body[:200]!r}"
    try:
        parsed = json.loads(body)
    except ValueError:
        return f"{status} with a body that is no JSON: {body[:200]!r}"
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if set(parsed) != {"error"} or not isinstance(error, dict):
        return f"{status} without one error object: {body[:200]!r}"
    if not {"message", "type", "code"} <= set(error) or not error["message"]:
        return f"{status} error lacks message/type/code: {body[:200]!r}"
    return None


def answer_problem(
    status: int, headers: Mapping[str, str], body: bytes, secrets: Sequence[str], *, head: bool
) -> str | None:
    """Why an answer to a hostile request is wrong: a 5xx, an error not OpenAI-shaped, or a
    credential echoed back. None when it is right."""
    for secret in secrets:
        if secret.encode() in body or any(secret in v for v in headers.values()):
            return f"{status} answer holds a credential"
    if status >= 500:
        return f"{status}: {body[:300]!r}"
    if status >= 400 and not head:
        return error_problem(status, headers, body)
    return None


def engine_tokens(port: int, model: str) -> int:
    """Prompt plus generated tokens the simulated engine on `port` processed for `model`: the
    truth the gateway's charges are compared with."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (
                "vllm:prompt_tokens_total",
                "vllm:generation_tokens_total",
            ) and (sample.labels.get("model_name") == model):
                total += sample.value
    return int(total)


def engine_running(port: int, model: str) -> int:
    """Requests the simulated engine on `port` is generating for `model` right now."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:num_requests_running" and (
                sample.labels.get("model_name") == model
            ):
                return int(sample.value)
    return 0


def charged_tokens(stack: Stack, user: str, model: str) -> int:
    usage = stack.usage(user, model)
    return usage.prompt + usage.completion


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: Mapping[str, str]

    @property
    def code(self) -> object:
        error = self.body.get("error")
        return error.get("code") if isinstance(error, dict) else None


def wave(
    url: str,
    clients: int,
    body: bytes,
    headers: Mapping[str, str],
    path: str = "/v1/chat/completions",
) -> list[Answer]:
    """`clients` requests of a JSON `body` at once (one connection each), all sent before any
    is answered."""

    async def run() -> list[Answer]:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

            async def one() -> Answer:
                r = await client.post(
                    path,
                    content=body,
                    headers={"content-type": "application/json", **headers},
                )
                try:
                    parsed = r.json()
                except ValueError:
                    parsed = {"raw": r.text[:200]}
                return Answer(r.status_code, parsed, dict(r.headers))

            return list(await asyncio.gather(*(one() for _ in range(clients))))

    return asyncio.run(run())


def quota_used(stack: Stack, name: str) -> int:
    """What the quota `name` has used in its current periods, from the gateway's state file
    (snapshotted every 0.5 s in tests)."""
    state = stack.local.settings.state_dir / "quota-state.json"
    data = json.loads(state.read_text()) if state.exists() else {"used": {}}
    return sum(v for k, v in data["used"].items() if f"/{name}/" in k and "/total/" in k)


def quota_doc(name: str, value: int, period: str = "month") -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksQuota",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"quotas": [{"type": "total", "value": value, "period": period}]},
    }


def within_one_minute(needed_s: float) -> None:
    """Wait for the next UTC minute unless `needed_s` still fit in this one: fixed rpm/tpm
    windows must not turn over in the middle of an attack whose admitted count is checked."""
    into = time.time() % 60
    if into > 60 - needed_s:
        time.sleep(60.2 - into)
