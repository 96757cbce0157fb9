"""Steady load from a few client threads, for fault injections: what each request got back and
how many tokens reached its client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx
import redis


@dataclass(frozen=True)
class Outcome:
    status: int  # 0: no answer (connection refused or reset before a status)
    code: object  # the error code of an error answer
    complete: bool  # a 200 whose answer arrived whole (a stream up to [DONE])
    tokens: int  # completion tokens that reached the client

    def held(self, refusals: frozenset[object]) -> bool:
        """Answered whole, or refused as documented (`refusals`: the error codes expected)."""
        return (self.status == 200 and self.complete) or (
            400 <= self.status < 600 and self.code in refusals
        )


def one_request(
    client: httpx.Client, body: Mapping[str, object], headers: Mapping[str, str]
) -> Outcome:
    """One chat request, streamed or not as `body` says, read to its end (or until it breaks)."""
    status, tokens = 0, 0
    try:
        with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            status = r.status_code
            if status != 200:
                raw = r.read()
                try:
                    code = json.loads(raw)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = None
                return Outcome(status, code, False, 0)
            if not body.get("stream"):
                answer = json.loads(r.read())
                return Outcome(200, None, True, answer["usage"]["completion_tokens"])
            done = False
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    for choice in json.loads(line[6:]).get("choices", []):
                        tokens += bool(choice.get("delta", {}).get("content"))
            return Outcome(200, None, done, tokens)
    except (httpx.HTTPError, ValueError):
        return Outcome(status, None, False, tokens)  # cut: what arrived before the break


class Load:
    """`clients` threads sending requests one after another until `stop()`."""

    def __init__(
        self,
        url: str,
        clients: int,
        body: Mapping[str, object],
        headers: Mapping[str, str],
        timeout: float = 30,
    ) -> None:
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(url, body, headers, timeout), daemon=True)
            for _ in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _run(
        self, url: str, body: Mapping[str, object], headers: Mapping[str, str], timeout: float
    ) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as client:
            while not self._stop.is_set():
                outcome = one_request(client, body, headers)
                with self._lock:
                    self.outcomes.append(outcome)
                if outcome.status != 200:
                    time.sleep(0.02)  # a refusal comes back at once: do not spin

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return list(self.outcomes)


def during(load: Load, seconds: float, *steps: tuple[float, Callable[[], None]]) -> None:
    """Let `load` run for `seconds`, doing each (at, action) `at` seconds after the start."""
    start = time.monotonic()
    for at, action in steps:
        time.sleep(max(0.0, start + at - time.monotonic()))
        action()
    time.sleep(max(0.0, start + seconds - time.monotonic()))


def redis_ledger(url: str, quota: str) -> int:
    """The quota's used total in Redis (all its periods): what the ledger holds."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"*quota/default/{quota}/total/*:used"))
        return sum(int(v or 0) for v in client.mget(keys)) if keys else 0
    finally:
        client.close()


def settled(get: Callable[[], int], quiet_s: float = 1.5, timeout: float = 15) -> int:
    """`get()` once it stopped changing for `quiet_s` (settlements still arriving move it)."""
    deadline = time.monotonic() + timeout
    value, since = get(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = get()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return value
