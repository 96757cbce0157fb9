"""What the bench sends: OpenAI chat requests, non-streamed and streamed, at two concurrencies."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from tests.bench.targets import MODEL

PATH = "/v1/chat/completions"
STREAM_CHUNKS = 1000


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    short: str  # for the budget table
    connections: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def streamed(self) -> bool:
        return bool(self.body.get("stream"))

    def request_headers(self, token: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            **dict(self.headers),
        }

    def body_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()


_CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]}
_LONG = (("x-sim-output-tokens", str(STREAM_CHUNKS)),)


def chat(connections: int) -> Workload:
    return Workload(
        f"chat-c{connections}",
        f"non-streamed chat, concurrency {connections}",
        f"chat, c={connections}",
        connections,
        _CHAT,
    )


def stream(connections: int, *, client_asks_usage: bool) -> Workload:
    if client_asks_usage:
        body = {**_CHAT, "stream": True, "stream_options": {"include_usage": True}}
        return Workload(
            f"stream-usage-c{connections}",
            f"streamed chat, {STREAM_CHUNKS} chunks, client sends include_usage, concurrency {connections}",
            f"stream {STREAM_CHUNKS}, client asks usage, c={connections}",
            connections,
            body,
            _LONG,
        )
    return Workload(
        f"stream-c{connections}",
        f"streamed chat, {STREAM_CHUNKS} chunks, no include_usage (gateway rewrites the body), concurrency {connections}",
        f"stream {STREAM_CHUNKS}, gateway adds usage, c={connections}",
        connections,
        {**_CHAT, "stream": True},
        _LONG,
    )


def all_workloads(*, stream_c32: bool) -> list[Workload]:
    out = [chat(1), chat(32), stream(1, client_asks_usage=True), stream(1, client_asks_usage=False)]
    if stream_c32:
        out += [stream(32, client_asks_usage=True), stream(32, client_asks_usage=False)]
    return out


class PreflightError(RuntimeError):
    """One request of a workload did not get the answer it should have, before any load."""


def preflight(base_url: str, workload: Workload, token: str, config: str) -> None:
    """Send one request and check the answer, so a broken config fails with its body, not a count."""
    request = urllib.request.Request(
        base_url + PATH,
        data=workload.body_bytes(),
        headers=workload.request_headers(token),
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            status, text = resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode(errors="replace")
    where = f"{workload.key} via {config}"
    if status != 200:
        raise PreflightError(f"{where}: status {status}: {text[:500]}")
    if workload.streamed:
        chunks = text.count("data: ")
        if chunks < STREAM_CHUNKS or not text.rstrip().endswith("data: [DONE]"):
            raise PreflightError(
                f"{where}: expected {STREAM_CHUNKS}+ SSE chunks ending in [DONE], got {chunks}"
            )
    elif '"choices"' not in text:
        raise PreflightError(f"{where}: not a chat completion: {text[:500]}")
