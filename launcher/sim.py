"""Engine simulator: an OpenAI-compatible server standing in for vLLM/SGLang.

Used in tests, benchmarks and the local demo. Predictable: every generated token is " hello",
prompts are counted with `arks.tokens`, metrics use vLLM's names (current or before 0.11) or
SGLang's. The `x-sim-*` headers and `/sim/load`: docs/architecture.md, section 13 (The engine
simulator).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson
import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from arks.engine_series import GENERATIONS, SERIES, EngineSeries, Generation
from arks.tokens import PAIRED_FIELDS, count_prompt, encoding, prompt_text

log = logging.getLogger("launcher.sim")

TOKEN = " hello"  # exactly one cl100k token, so N tokens are TOKEN * N
EMBEDDING_DIM = 8
MAX_BODY_BYTES = 64 * 1024 * 1024
FINISH_REASONS = ("stop", "length")
# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0)
# fmt: on

H_OUTPUT_TOKENS = "x-sim-output-tokens"
H_TTFT_MS = "x-sim-ttft-ms"
H_TPOT_MS = "x-sim-tpot-ms"
H_STATUS = "x-sim-status"
H_DISCONNECT_AFTER = "x-sim-disconnect-after"
H_OMIT_USAGE = "x-sim-omit-usage"
H_INSTANCE = "x-sim-instance"
H_LINGER_MS = "x-sim-linger-ms"  # a stream stays open this long after [DONE] before it ends
H_TOTAL_ONLY = "x-sim-usage-total-only"  # a rerank's usage as vLLM wrote it before prompt_tokens
H_SGLANG_RERANK = "x-sim-sglang-rerank"  # a rerank answered as SGLang's: a list, no usage
H_AUDIO_TOKENS = (
    "x-sim-audio-tokens"  # a transcription's usage in tokens (input,output), not seconds
)
AUDIO_BYTES_PER_SECOND = 32000  # the upload read as 16 kHz 16-bit mono PCM
MAX_MODEL_LEN = 8192  # what /tokenize reports
# A stream goes out in writes of at most this many bytes, a moment apart: its SSE events reach
# the gateway split across data frames.
H_WRITE_BYTES = "x-sim-write-bytes"
PIECE_PAUSE_S = 0.002

# One per engine generation of `arks.engine_series` ("vllm-legacy": vLLM before 0.11).
MetricsStyle = Generation
METRICS_STYLES: tuple[MetricsStyle, ...] = GENERATIONS


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    models: tuple[str, ...] = ("sim-model",)
    output_tokens: int = 16
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    max_num_seqs: int = 256
    name: str = "sim"
    metrics_style: MetricsStyle = "vllm"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(
            host=args.host,
            port=args.port,
            models=tuple(dict.fromkeys(args.model or ["sim-model"])),
            output_tokens=args.output_tokens,
            ttft_ms=args.ttft_ms,
            tpot_ms=args.tpot_ms,
            max_num_seqs=args.max_num_seqs,
            name=args.name,
            metrics_style=args.metrics_style,
        )


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    parser.add_argument("--port", type=int, default=8000, help="listen port")
    parser.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help="served model name; repeatable (default: sim-model)",
    )
    parser.add_argument(
        "--output-tokens", type=_non_negative_int, default=16, help="tokens per answer"
    )
    parser.add_argument(
        "--ttft-ms", type=_non_negative_float, default=0.0, help="time to first token"
    )
    parser.add_argument(
        "--tpot-ms", type=_non_negative_float, default=0.0, help="time per output token"
    )
    parser.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=256,
        help="concurrent requests; more are counted as waiting and queue for a slot",
    )
    parser.add_argument(
        "--name", default="sim", help="instance name for logs and the x-sim-instance header"
    )
    parser.add_argument(
        "--metrics-style",
        choices=METRICS_STYLES,
        default="vllm",
        help="export /metrics under the metric names of vLLM (0.11 on), vLLM before 0.11, or SGLang",
    )


# --------------------------------------------------------------------------- pure helpers


class ApiError(Exception):
    """Answered as an OpenAI-style error body with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_type(status: int) -> str:
    """vLLM-style error type: 404 -> NotFoundError, 503 -> ServiceUnavailableError."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "Error"
    name = "".join(word.capitalize() for word in phrase.replace("-", " ").split())
    return name if name.endswith("Error") else name + "Error"


def error_body(status: int, message: str) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": error_type(status), "param": None, "code": status}
    }


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def error_response(status: int, message: str) -> web.Response:
    return json_response(error_body(status, message), status)


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def header_int(
    headers: Mapping[str, str], name: str, low: int, high: int | None = None
) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        raise ApiError(400, f"{name} out of range: {value}")
    return value


def header_ms(headers: Mapping[str, str], name: str, default_ms: float) -> float:
    """A duration header in milliseconds, returned in seconds."""
    raw = headers.get(name)
    if raw is None:
        return default_ms / 1000.0
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a number, got {raw!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ApiError(400, f"{name} out of range: {raw}")
    return value / 1000.0


def header_flag(headers: Mapping[str, str], name: str) -> bool:
    return headers.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def shown(value: object) -> str:
    """A request value in an error message: a container by its JSON type (its repr could be
    nested past the interpreter's recursion limit, or huge), anything else cut to 100 chars."""
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else "an array"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def max_tokens_cap(body: Mapping[str, Any]) -> int | None:
    """The request's `max_completion_tokens` (preferred) or `max_tokens`, if set."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ApiError(400, f"{key} must be a non-negative integer, got {shown(value)}")
        return value
    return None


def plan_output(wanted: int, cap: int | None) -> tuple[int, str]:
    """How many tokens to generate and why generation stops."""
    if cap is not None and cap < wanted:
        return cap, "length"
    return wanted, "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def embedding_inputs(value: Any) -> list[Any]:
    """One entry per embedding: a string, a token list, or a list of either."""
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(v, int) for v in value)
    ):
        return [value]
    if isinstance(value, list) and value and all(_one_input(v) for v in value):
        return value
    raise ApiError(400, "input must be a non-empty string, token list or list of them")


def _one_input(item: Any) -> bool:
    """As vLLM's request model has it: a string, or a list of token ids."""
    return isinstance(item, str) or (
        isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
    )


def embedding_vector(item: Any) -> list[float]:
    """A deterministic unit-range vector derived from the input."""
    digest = hashlib.blake2b(orjson.dumps(item), digest_size=EMBEDDING_DIM).digest()
    return [round(byte / 255.0, 6) for byte in digest]


def relevance(*texts: Any) -> float:
    """A deterministic score in [0, 1] for a pair (or one input)."""
    return embedding_vector(texts)[0]


def pooled_inputs(body: Mapping[str, Any]) -> list[Any]:
    """A pooling or classify request's items: its `input` (as embeddings), or one chat."""
    if isinstance(body.get("messages"), list):
        return [body["messages"]]
    return embedding_inputs(body.get("input"))


def score_pairs(body: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    """A score request's pairs, under any of vLLM's names for its two sides: one first text with
    each second one, or the i-th with the i-th."""
    for first_key, second_key in PAIRED_FIELDS[1:]:
        if first_key in body and second_key in body:
            firsts, seconds = body[first_key], body[second_key]
            firsts = firsts if isinstance(firsts, list) else [firsts]
            seconds = seconds if isinstance(seconds, list) else [seconds]
            if len(firsts) == 1:
                firsts = firsts * len(seconds)
            if not seconds or len(firsts) != len(seconds):
                raise ApiError(400, "the two sides must have one item, or as many items, each")
            return list(zip(firsts, seconds, strict=True))
    raise ApiError(400, "a score request needs text_1 and text_2 (or queries and documents)")


def pooling_usage(prompt_tokens: int) -> dict[str, Any]:
    """vLLM's UsageInfo for a pooling answer (score, pooling, classify)."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class MetricNames:
    """One runtime's spelling of the metrics the simulator exports (counters without _total)."""

    running: str
    waiting: str
    kv_cache: str
    prompt_tokens: str
    generation_tokens: str
    ttft: str
    tpot: str
    e2e: str
    success: str
    success_by_reason: bool  # vLLM labels finished requests with finished_reason


def _vllm_names(series: EngineSeries) -> MetricNames:
    """vLLM's names; the series autoscaling reads differ by release (arks.engine_series)."""
    return MetricNames(
        running="vllm:num_requests_running",
        waiting=series.waiting,
        kv_cache=series.kv_cache,
        prompt_tokens="vllm:prompt_tokens",
        generation_tokens="vllm:generation_tokens",
        ttft=series.ttft,
        tpot=series.tpot,
        e2e="vllm:e2e_request_latency_seconds",
        success="vllm:request_success",
        success_by_reason=True,
    )


_SGLANG = SERIES["sglang"]
METRIC_NAMES: dict[MetricsStyle, MetricNames] = {
    "vllm": _vllm_names(SERIES["vllm"]),
    "vllm-legacy": _vllm_names(SERIES["vllm-legacy"]),
    "sglang": MetricNames(
        running="sglang:num_running_reqs",
        waiting=_SGLANG.waiting,
        kv_cache=_SGLANG.kv_cache,
        prompt_tokens="sglang:prompt_tokens",
        generation_tokens="sglang:generation_tokens",
        ttft=_SGLANG.ttft,
        tpot=_SGLANG.tpot,
        e2e="sglang:e2e_request_latency_seconds",
        success="sglang:num_requests",
        success_by_reason=False,
    ),
}


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    running: Gauge
    waiting: Gauge
    kv_cache: Gauge
    prompt_tokens: Counter
    generation_tokens: Counter
    ttft: Histogram
    tpot: Histogram
    e2e: Histogram
    success: Counter
    success_by_reason: bool

    @classmethod
    def create(cls, models: tuple[str, ...], style: MetricsStyle = "vllm") -> Metrics:
        names = METRIC_NAMES[style]
        reg = CollectorRegistry(auto_describe=True)
        label = ["model_name"]
        metrics = cls(
            registry=reg,
            running=Gauge(names.running, "Requests being generated.", label, registry=reg),
            waiting=Gauge(names.waiting, "Requests waiting for a slot.", label, registry=reg),
            kv_cache=Gauge(
                names.kv_cache,
                "KV cache usage, 0..1 (running/max_num_seqs).",
                label,
                registry=reg,
            ),
            prompt_tokens=Counter(
                names.prompt_tokens, "Prefill tokens processed.", label, registry=reg
            ),
            generation_tokens=Counter(
                names.generation_tokens, "Generation tokens produced.", label, registry=reg
            ),
            ttft=Histogram(
                names.ttft, "Time to first token.", label, buckets=TTFT_BUCKETS, registry=reg
            ),
            tpot=Histogram(
                names.tpot,
                "Mean time per output token after the first, one sample per request.",
                label,
                buckets=TPOT_BUCKETS,
                registry=reg,
            ),
            e2e=Histogram(
                names.e2e,
                "End-to-end latency of finished requests, from arrival.",
                label,
                buckets=E2E_BUCKETS,
                registry=reg,
            ),
            success=Counter(
                names.success,
                "Requests finished.",
                [*label, "finished_reason"] if names.success_by_reason else label,
                registry=reg,
            ),
            success_by_reason=names.success_by_reason,
        )
        for model in models:  # every series exists from the start
            for metric in (
                metrics.running,
                metrics.waiting,
                metrics.kv_cache,
                metrics.prompt_tokens,
                metrics.generation_tokens,
                metrics.ttft,
                metrics.tpot,
                metrics.e2e,
            ):
                metric.labels(model)
            if names.success_by_reason:
                for reason in FINISH_REASONS:
                    metrics.success.labels(model, reason)
            else:
                metrics.success.labels(model)
        return metrics


@dataclass(frozen=True)
class SimulatedLoad:
    """Load added on top of the real one in /metrics (see the module docstring)."""

    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0

    @classmethod
    def from_json(cls, body: Any) -> SimulatedLoad:
        if not isinstance(body, dict):
            raise ApiError(400, "simulated load must be a JSON object")
        unknown = body.keys() - {"waiting", "running", "kv_cache_usage"}
        if unknown:
            raise ApiError(400, f"unknown simulated load fields: {', '.join(sorted(unknown))}")
        counts = {}
        for key in ("waiting", "running"):
            value = body.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ApiError(400, f"{key} must be a non-negative integer, got {shown(value)}")
            counts[key] = value
        kv = body.get("kv_cache_usage", 0.0)
        if isinstance(kv, bool) or not isinstance(kv, int | float) or not 0.0 <= kv <= 1.0:
            raise ApiError(400, f"kv_cache_usage must be a number in [0, 1], got {shown(kv)}")
        return cls(counts["waiting"], counts["running"], float(kv))

    def to_json(self) -> dict[str, Any]:
        return {
            "waiting": self.waiting,
            "running": self.running,
            "kv_cache_usage": self.kv_cache_usage,
        }


# --------------------------------------------------------------------------- engine


class Engine:
    """Slots (max_num_seqs) and metrics shared by all requests of one server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics.create(settings.models, settings.metrics_style)
        self.simulated = SimulatedLoad()
        self._slots = asyncio.Semaphore(settings.max_num_seqs)
        self._running = 0

    @contextlib.asynccontextmanager
    async def slot(self, model: str) -> AsyncIterator[None]:
        m = self.metrics
        m.waiting.labels(model).inc()
        try:
            await self._slots.acquire()
        finally:
            m.waiting.labels(model).dec()
        self._set_running(model, +1)
        try:
            yield
        finally:
            self._set_running(model, -1)
            self._slots.release()

    def _set_running(self, model: str, delta: int) -> None:
        self._running += delta
        self.metrics.running.labels(model).inc(delta)
        self._set_kv_cache()

    def _set_kv_cache(self) -> None:
        usage_perc = self._running / self.settings.max_num_seqs + self.simulated.kv_cache_usage
        for name in self.settings.models:
            self.metrics.kv_cache.labels(name).set(min(1.0, usage_perc))

    def simulate(self, load: SimulatedLoad) -> None:
        """Replace the simulated load: the gauges move by the difference, real counts stay."""
        first, before = self.settings.models[0], self.simulated
        self.simulated = load
        self.metrics.waiting.labels(first).inc(load.waiting - before.waiting)
        self.metrics.running.labels(first).inc(load.running - before.running)
        self._set_kv_cache()

    def record(
        self, model: str, prompt_tokens: int, generated: int, ttft: float | None, tpot: float | None
    ) -> None:
        m = self.metrics
        m.prompt_tokens.labels(model).inc(prompt_tokens)
        if generated:
            m.generation_tokens.labels(model).inc(generated)
        if ttft is not None:
            m.ttft.labels(model).observe(ttft)
        if tpot is not None:
            m.tpot.labels(model).observe(tpot)

    def finished(self, model: str, reason: str, e2e: float) -> None:
        """A request answered in full: the finished counter and its end-to-end latency."""
        m = self.metrics
        if m.success_by_reason:
            m.success.labels(model, reason).inc()
        else:
            m.success.labels(model).inc()
        m.e2e.labels(model).observe(e2e)


@dataclass(frozen=True)
class Plan:
    """What one request gets: validated body, header overrides and the output to produce."""

    model: str
    body: Mapping[str, Any]
    stream: bool
    prompt_tokens: int
    tokens: int
    finish_reason: str
    ttft: float  # seconds
    tpot: float  # seconds
    disconnect_after: int | None
    omit_usage: bool
    linger: float = 0.0  # seconds between [DONE] and the stream's end
    write_bytes: int | None = None  # a stream's writes' largest size; None: a write per token

    @property
    def include_usage(self) -> bool:
        opts = self.body.get("stream_options")
        wanted = isinstance(opts, Mapping) and opts.get("include_usage") is True
        return wanted and not self.omit_usage

    @property
    def sent_tokens(self) -> int:
        """Tokens actually produced before finishing or disconnecting."""
        if self.disconnect_after is None:
            return self.tokens
        return min(self.disconnect_after, self.tokens)


ENGINE_KEY = web.AppKey("engine", Engine)


async def read_body(request: web.Request, engine: Engine) -> tuple[dict[str, Any], str]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as err:
        raise ApiError(400, f"invalid JSON body: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required")
    if model not in engine.settings.models:
        raise ApiError(404, f"The model `{model}` does not exist.")
    return body, model


def make_plan(request: web.Request, engine: Engine, body: dict[str, Any], model: str) -> Plan:
    settings, headers = engine.settings, request.headers
    wanted = header_int(headers, H_OUTPUT_TOKENS, 0)
    tokens, finish_reason = plan_output(
        settings.output_tokens if wanted is None else wanted, max_tokens_cap(body)
    )
    return Plan(
        model=model,
        body=body,
        stream=body.get("stream") is True,
        prompt_tokens=count_prompt(body),
        tokens=tokens,
        finish_reason=finish_reason,
        ttft=header_ms(headers, H_TTFT_MS, settings.ttft_ms),
        tpot=header_ms(headers, H_TPOT_MS, settings.tpot_ms),
        disconnect_after=header_int(headers, H_DISCONNECT_AFTER, 0),
        omit_usage=header_flag(headers, H_OMIT_USAGE),
        linger=header_ms(headers, H_LINGER_MS, 0),
        write_bytes=header_int(headers, H_WRITE_BYTES, 1),
    )


async def sleep_until(deadline: float) -> None:
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


def drop_connection(request: web.Request) -> None:
    """Close the socket after flushing what was written; aiohttp then cannot finish the body."""
    if request.transport is not None:
        request.transport.close()


# --------------------------------------------------------------------------- response shapes


@dataclass(frozen=True)
class Shape:
    """The JSON of one endpoint's answers; `ident`, `created` and `model` are shared by all chunks."""

    chat: bool
    ident: str
    created: int
    model: str

    @classmethod
    def new(cls, chat: bool, model: str) -> Shape:
        prefix = "chatcmpl-" if chat else "cmpl-"
        return cls(chat, prefix + secrets.token_hex(16), int(time.time()), model)

    def _envelope(self, obj_type: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.ident,
            "object": obj_type,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def answer(self, plan: Plan) -> dict[str, Any]:
        text = TOKEN * plan.tokens
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=plan.finish_reason)
        out = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        if not plan.omit_usage:
            out["usage"] = usage(plan.prompt_tokens, plan.tokens)
        return out

    def _chunk(self, payload: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, **payload, "logprobs": None, "finish_reason": finish_reason}
        return sse(
            self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        )

    def stream_parts(self, plan: Plan) -> tuple[bytes, bytes, bytes, bytes]:
        """(head, token, last token, tail): the stream is head + token*(n-1) + last + tail.

        Chat: the head carries the assistant role, the tail an empty delta with finish_reason.
        Completions: the last token chunk carries finish_reason (like vLLM).
        """
        if self.chat:
            head = self._chunk({"delta": {"role": "assistant", "content": ""}}, None)
            token = self._chunk({"delta": {"content": TOKEN}}, None)
            last = token
            tail = self._chunk({"delta": {}}, plan.finish_reason)
        else:
            head = b""
            token = self._chunk({"text": TOKEN}, None)
            last = self._chunk({"text": TOKEN}, plan.finish_reason)
            tail = b"" if plan.tokens else self._chunk({"text": ""}, plan.finish_reason)
        if plan.include_usage:
            obj_type = "chat.completion.chunk" if self.chat else "text_completion"
            tail += sse(
                {**self._envelope(obj_type, []), "usage": usage(plan.prompt_tokens, plan.tokens)}
            )
        return head, token, last, tail + SSE_DONE


# --------------------------------------------------------------------------- handlers


async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
    arrival = asyncio.get_running_loop().time()
    engine = request.app[ENGINE_KEY]
    body, model = await read_body(request, engine)
    if chat and not isinstance(body.get("messages"), list):
        raise ApiError(400, "messages must be a list")
    if not chat and "prompt" not in body:
        raise ApiError(400, "prompt is required")
    plan = make_plan(request, engine, body, model)
    shape = Shape.new(chat, model)
    async with engine.slot(model):  # timing starts once a slot is ours; TTFT counts from arrival
        if plan.stream:
            return await stream_answer(request, engine, plan, shape, arrival)
        return await whole_answer(request, engine, plan, shape, arrival)


async def whole_answer(
    request: web.Request, engine: Engine, plan: Plan, shape: Shape, arrival: float
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    first = loop.time() + plan.ttft
    n = plan.sent_tokens
    await sleep_until(first + max(n - 1, 0) * plan.tpot)
    ttft = first - arrival if n else None
    tpot = (loop.time() - first) / (n - 1) if n > 1 else None
    engine.record(plan.model, plan.prompt_tokens, n, ttft, tpot)
    if plan.disconnect_after is not None:
        drop_connection(request)
        return web.Response()  # aiohttp cannot send it and treats it as a client disconnect
    engine.finished(plan.model, plan.finish_reason, loop.time() - arrival)
    return json_response(shape.answer(plan))


async def write_pieces(resp: web.StreamResponse, data: bytes, size: int | None) -> None:
    """`data` in writes of at most `size` bytes, a moment apart (None: in one write)."""
    if size is None:
        await resp.write(data)
        return
    for start in range(0, len(data), size):
        if start:
            await asyncio.sleep(PIECE_PAUSE_S)
        await resp.write(data[start : start + size])


async def stream_answer(
    request: web.Request, engine: Engine, plan: Plan, shape: Shape, arrival: float
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    first = loop.time() + plan.ttft
    head, token, last, tail = shape.stream_parts(plan)
    n = plan.sent_tokens
    disconnect = plan.disconnect_after is not None
    if disconnect:
        last, tail = token, b""  # never the finishing chunk, usage or [DONE]
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    first_at = last_at = 0.0
    written = 0
    try:
        # Headers go at once (as uvicorn sends them); the first chunk, the chat role included,
        # only with the first token, as vLLM's stream generator yields it on the first output.
        await sleep_until(first)
        if plan.tpot == 0 or n <= 1:  # one write; still one SSE event per token
            await write_pieces(
                resp, head + token * max(n - 1, 0) + (last if n else b"") + tail, plan.write_bytes
            )
            first_at = last_at = loop.time()
            written = n
        else:
            for i in range(n):
                if i:
                    await sleep_until(first + i * plan.tpot)
                await write_pieces(
                    resp,
                    (head if i == 0 else b"") + (token if i < n - 1 else last + tail),
                    plan.write_bytes,
                )
                last_at = loop.time()
                first_at = first_at or last_at
                written = i + 1
        if plan.linger and not disconnect:
            await asyncio.sleep(plan.linger)
    except ConnectionError:  # the client went away
        return resp
    finally:  # also when cancelled because the client went away
        engine.record(
            plan.model,
            plan.prompt_tokens,
            written,
            first_at - arrival if written else None,
            (last_at - first_at) / (written - 1) if written > 1 else None,
        )
    if disconnect:
        drop_connection(request)
    else:
        engine.finished(plan.model, plan.finish_reason, loop.time() - arrival)
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, chat=False)


# --------------------------------------------------------------------------- Responses API


def responses_usage(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    """vLLM's ResponseUsage (protocol.py): input and output tokens, with their details."""
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }


def response_object(
    ident: str, plan: Plan, status: str, text: str | None, with_usage: bool
) -> dict[str, Any]:
    """vLLM's ResponsesResponse: `output` holds one assistant message; `usage` comes after it
    (the gateway reads the last usage object of the answer)."""
    body = plan.body
    output = []
    if text is not None:
        output.append(
            {
                "id": "msg_" + ident.removeprefix("resp_"),
                "type": "message",
                "role": "assistant",
                "status": status,
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        )
    return {
        "id": ident,
        "object": "response",
        "created_at": int(time.time()),
        "model": plan.model,
        "status": status,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "background": body.get("background") is True,
        "max_output_tokens": body.get("max_output_tokens"),
        "previous_response_id": body.get("previous_response_id"),
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "usage": responses_usage(plan.prompt_tokens, plan.sent_tokens) if with_usage else None,
        "user": None,
    }


def responses_event(event: dict[str, Any]) -> bytes:
    """One Responses stream event as vLLM writes it: its type as the SSE event name."""
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\n" + sse(event)


# An instance's stored responses by id: in memory, as vLLM's response store.
RESPONSES_KEY = web.AppKey("responses", dict[str, dict[str, Any]])


def responses_plan(request: web.Request, engine: Engine, body: dict[str, Any], model: str) -> Plan:
    """A Responses request's plan: `max_output_tokens` caps the answer, `input` is the prompt."""
    if "input" not in body:
        raise ApiError(400, "input is required")
    cap = body.get("max_output_tokens")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
        raise ApiError(400, f"max_output_tokens must be a non-negative integer, got {shown(cap)}")
    return make_plan(request, engine, {**body, "max_tokens": cap}, model)


async def create_response(request: web.Request) -> web.StreamResponse:
    """`POST /v1/responses`: stored in this instance's memory (vLLM's response store) unless
    `store` is false; a `previous_response_id` this instance does not hold is a 404 as in vLLM."""
    arrival = asyncio.get_running_loop().time()
    engine = request.app[ENGINE_KEY]
    store: dict[str, dict[str, Any]] = request.app[RESPONSES_KEY]
    body, model = await read_body(request, engine)
    previous = body.get("previous_response_id")
    if previous is not None and previous not in store:
        raise ApiError(404, f"Response with id '{previous}' not found.")
    plan = responses_plan(request, engine, body, model)
    ident = "resp_" + secrets.token_hex(16)
    status = "completed" if plan.finish_reason == "stop" else "incomplete"
    if body.get("background") is True:  # queued, never run: enough to be retrieved and cancelled
        queued = response_object(ident, plan, "queued", None, with_usage=False)
        store[ident] = queued
        return json_response(queued)
    async with engine.slot(model):
        if not plan.stream:
            loop = asyncio.get_running_loop()
            await asyncio.sleep(plan.ttft + max(plan.tokens - 1, 0) * plan.tpot)
            engine.record(model, plan.prompt_tokens, plan.tokens, None, None)
            engine.finished(model, plan.finish_reason, loop.time() - arrival)
            answer = response_object(ident, plan, status, TOKEN * plan.tokens, not plan.omit_usage)
            if body.get("store", True) is not False:
                store[ident] = answer
            return json_response(answer)
        return await stream_response(request, engine, plan, ident, status, arrival)


async def stream_response(
    request: web.Request, engine: Engine, plan: Plan, ident: str, status: str, arrival: float
) -> web.StreamResponse:
    """The events vLLM streams: created, in_progress, the message's item and part, one
    output_text.delta per token, their done events, then completed (with usage), no [DONE]."""
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    sequence = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal sequence
        sequence += 1
        return responses_event({"type": kind, "sequence_number": sequence - 1, **fields})

    item_id = "msg_" + ident.removeprefix("resp_")
    started = response_object(ident, plan, "in_progress", None, with_usage=False)
    part = {"type": "output_text", "text": "", "annotations": []}
    await resp.write(
        event("response.created", response=started)
        + event("response.in_progress", response=started)
    )
    await asyncio.sleep(plan.ttft)
    head = event(
        "response.output_item.added",
        output_index=0,
        item={
            "id": item_id,
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        },
    ) + event(
        "response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=part
    )
    delta = {"item_id": item_id, "output_index": 0, "content_index": 0, "logprobs": []}
    written = 0
    try:
        await resp.write(head)
        for i in range(plan.sent_tokens):
            if i:
                await asyncio.sleep(plan.tpot)
            await resp.write(event("response.output_text.delta", delta=TOKEN, **delta))
            written += 1
        if plan.disconnect_after is not None:
            drop_connection(request)
            return resp
        text = TOKEN * written
        done = response_object(ident, plan, status, text, not plan.omit_usage)
        await resp.write(
            event("response.output_text.done", text=text, **delta)
            + event(
                "response.content_part.done",
                item_id=item_id,
                output_index=0,
                content_index=0,
                part={**part, "text": text},
            )
            + event("response.output_item.done", output_index=0, item=done["output"][0])
            + event("response.completed", response=done)
        )
        if plan.body.get("store", True) is not False:
            request.app[RESPONSES_KEY][ident] = done
    except ConnectionError:
        return resp
    finally:
        engine.record(plan.model, plan.prompt_tokens, written, None, None)
    engine.finished(plan.model, plan.finish_reason, asyncio.get_running_loop().time() - arrival)
    return resp


def stored_response(request: web.Request) -> dict[str, Any]:
    ident = request.match_info["response_id"]
    found = request.app[RESPONSES_KEY].get(ident)
    if found is None:
        raise ApiError(404, f"Response with id '{ident}' not found.")
    return found


async def retrieve_response(request: web.Request) -> web.StreamResponse:
    """`GET /v1/responses/{id}`: only the instance that made it holds it."""
    return json_response(stored_response(request))


async def cancel_response(request: web.Request) -> web.StreamResponse:
    """`POST /v1/responses/{id}/cancel`: a background response not yet finished is cancelled;
    any other is refused, as vLLM refuses to cancel a synchronous response."""
    found = stored_response(request)
    if found["status"] not in ("queued", "in_progress"):
        raise ApiError(400, "Cannot cancel a synchronous response.")
    found["status"] = "cancelled"
    return json_response(found)


# --------------------------------------------------------------------------- Anthropic Messages

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}  # vLLM's stop_reason_map


def anthropic_event(kind: str, **fields: Any) -> bytes:
    """One Messages stream event as vLLM writes it (`wrap_data_with_event`)."""
    return b"event: " + kind.encode() + b"\n" + sse({"type": kind, **fields})


async def messages(request: web.Request) -> web.StreamResponse:
    """`POST /v1/messages` (vLLM's anthropic/serving_messages.py): `max_tokens` is required;
    usage is `input_tokens`/`output_tokens`; a stream's message_start carries the input tokens,
    its message_delta both, and it ends with message_stop then `data: [DONE]`, as vLLM's does."""
    arrival = asyncio.get_running_loop().time()
    engine = request.app[ENGINE_KEY]
    body, model = await read_body(request, engine)
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise ApiError(400, "messages must contain at least one item")
    if body.get("max_tokens") is None:
        raise ApiError(400, "max_tokens is required")
    plan = make_plan(request, engine, body, model)
    ident = "chatcmpl-" + secrets.token_hex(16)  # vLLM answers with its chat completion's id
    stop_reason = STOP_REASONS[plan.finish_reason]
    async with engine.slot(model):
        if not plan.stream:
            await asyncio.sleep(plan.ttft + max(plan.tokens - 1, 0) * plan.tpot)
            engine.record(model, plan.prompt_tokens, plan.tokens, None, None)
            engine.finished(model, plan.finish_reason, asyncio.get_running_loop().time() - arrival)
            return json_response(
                {
                    "id": ident,
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "text", "text": TOKEN * plan.tokens}],
                    "model": model,
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": plan.tokens},
                }
            )
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        written = 0
        try:
            await asyncio.sleep(plan.ttft)
            message = {"id": ident, "type": "message", "role": "assistant", "content": [],
                       "model": model, "usage": {"input_tokens": plan.prompt_tokens,
                                                 "output_tokens": 0}}  # fmt: skip
            await resp.write(
                anthropic_event("message_start", message=message)
                + anthropic_event(
                    "content_block_start", index=0, content_block={"type": "text", "text": ""}
                )
            )
            for i in range(plan.sent_tokens):
                if i:
                    await asyncio.sleep(plan.tpot)
                delta = {"type": "text_delta", "text": TOKEN}
                await resp.write(anthropic_event("content_block_delta", index=0, delta=delta))
                written += 1
            if plan.disconnect_after is not None:
                drop_connection(request)
                return resp
            usage = {"input_tokens": plan.prompt_tokens, "output_tokens": written}
            await resp.write(
                anthropic_event("content_block_stop", index=0)
                + anthropic_event("message_delta", delta={"stop_reason": stop_reason}, usage=usage)
                + anthropic_event("message_stop")
                + SSE_DONE
            )
        except ConnectionError:
            return resp
        finally:
            engine.record(model, plan.prompt_tokens, written, None, None)
        engine.finished(model, plan.finish_reason, asyncio.get_running_loop().time() - arrival)
        return resp


# A pooling answer from the request's body, its model and its prompt tokens (without usage).
Answer = Callable[[Mapping[str, Any], str, int], Any]


def pooled(
    answer: Answer, usage: Callable[[int], dict[str, Any]] = pooling_usage, omit_usage: bool = False
) -> Handler:
    """A handler for an endpoint that reads its prompt and writes no tokens (embeddings, rerank,
    score, pooling, classify): one prefill, then a JSON answer with the prompt's usage (none
    with `omit_usage`: an answer that is not an object)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        arrival = asyncio.get_running_loop().time()
        engine = request.app[ENGINE_KEY]
        body, model = await read_body(request, engine)
        plan = make_plan(request, engine, body, model)
        out = answer(body, model, plan.prompt_tokens)  # refuses a bad body before any work
        async with engine.slot(model):
            await asyncio.sleep(plan.ttft)
            engine.record(model, plan.prompt_tokens, 0, None, None)
            if plan.disconnect_after is not None:
                drop_connection(request)
                return web.Response()
            engine.finished(model, "stop", asyncio.get_running_loop().time() - arrival)
        if not (plan.omit_usage or omit_usage):
            out["usage"] = usage(plan.prompt_tokens)
        return json_response(out)

    return handle


def _listed(prefix: str, model: str, data: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{secrets.token_hex(16)}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
    }


def embeddings_answer(body: Mapping[str, Any], model: str, prompt_tokens: int) -> dict[str, Any]:
    inputs = embedding_inputs(body.get("input"))
    return _listed(
        "embd",
        model,
        [
            {"object": "embedding", "index": i, "embedding": embedding_vector(item)}
            for i, item in enumerate(inputs)
        ],
    )


def rerank_answer(body: Mapping[str, Any], model: str, prompt_tokens: int) -> dict[str, Any]:
    """vLLM's RerankResponse: the documents by relevance to the query, the best `top_n`."""
    query, documents = body.get("query"), body.get("documents")
    if not isinstance(query, str) or not isinstance(documents, list) or not documents:
        raise ApiError(400, "a rerank request needs a query and a non-empty list of documents")
    ranked = sorted(enumerate(documents), key=lambda item: -relevance(query, item[1]))
    top_n = body.get("top_n") or len(ranked)
    results = [
        {"index": i, "document": {"text": doc}, "relevance_score": relevance(query, doc)}
        for i, doc in ranked[:top_n]
    ]
    return {"id": f"rerank-{secrets.token_hex(16)}", "model": model, "results": results}


def score_answer(body: Mapping[str, Any], model: str, prompt_tokens: int) -> dict[str, Any]:
    data = [
        {"index": i, "object": "score", "score": relevance(a, b)}
        for i, (a, b) in enumerate(score_pairs(body))
    ]
    return _listed("score", model, data)


def pooling_answer(body: Mapping[str, Any], model: str, prompt_tokens: int) -> dict[str, Any]:
    data = [
        {"index": i, "object": "pooling", "data": embedding_vector(item)}
        for i, item in enumerate(pooled_inputs(body))
    ]
    return _listed("pool", model, data)


def classify_answer(body: Mapping[str, Any], model: str, prompt_tokens: int) -> dict[str, Any]:
    data = []
    for i, item in enumerate(pooled_inputs(body)):
        positive = relevance(item)
        label = "LABEL_1" if positive >= 0.5 else "LABEL_0"
        probs = [round(1 - positive, 6), positive]
        data.append({"index": i, "label": label, "probs": probs, "num_classes": 2})
    return _listed("classify", model, data)


def rerank_usage(request: web.Request) -> Callable[[int], dict[str, Any]]:
    """vLLM's RerankUsage: prompt and total tokens, or the total only (older vLLM)."""

    def usage(prompt_tokens: int) -> dict[str, Any]:
        if request.headers.get(H_TOTAL_ONLY):
            return {"total_tokens": prompt_tokens}
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}

    return usage


