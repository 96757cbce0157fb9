"""A gateway process killed mid-request, with counters in Redis: the concurrency slots and
reservations its requests held are free again within one lease ttl (they used to stay held for
the 630 s lease, locking the tenant out)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from arks.api import token_digest
from launcher.procs import wait_http
from tests.support.objects import token
from tests.support.stack import running_stack
from tests.support.waiting import wait_for

SLOT_TOKEN = "sk-arks-test-crash-slot-5e6f"

pytestmark = pytest.mark.timeout(90)


def test_slots_held_by_a_killed_gateway_are_free_within_the_lease_ttl(tmp_path: Path) -> None:
    user = f"crash-{uuid.uuid4().hex[:6]}"  # counters in the shared Redis outlive a run
    one_slot = token(user, ["model-a"], tokenHash=token_digest(SLOT_TOKEN))
    one_slot["spec"]["qos"][0]["rateLimits"] = [{"type": "concurrency", "value": 1}]
    with running_stack(
        tmp_path, [one_slot], redis="redis://127.0.0.1:6379/0", extproc_args=("--lease-ttl-s", "3")
    ) as stack:
        body = {"model": "model-a", "messages": [{"role": "user", "content": "hi"}]}
        auth = {"authorization": f"Bearer {SLOT_TOKEN}"}

        def slow() -> None:  # holds the one slot, then loses its gateway mid-answer
            try:
                httpx.post(
                    f"{stack.url}/v1/chat/completions",
                    json=body,
                    headers={**auth, "x-sim-ttft-ms": "30000"},
                    timeout=40,
                )
            except httpx.HTTPError:
                pass

        holder = threading.Thread(target=slow, daemon=True)
        holder.start()
        wait_for(
            lambda: httpx.post(
                f"{stack.url}/v1/chat/completions", json=body, headers=auth, timeout=10
            ),
            lambda answer: answer.status_code == 429,
            timeout=10,
        )  # the slot is taken
        extproc = next(c for c in stack.local.supervisor.children if c.name == "extproc")
        os.killpg(extproc.popen.pid, signal.SIGKILL)
        extproc.popen.wait()
        killed = time.monotonic()
        stack.local.supervisor.restart(extproc)
        wait_http(extproc, stack.local.metrics_url)
        answer = wait_for(
            lambda: httpx.post(
                f"{stack.url}/v1/chat/completions", json=body, headers=auth, timeout=10
            ),
            lambda answer: answer.status_code == 200,
            timeout=15,
        )
        assert answer.status_code == 200
        assert time.monotonic() - killed < 10  # one lease ttl (3 s) and a restart, not 630 s


def test_a_stalled_gateway_answers_a_clear_504_and_serves_again_when_it_resumes(
    tmp_path: Path,
) -> None:
    """extproc SIGSTOPped (a stall: alive, connected, silent): Envoy's message timeout answers
    504 `gateway_timeout` with a message (it was an empty one); resumed, it serves at once."""
    with running_stack(tmp_path) as stack:
        extproc = next(c for c in stack.local.supervisor.children if c.name == "extproc")
        client = stack.client(timeout=30)
        hello = [{"role": "user", "content": "hi"}]
        assert client.chat.completions.create(model="model-a", messages=hello).choices
        os.kill(extproc.popen.pid, signal.SIGSTOP)
        try:
            with pytest.raises(openai.APIStatusError) as stalled:
                client.chat.completions.create(model="model-a", messages=hello)
        finally:
            os.kill(extproc.popen.pid, signal.SIGCONT)
        assert stalled.value.status_code == 504, stalled.value.response.text
        assert stalled.value.code == "gateway_timeout", stalled.value.response.text
        assert "did not answer in time" in stalled.value.message
        answer = wait_for(
            lambda: client.chat.completions.create(model="model-a", messages=hello),
            lambda a: bool(a.choices),
            timeout=10,
        )
        assert answer.usage is not None and answer.usage.total_tokens > 0
