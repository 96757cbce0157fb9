"""Slow clients against the real stack: connections that trickle their headers or their body
(slow loris), and clients that read a long answer very slowly or stop reading. Other tenants must
still be served promptly, Envoy's memory must stay bounded, and a connection that never finishes
its headers must not be held for long."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from arks.api import token_digest
from tests.chaos.attack import engine_tokens
from tests.chaos.figures import Figure, Recorder
from tests.support.objects import token
from tests.support.stack import BOB, Stack, running_stack

pytestmark = pytest.mark.timeout(120)

GROUP = "Slow clients"
SLOW = "sk-arks-chaos-slow-client-0123"
HEADERS_BOUND_S = 20.0  # a connection still sending its headers is dropped within this
MEMORY_BOUND_MIB = 64.0  # Envoy's growth while the slow clients hold their connections
CHAT = {"model": "model-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    user = f"slow-{uuid.uuid4().hex[:6]}"
    documents = [token(user, ["model-a"], tokenHash=token_digest(SLOW))]
    with running_stack(tmp_path_factory.mktemp("slow"), documents) as running:
        running.slow_user = user  # type: ignore[attr-defined]
        yield running


def envoy_rss_mib(stack: Stack) -> float:
    envoy = next(c for c in stack.local.supervisor.children if c.name == "envoy")
    for line in Path(f"/proc/{envoy.popen.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS for envoy")


def others_latencies_ms(stack: Stack, requests: int = 40) -> tuple[list[float], list[int]]:
    """Another tenant's (bob's) requests, one after another: their latencies and statuses."""
    latencies, statuses = [], []
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        for _ in range(requests):
            start = time.perf_counter()
            r = client.post(
                "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {BOB}"}
            )
            latencies.append((time.perf_counter() - start) * 1000)
            statuses.append(r.status_code)
    return latencies, statuses


class Trickler(threading.Thread):
    """One connection sending `head` then `rest` a byte every `every_s`; notes when Envoy
    answered or closed it (None while it stays open)."""

    def __init__(self, port: int, head: bytes, rest: bytes, every_s: float, until: float):
        super().__init__(daemon=True)
        self.port, self.head, self.rest, self.every_s, self.until = port, head, rest, every_s, until
        self.closed_after: float | None = None
        self.answer = b""

    def run(self) -> None:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.setblocking(False)
            try:
                sock.sendall(self.head)
                for i in range(len(self.rest)):
                    if time.monotonic() > self.until:
                        return
                    try:
                        data = sock.recv(65536)
                        if data == b"" or data:
                            self.answer += data
                            self.closed_after = time.monotonic() - start
                            return
                    except BlockingIOError:
                        pass
                    sock.send(self.rest[i : i + 1])
                    time.sleep(self.every_s)
            except OSError:
                self.closed_after = time.monotonic() - start


def test_slow_loris_connections_do_not_hurt_other_tenants(
    slow_stack: Stack, figures: Recorder
) -> None:
    """20 connections trickle their headers and 20 more (with a valid credential) their 100 KB
    body, a byte every 0.2 s. Bob's requests meanwhile: all 200, p50 under 50 ms; Envoy's memory
    grows by less than 64 MiB; the header tricklers are dropped within 20 s."""
    port = int(slow_stack.url.rsplit(":", 1)[1])
    rss_before = envoy_rss_mib(slow_stack)
    until = time.monotonic() + HEADERS_BOUND_S + 2
    header_lines = b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n" + b"".join(
        f"x-pad-{i}: {'a' * 40}\r\n".encode() for i in range(200)
    )
    body_head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n"
        + f"authorization: Bearer {SLOW}\r\ncontent-type: application/json\r\n".encode()
        + b"content-length: 100000\r\n\r\n"
    )
    headers_slow = [
        Trickler(port, header_lines[:40], header_lines[40:], 0.2, until) for _ in range(20)
    ]
    bodies_slow = [
        Trickler(port, body_head, b'{"model": "model-a", "x": "' + b"a" * 99000, 0.2, until)
        for _ in range(20)
    ]
    for t in headers_slow + bodies_slow:
        t.start()
    time.sleep(1)
    latencies, statuses = others_latencies_ms(slow_stack)
    rss_during = envoy_rss_mib(slow_stack)
    for t in headers_slow + bodies_slow:
        t.join(timeout=HEADERS_BOUND_S + 5)
    dropped_headers = [t.closed_after for t in headers_slow if t.closed_after is not None]
    dropped_bodies = [t.closed_after for t in bodies_slow if t.closed_after is not None]
    p50 = statistics.median(latencies)
    held = sum(s == 200 for s in statuses) + len(dropped_headers)
    figures.record(
        Figure(
            GROUP,
            "slow loris: headers and bodies trickled",
            {"header_tricklers": 20, "body_tricklers": 20, "byte_every_s": 0.2},
            len(statuses) + len(headers_slow),
            held,
            note=f"other tenant p50 {p50:.1f} ms, max {max(latencies):.0f} ms; Envoy RSS "
            f"+{rss_during - rss_before:.1f} MiB; header tricklers dropped "
            f"{len(dropped_headers)}/20 within {HEADERS_BOUND_S:.0f} s, body tricklers "
            f"{len(dropped_bodies)}/20",
        )
    )
    assert statuses == [200] * len(statuses)
    assert p50 < 50, latencies
    assert rss_during - rss_before < MEMORY_BOUND_MIB
    assert len(dropped_headers) == len(headers_slow), (
        f"{len(headers_slow) - len(dropped_headers)} connections still sending headers after "
        f"{HEADERS_BOUND_S} s"
    )
    for t in headers_slow:
        if t.answer:  # a 408 must be OpenAI-shaped JSON like every other error
            assert b"application/json" in t.answer.lower(), t.answer[:300]


def test_slow_and_stalled_readers_do_not_hurt_other_tenants(
    slow_stack: Stack, figures: Recorder
) -> None:
    """10 clients ask for a 50,000-token stream; five read 4 KiB every 0.1 s, five read nothing.
    Meanwhile bob is served promptly, Envoy's memory stays bounded (flow control holds the
    engine back instead of buffering its answer), and when the readers leave after 4 s each
    request is charged once."""
    user = slow_stack.slow_user  # type: ignore[attr-defined]
    before = slow_stack.usage(user, "model-a")
    engine_before = engine_tokens(slow_stack.sim_ports["a"], "model-a")
    rss_before = envoy_rss_mib(slow_stack)
    port = int(slow_stack.url.rsplit(":", 1)[1])
    body = json.dumps({**CHAT, "max_tokens": 50000, "stream": True}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n"
        + f"authorization: Bearer {SLOW}\r\ncontent-type: application/json\r\n".encode()
        + f"x-sim-output-tokens: 50000\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    read: list[int] = [0] * 10

    def reader(i: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            sock.sendall(request)
            end = time.monotonic() + 4
            while time.monotonic() < end:
                if i < 5:
                    read[i] += len(sock.recv(4096))
                time.sleep(0.1)

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(10)]
    for t in threads:
        t.start()
    time.sleep(1)
    latencies, statuses = others_latencies_ms(slow_stack, 30)
    rss_during = envoy_rss_mib(slow_stack)
    for t in threads:
        t.join(timeout=10)
    usage = slow_stack.wait_usage(user, "model-a", before, requests=10, timeout=15)
    engine = engine_tokens(slow_stack.sim_ports["a"], "model-a") - engine_before
    p50 = statistics.median(latencies)
    figures.record(
        Figure(
            GROUP,
            "slow and stalled readers of 50,000-token streams",
            {"slow_readers": 5, "stalled_readers": 5, "read": "4 KiB / 0.1 s", "for_s": 4},
            len(statuses) + 10,
            sum(s == 200 for s in statuses) + (10 if usage.requests == 10 else 0),
            engine,
            usage.prompt + usage.completion,
            note=f"other tenant p50 {p50:.1f} ms; Envoy RSS +{rss_during - rss_before:.1f} MiB; "
            f"read by the slow readers {sum(read) // 1024} KiB; {usage.estimated} estimated",
        )
    )
    assert statuses == [200] * len(statuses)
    assert p50 < 50, latencies
    assert rss_during - rss_before < MEMORY_BOUND_MIB
    assert usage.requests == 10