def sglang_rerank_answer(body: Mapping[str, Any], model: str, prompt_tokens: int) -> Any:
    """SGLang's /v1/rerank answer: a bare list of {score, document, index, meta_info}, by
    relevance, with no usage object (each item's meta_info has its own pair's prompt tokens)."""
    results = rerank_answer(body, model, prompt_tokens)["results"]
    each = prompt_tokens // max(len(results), 1)
    return [
        {
            "score": r["relevance_score"],
            "document": r["document"]["text"],
            "index": r["index"],
            "meta_info": {
                "id": secrets.token_hex(16),
                "finish_reason": None,
                "prompt_tokens": each,
            },
        }
        for r in results
    ]


async def rerank(request: web.Request) -> web.StreamResponse:
    if request.headers.get(H_SGLANG_RERANK):
        return await pooled(sglang_rerank_answer, omit_usage=True)(request)
    return await pooled(rerank_answer, rerank_usage(request))(request)


async def tokenize(request: web.Request) -> web.StreamResponse:
    """vLLM's TokenizeResponse: the prompt's (or the chat's) token ids; no usage."""
    body, _ = await read_body(request, request.app[ENGINE_KEY])
    if not isinstance(body.get("prompt"), str) and not isinstance(body.get("messages"), list):
        raise ApiError(400, "a tokenize request needs a prompt (a string) or messages")
    tokens = encoding().encode(prompt_text(body), disallowed_special=())
    return json_response(
        {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens, "token_strs": None}
    )


