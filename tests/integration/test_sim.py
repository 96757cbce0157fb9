"""The engine simulator as a real subprocess, driven with the openai client and raw httpx."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from arks.tokens import count_prompt
from launcher.procs import Supervisor, free_port, wait_http

MODEL = "m1"
NAME = "sim-test"
TOKEN = " hello"
DEFAULT_TOKENS = 16

METRIC_NAMES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:request_success_total",
)


def chat_body(text: str = "Say hello to the simulator, please.", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    with Supervisor(log_dir=tmp_path_factory.mktemp("sim-logs")) as sup:
        child = sup.python(
            "sim", "launcher.sim", "--port", str(port), "--model", MODEL, "--name", NAME
        )
        wait_http(child, f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10.0) as c:
        yield c


def sse_events(http: httpx.Client, path: str, body: dict[str, Any], **headers: str) -> list[Any]:
    """The `data:` payloads of a streamed answer, JSON-decoded except the final "[DONE]"."""
    events: list[Any] = []
    with http.stream("POST", path, json=body, headers=headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    assert raw.endswith("\n\n")
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return events


def scrape(http: httpx.Client) -> dict[str, float]:
    """Samples of /metrics for MODEL, keyed by name plus any labels other than model_name."""
    resp = http.get("/metrics")
    assert resp.status_code == 200
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("model_name", None) != MODEL:
                continue
            suffix = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            samples[f"{sample.name}{{{suffix}}}" if suffix else sample.name] = sample.value
    return samples


# --------------------------------------------------------------------------- chat


def test_chat_usage_is_exact(client: openai.OpenAI) -> None:
    body = chat_body()
    raw = client.chat.completions.with_raw_response.create(
        **body, extra_headers={"x-sim-output-tokens": "7"}
    )
    assert raw.headers["x-sim-instance"] == NAME
    resp = raw.parse()
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == MODEL
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == TOKEN * 7
    assert choice.finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == count_prompt(body) > 0
    assert resp.usage.completion_tokens == 7
    assert resp.usage.total_tokens == count_prompt(body) + 7


def test_chat_default_output_tokens(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(**chat_body())
    assert resp.choices[0].message.content == TOKEN * DEFAULT_TOKENS
    assert resp.usage is not None and resp.usage.completion_tokens == DEFAULT_TOKENS


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream_raw(http: httpx.Client, include_usage: bool) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": include_usage})
    events = sse_events(http, "/v1/chat/completions", body, **{"x-sim-output-tokens": "5"})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = chunks[1:6]
    assert [c["choices"][0]["delta"] for c in content] == [{"content": TOKEN}] * 5
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    finish = chunks[6]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "stop"
    if include_usage:
        assert len(chunks) == 8
        assert chunks[7]["choices"] == []
        assert chunks[7]["usage"] == {
            "prompt_tokens": count_prompt(body),
            "completion_tokens": 5,
            "total_tokens": count_prompt(body) + 5,
        }
    else:
        assert len(chunks) == 7
        assert all("usage" not in c for c in chunks)


def test_chat_stream_openai_client(client: openai.OpenAI) -> None:
    body = chat_body()
    stream = client.chat.completions.create(
        **body,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-sim-output-tokens": "40"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TOKEN * 40
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content == TOKEN) == 40
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == count_prompt(body)
    assert chunks[-1].usage.completion_tokens == 40


def test_long_stream_has_one_event_per_token(http: httpx.Client) -> None:
    events = sse_events(
        http, "/v1/chat/completions", chat_body(stream=True), **{"x-sim-output-tokens": "2000"}
    )
    assert sum(1 for e in events[:-1] if e["choices"][0]["delta"].get("content") == TOKEN) == 2000


# --------------------------------------------------------------------------- completions


def test_completions_non_streamed(client: openai.OpenAI) -> None:
    prompt = "Once upon a time in a simulated datacenter"
    resp = client.completions.create(
        model=MODEL, prompt=prompt, extra_headers={"x-sim-output-tokens": "3"}
    )
    assert resp.object == "text_completion"
    assert resp.id.startswith("cmpl-")
    assert resp.choices[0].text == TOKEN * 3
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == count_prompt({"prompt": prompt})
    assert resp.usage.completion_tokens == 3


def test_completions_streamed(http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "prompt": "abc",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(http, "/v1/completions", body, **{"x-sim-output-tokens": "4"})
    assert events[-1] == "[DONE]"
    tokens, usage_chunk = events[:4], events[4]
    assert len(events) == 6
    assert [c["choices"][0]["text"] for c in tokens] == [TOKEN] * 4
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None, None, None, "stop"]
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in tokens)
    assert len({c["id"] for c in events[:-1]}) == 1
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["prompt_tokens"] == count_prompt(body)


def test_completions_streamed_openai_client(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL, prompt="abc", stream=True, extra_headers={"x-sim-output-tokens": "6"}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == TOKEN * 6
    assert len(chunks) == 6
    assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize(
    ("path", "cap_key"),
    [
        ("/v1/chat/completions", "max_tokens"),
        ("/v1/chat/completions", "max_completion_tokens"),
        ("/v1/completions", "max_tokens"),
    ],
)
def test_max_tokens_caps_with_length(http: httpx.Client, path: str, cap_key: str) -> None:
    body: dict[str, Any] = chat_body() if "chat" in path else {"model": MODEL, "prompt": "abc"}
    body[cap_key] = 3
    data = http.post(path, json=body, headers={"x-sim-output-tokens": "10"}).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length"
    assert (choice["message"]["content"] if "chat" in path else choice["text"]) == TOKEN * 3
    assert data["usage"]["completion_tokens"] == 3
    # a cap above the output length changes nothing
    body[cap_key] = 50
    data = http.post(path, json=body, headers={"x-sim-output-tokens": "10"}).json()
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == 10


# --------------------------------------------------------------------------- test headers


def test_status_header(http: httpx.Client, client: openai.OpenAI) -> None:
    resp = http.post("/v1/chat/completions", json=chat_body(), headers={"x-sim-status": "503"})
    assert resp.status_code == 503
    assert resp.headers["x-sim-instance"] == NAME
    assert resp.json() == {
        "error": {
            "message": "simulated error",
            "type": "ServiceUnavailableError",
            "param": None,
            "code": 503,
        }
    }
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(**chat_body(), extra_headers={"x-sim-status": "429"})
    assert info.value.status_code == 429


def test_disconnect_after_stream_openai_client(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        **chat_body(),
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-sim-output-tokens": "10", "x-sim-disconnect-after": "3"},
    )
    contents: list[str | None] = []
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        for chunk in stream:
            contents.extend(c.delta.content for c in chunk.choices)
    assert contents == ["", TOKEN, TOKEN, TOKEN]  # role chunk, then exactly 3 tokens


def test_disconnect_after_stream_raw(http: httpx.Client) -> None:
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with http.stream(
            "POST",
            "/v1/completions",
            json={"model": MODEL, "prompt": "abc", "stream": True},
            headers={"x-sim-output-tokens": "10", "x-sim-disconnect-after": "2"},
        ) as resp:
            assert resp.status_code == 200
            for part in resp.iter_bytes():
                received += part
    events = [e for e in received.decode().split("\n\n") if e]
    assert len(events) == 2
    assert b"[DONE]" not in received and b'"finish_reason":"stop"' not in received


def test_disconnect_non_streamed(http: httpx.Client, client: openai.OpenAI) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        http.post("/v1/chat/completions", json=chat_body(), headers={"x-sim-disconnect-after": "0"})
    with pytest.raises(openai.APIConnectionError):
        client.completions.create(
            model=MODEL, prompt="abc", extra_headers={"x-sim-disconnect-after": "2"}
        )
    assert http.get("/health").status_code == 200  # the server itself is fine


def test_omit_usage(http: httpx.Client) -> None:
    hdrs = {"x-sim-omit-usage": "1", "x-sim-output-tokens": "2"}
    data = http.post("/v1/chat/completions", json=chat_body(), headers=hdrs).json()
    assert "usage" not in data
    assert data["choices"][0]["message"]["content"] == TOKEN * 2
    body = chat_body(stream=True, stream_options={"include_usage": True})
    events = sse_events(http, "/v1/chat/completions", body, **hdrs)
    assert events[-1] == "[DONE]"
    assert len(events) == 5  # role, 2 tokens, finish, [DONE]
    assert all("usage" not in e and e["choices"] for e in events[:-1])


def test_timing_headers(http: httpx.Client) -> None:
    started = time.monotonic()
    http.post("/v1/chat/completions", json=chat_body(), headers={"x-sim-ttft-ms": "150"})
    assert time.monotonic() - started >= 0.15
    first_at = 0.0
    started = time.monotonic()
    hdrs = {"x-sim-ttft-ms": "100", "x-sim-tpot-ms": "40", "x-sim-output-tokens": "6"}
    with http.stream(
        "POST",
        "/v1/completions",
        json={"model": MODEL, "prompt": "a", "stream": True},
        headers=hdrs,
    ) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {") and not first_at:
                first_at = time.monotonic() - started
    total = time.monotonic() - started
    assert first_at >= 0.1
    assert total - first_at >= 0.1  # the tokens came spread out, not in one burst
    assert total >= 0.1 + 5 * 0.04


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_first_chunk_waits_for_the_first_token(http: httpx.Client, path: str) -> None:
    """vLLM yields its first chunk (chat: the role, content "") only once the first token exists.

    So the time to the first byte of the body is the TTFT, and the first token follows at once.
    """
    chat = path.endswith("chat/completions")
    body = chat_body(stream=True) if chat else {"model": MODEL, "prompt": "a", "stream": True}
    hdrs = {"x-sim-ttft-ms": "300", "x-sim-tpot-ms": "100", "x-sim-output-tokens": "3"}
    arrivals: list[tuple[float, Any]] = []
    started = time.monotonic()
    with http.stream("POST", path, json=body, headers=hdrs) as resp:
        headers_at = time.monotonic() - started
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                arrivals.append((time.monotonic() - started, orjson.loads(line[6:])))
    assert headers_at < 0.3  # the status line and headers go at once, as uvicorn's do
    first_at, first = arrivals[0]
    assert first_at >= 0.3
    if chat:
        assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        token_at, token = arrivals[1]
        assert token["choices"][0]["delta"] == {"content": TOKEN}
        assert token_at - first_at < 0.1  # the first token came with the role, not a TPOT later
    else:
        assert first["choices"][0]["text"] == TOKEN


# --------------------------------------------------------------------------- errors and listing


def test_unknown_model_404(http: httpx.Client, client: openai.OpenAI) -> None:
    resp = http.post("/v1/chat/completions", json={**chat_body(), "model": "nope"})
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert error["type"] == "NotFoundError" and error["code"] == 404
    assert "nope" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="abc")


@pytest.mark.parametrize(
    "content",
    [b'{"model": "m1", "messages": [', b"[1, 2]", b'{"messages": []}', b'{"model": "m1"}'],
)
def test_bad_request_400(http: httpx.Client, content: bytes) -> None:
    resp = http.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError" and error["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_a_deeply_nested_wrong_value_is_a_400_not_a_crash(http: httpx.Client, path: str) -> None:
    """1,000 levels parse (orjson stops at 1,024) but their repr exceeds the recursion limit:
    the message must not repr them (found by tests/chaos/test_fuzz.py)."""
    deep = b"[" * 1000 + b"]" * 1000
    content = b'{"model": "m1", "input": "hi", "messages": [{"role": "user", "content": "hi"}], '
    resp = http.post(
        path,
        content=content + b'"max_completion_tokens": ' + deep + b"}",
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["message"] == "max_completion_tokens must be a non-negative integer, got an array"


def test_bad_header_400(http: httpx.Client) -> None:
    resp = http.post("/v1/chat/completions", json=chat_body(), headers={"x-sim-output-tokens": "x"})
    assert resp.status_code == 400
    assert "x-sim-output-tokens" in resp.json()["error"]["message"]


def test_models(client: openai.OpenAI, http: httpx.Client) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    data = http.get("/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["object"] == "model"


def test_health(http: httpx.Client) -> None:
    resp = http.get("/health")
    assert resp.status_code == 200 and resp.content == b""
    assert resp.headers["x-sim-instance"] == NAME


def test_embeddings(client: openai.OpenAI) -> None:
    resp = client.embeddings.create(model=MODEL, input=["first text", "second text"])
    assert [d.index for d in resp.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in resp.data)
    assert resp.data[0].embedding != resp.data[1].embedding
    assert resp.usage.prompt_tokens == resp.usage.total_tokens
    assert resp.usage.prompt_tokens == count_prompt({"input": ["first text", "second text"]})


@pytest.mark.parametrize("bad", [[["nested"]], [[1, [2]]], [{"text": "x"}], [[True]]])
def test_embeddings_refuse_inputs_vllm_refuses(http: httpx.Client, bad: list) -> None:
    """As vLLM: a string, token ids, or a list of either; anything else is a 400, not a 500."""
    resp = http.post("/v1/embeddings", json={"model": MODEL, "input": bad})
    assert resp.status_code == 400, resp.text


# --------------------------------------------------------------------------- metrics


def test_metrics_names_and_token_counters(http: httpx.Client) -> None:
    text = http.get("/metrics").text
    for name in METRIC_NAMES:
        assert f"\n{name}" in text, name
    before = scrape(http)
    body = chat_body("Count these prompt tokens exactly, please.")
    http.post("/v1/chat/completions", json=body, headers={"x-sim-output-tokens": "9"})
    http.post("/v1/chat/completions", json={**body, "max_tokens": 2})
    after = scrape(http)

    def delta(key: str) -> float:
        return after[key] - before.get(key, 0.0)

    assert delta("vllm:prompt_tokens_total") == 2 * count_prompt(body)
    assert delta("vllm:generation_tokens_total") == 9 + 2
    assert delta("vllm:request_success_total{finished_reason=stop}") == 1
    assert delta("vllm:request_success_total{finished_reason=length}") == 1
    assert delta("vllm:time_to_first_token_seconds_count") == 2
    assert delta("vllm:inter_token_latency_seconds_count") == 2
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:num_requests_waiting"] == 0


def test_max_num_seqs_queues_and_clean_exit(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Supervisor(log_dir=tmp_path) as sup:
        child = sup.python(
            "sim", "launcher.sim", "--port", str(port), "--model", MODEL, "--max-num-seqs", "1"
        )
        wait_http(child, f"{url}/health")
        durations: list[float] = []

        def one_request() -> None:
            started = time.monotonic()
            httpx.post(
                f"{url}/v1/completions",
                json={"model": MODEL, "prompt": "a"},
                headers={"x-sim-ttft-ms": "700"},
                timeout=10,
            )
            durations.append(time.monotonic() - started)

        threads = [threading.Thread(target=one_request) for _ in range(2)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=url, timeout=5.0) as http:
            deadline = time.monotonic() + 0.6
            busy: dict[str, float] = {}
            while time.monotonic() < deadline:
                busy = scrape(http)
                if busy["vllm:num_requests_waiting"] == 1:
                    break
                time.sleep(0.02)
            for t in threads:
                t.join()
            idle = scrape(http)
            assert http.get("/health").headers["x-sim-instance"] == "sim"  # default --name
        assert busy["vllm:num_requests_running"] == 1
        assert busy["vllm:num_requests_waiting"] == 1
        assert busy["vllm:kv_cache_usage_perc"] == 1.0
        assert idle["vllm:num_requests_running"] == 0 and idle["vllm:kv_cache_usage_perc"] == 0
        assert max(durations) >= 1.4  # the second one waited for the first
        child.stop()
        assert child.popen.returncode == 0


def test_client_abort_frees_slot(http: httpx.Client, base_url: str) -> None:
    before = scrape(http)
    hdrs = {"x-sim-output-tokens": "50", "x-sim-tpot-ms": "20"}
    with httpx.Client(base_url=base_url, timeout=5.0) as own:  # its own connection to drop
        with own.stream(
            "POST",
            "/v1/completions",
            json={"model": MODEL, "prompt": "a", "stream": True},
            headers=hdrs,
        ) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: {")
            assert scrape(http)["vllm:num_requests_running"] == 1
    deadline = time.monotonic() + 2.0
    after = scrape(http)
    while after["vllm:num_requests_running"] != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
        after = scrape(http)
    assert after["vllm:num_requests_running"] == 0
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert 1 <= generated < 50  # generation stopped when the client left


# --------------------------------------------------------------------------- simulated load


@pytest.fixture
def clean_load(http: httpx.Client) -> Iterator[None]:
    """Whatever a test sets, the shared simulator leaves it without simulated load."""
    yield
    assert http.put("/sim/load", json={}).status_code == 200


def test_simulated_load_shows_in_metrics(http: httpx.Client, clean_load: None) -> None:
    assert http.get("/sim/load").json() == {"waiting": 0, "running": 0, "kv_cache_usage": 0.0}
    resp = http.put("/sim/load", json={"waiting": 12, "running": 3, "kv_cache_usage": 0.7})
    assert resp.status_code == 200
    assert resp.json() == {"waiting": 12, "running": 3, "kv_cache_usage": 0.7}
    assert http.get("/sim/load").json() == resp.json()
    busy = scrape(http)
    assert busy["vllm:num_requests_waiting"] == 12
    assert busy["vllm:num_requests_running"] == 3
    assert busy["vllm:kv_cache_usage_perc"] == pytest.approx(0.7)
    # PUT replaces the whole load: omitted fields go back to 0
    assert http.put("/sim/load", json={"waiting": 2}).json()["running"] == 0
    after = scrape(http)
    assert after["vllm:num_requests_waiting"] == 2
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0


def test_simulated_load_adds_to_real_requests(
    http: httpx.Client, base_url: str, clean_load: None
) -> None:
    http.put("/sim/load", json={"running": 5, "kv_cache_usage": 0.5})
    hdrs = {"x-sim-output-tokens": "40", "x-sim-tpot-ms": "20"}
    with (
        httpx.Client(base_url=base_url, timeout=5.0) as own,
        own.stream(
            "POST",
            "/v1/completions",
            json={"model": MODEL, "prompt": "a", "stream": True},
            headers=hdrs,
        ) as resp,
    ):
        lines = resp.iter_lines()
        assert next(lines).startswith("data: {")
        during = scrape(http)
        for _ in lines:
            pass
    assert during["vllm:num_requests_running"] == 5 + 1
    assert during["vllm:kv_cache_usage_perc"] == pytest.approx(0.5 + 1 / 256)
    deadline = time.monotonic() + 2.0  # the server frees the slot just after the last chunk
    after = scrape(http)
    while after["vllm:num_requests_running"] != 5 and time.monotonic() < deadline:
        time.sleep(0.01)
        after = scrape(http)
    assert after["vllm:num_requests_running"] == 5
    assert after["vllm:kv_cache_usage_perc"] == pytest.approx(0.5)


def test_simulated_load_caps_kv_cache_at_one(
    http: httpx.Client, base_url: str, clean_load: None
) -> None:
    http.put("/sim/load", json={"kv_cache_usage": 1.0})
    hdrs = {"x-sim-ttft-ms": "300"}
    with httpx.Client(base_url=base_url, timeout=5.0) as own:
        thread = threading.Thread(
            target=own.post,
            args=("/v1/completions",),
            kwargs={"json": {"model": MODEL, "prompt": "a"}, "headers": hdrs},
        )
        thread.start()
        deadline = time.monotonic() + 2.0
        seen = scrape(http)
        while seen["vllm:num_requests_running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
            seen = scrape(http)
        thread.join()
    assert seen["vllm:num_requests_running"] == 1
    assert seen["vllm:kv_cache_usage_perc"] == 1.0


@pytest.mark.parametrize(
    "body",
    [
        {"waiting": -1},
        {"running": 1.5},
        {"waiting": True},
        {"kv_cache_usage": 1.5},
        {"kv_cache_usage": "0.5"},
        {"queue": 3},
        [1, 2],
    ],
)
def test_simulated_load_rejects_bad_values(http: httpx.Client, body: Any, clean_load: None) -> None:
    http.put("/sim/load", json={"waiting": 4})
    resp = http.put("/sim/load", json=body)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == 400 and resp.json()["error"]["message"]
    assert http.get("/sim/load").json()["waiting"] == 4  # a rejected PUT changes nothing


def test_simulated_load_rejects_invalid_json(http: httpx.Client) -> None:
    resp = http.put("/sim/load", content=b"{", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert "invalid JSON" in resp.json()["error"]["message"]


def test_e2e_latency_histogram_counts_finished_requests(http: httpx.Client) -> None:
    before = scrape(http)
    http.post("/v1/chat/completions", json=chat_body(), headers={"x-sim-ttft-ms": "50"})
    after = scrape(http)
    count = "vllm:e2e_request_latency_seconds_count"
    total = "vllm:e2e_request_latency_seconds_sum"
    assert after[count] - before[count] == 1
    assert after[total] - before[total] >= 0.05 - 1e-6  # the sums are floats


# --------------------------------------------------------------------------- SGLang-style metrics

SGLANG_METRIC_NAMES = (
    "sglang:num_running_reqs",
    "sglang:num_queue_reqs",
    "sglang:token_usage",
    "sglang:prompt_tokens_total",
    "sglang:generation_tokens_total",
    "sglang:time_to_first_token_seconds",
    "sglang:e2e_request_latency_seconds",
    "sglang:num_requests_total",
)


def test_sglang_metrics_style(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Supervisor(log_dir=tmp_path) as sup:
        child = sup.python(
            "sim",
            "launcher.sim",
            "--port",
            str(port),
            "--model",
            MODEL,
            "--metrics-style",
            "sglang",
        )
        wait_http(child, f"{url}/health")
        with httpx.Client(base_url=url, timeout=5.0) as http:
            text = http.get("/metrics").text
            for name in SGLANG_METRIC_NAMES:
                assert f"\n{name}" in text, name
            assert "vllm:" not in text
            body = chat_body()
            http.post("/v1/chat/completions", json=body, headers={"x-sim-output-tokens": "4"})
            http.put("/sim/load", json={"waiting": 7, "running": 2, "kv_cache_usage": 0.25})
            samples = scrape(http)
    assert samples["sglang:num_requests_total"] == 1
    assert samples["sglang:generation_tokens_total"] == 4
    assert samples["sglang:prompt_tokens_total"] == count_prompt(body)
    assert samples["sglang:e2e_request_latency_seconds_count"] == 1
    assert samples["sglang:num_queue_reqs"] == 7
    assert samples["sglang:num_running_reqs"] == 2
    assert samples["sglang:token_usage"] == pytest.approx(0.25)


def test_vllm_legacy_metrics_style_exports_the_names_of_vllm_before_0_11(tmp_path: Path) -> None:
    """vLLM v0.8.5 (the sample's image) has gpu_cache_usage_perc and
    time_per_output_token_seconds; their successors do not exist there."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Supervisor(log_dir=tmp_path) as sup:
        child = sup.python(
            "sim", "launcher.sim", "--port", str(port), "--model", MODEL,
            "--metrics-style", "vllm-legacy",
        )  # fmt: skip
        wait_http(child, f"{url}/health")
        with httpx.Client(base_url=url, timeout=5.0) as http:
            body = chat_body()
            http.post("/v1/chat/completions", json=body, headers={"x-sim-output-tokens": "4"})
            http.put("/sim/load", json={"kv_cache_usage": 0.25})
            text = http.get("/metrics").text
            samples = scrape(http)
    assert "vllm:kv_cache_usage_perc" not in text
    assert "vllm:inter_token_latency_seconds" not in text
    assert samples["vllm:gpu_cache_usage_perc"] == pytest.approx(0.25)
    assert samples["vllm:time_per_output_token_seconds_count"] == 1
    assert samples["vllm:time_to_first_token_seconds_count"] == 1


def test_metrics_style_flag_rejects_unknown_runtime(tmp_path: Path) -> None:
    with Supervisor(log_dir=tmp_path) as sup:
        child = sup.python("sim", "launcher.sim", "--metrics-style", "tgi")
        child.popen.wait(20)
        assert child.popen.returncode == 2  # argparse: invalid choice
        assert "invalid choice" in child.log_tail()