async def detokenize(request: web.Request) -> web.StreamResponse:
    """vLLM's DetokenizeResponse: the text of the token ids."""
    body, _ = await read_body(request, request.app[ENGINE_KEY])
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise ApiError(400, "tokens must be a list of token ids")
    return json_response({"prompt": encoding().decode(tokens)})


async def transcription(request: web.Request) -> web.StreamResponse:
    """vLLM's TranscriptionResponse for /v1/audio/transcriptions and /translations: the form's
    `file` is not decoded, its duration is its size read as 16 kHz 16-bit mono PCM, reported as
    vLLM does (`{"type": "duration", "seconds": S}`, an integer) or, with x-sim-audio-tokens:
    "I,O", as token usage."""
    engine = request.app[ENGINE_KEY]
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "the request must be multipart/form-data")
    form = await request.post()
    model, upload = form.get("model"), form.get("file")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required")
    if model not in engine.settings.models:
        raise ApiError(404, f"The model `{model}` does not exist.")
    if not isinstance(upload, web.FileField):
        raise ApiError(400, "file is required")
    size = len(upload.file.read())
    seconds = math.ceil(size / AUDIO_BYTES_PER_SECOND)
    usage: dict[str, Any] = {"type": "duration", "seconds": seconds}
    tokens = request.headers.get(H_AUDIO_TOKENS)
    if tokens is not None:
        prompt, _, answer = tokens.partition(",")
        usage = {
            "type": "tokens",
            "input_tokens": int(prompt),
            "output_tokens": int(answer),
            "total_tokens": int(prompt) + int(answer),
        }
    async with engine.slot(model):
        engine.record(model, 0, 0, None, None)
    return json_response({"text": f"{seconds} seconds of audio.", "usage": usage})


async def list_models(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    created = int(time.time())
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "arks-sim",
            "root": name,
            "parent": None,
            "max_model_len": MAX_MODEL_LEN,
        }
        for name in engine.settings.models
    ]
    return json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.StreamResponse:
    return web.Response()


async def metrics(request: web.Request) -> web.StreamResponse:
    registry = request.app[ENGINE_KEY].metrics.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def get_simulated_load(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[ENGINE_KEY].simulated.to_json())


async def put_simulated_load(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as err:
        raise ApiError(400, f"invalid JSON body: {err}") from None
    engine.simulate(SimulatedLoad.from_json(body))
    log.info("sim %s simulated load now %s", engine.settings.name, engine.simulated)
    return json_response(engine.simulated.to_json())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """`x-sim-status` short-circuits; `ApiError` becomes an OpenAI error body."""
    try:
        if H_STATUS in request.headers:
            status = header_int(request.headers, H_STATUS, 400, 599)
            assert status is not None
            return error_response(status, "simulated error")
        return await handler(request)
    except ApiError as err:
        return error_response(err.status, err.message)


def build_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[openai_errors], client_max_size=MAX_BODY_BYTES)
    app[ENGINE_KEY] = Engine(settings)
    app[RESPONSES_KEY] = {}

    async def add_instance_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[H_INSTANCE] = settings.name

    app.on_response_prepare.append(add_instance_header)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post(
        "/v1/embeddings",
        pooled(embeddings_answer, lambda n: {"prompt_tokens": n, "total_tokens": n}),
    )
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.router.add_post(path, rerank)
    for path, answer in (
        ("/score", score_answer),
        ("/v1/score", score_answer),
        ("/pooling", pooling_answer),
        ("/classify", classify_answer),
        ("/v1/classify", classify_answer),
    ):
        app.router.add_post(path, pooled(answer))
    app.router.add_post("/v1/responses", create_response)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/v1/responses/{response_id}", retrieve_response)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel_response)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        app.router.add_post(path, transcription)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/sim/load", get_simulated_load)
    app.router.add_put("/sim/load", put_simulated_load)
    return app


# --------------------------------------------------------------------------- entry points


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    count_prompt({"prompt": "warm up"})  # load the tokenizer now, not in the first request
    runner = web.AppRunner(
        build_app(settings),
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,  # a client that goes away frees its slot, like vLLM aborts
        shutdown_timeout=1.0,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=4096, reuse_address=True)
        await site.start()
        log.info(
            "sim %s serving %s on http://%s:%d (output_tokens=%d ttft_ms=%g tpot_ms=%g max_num_seqs=%d"
            " metrics=%s)",
            settings.name,
            ", ".join(settings.models),
            settings.host,
            settings.port,
            settings.output_tokens,
            settings.ttft_ms,
            settings.tpot_ms,
            settings.max_num_seqs,
            settings.metrics_style,
        )
        await stop.wait()
        log.info("sim %s stopping", settings.name)
    finally:
        await runner.cleanup()


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvloop.run(serve(Settings.from_args(args)))


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="python -m launcher.sim", description=__doc__.splitlines()[0]
    )
    add_arguments(_parser)
    main(_parser.parse_args())
