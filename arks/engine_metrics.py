"""One engine's load as a typed record (`EngineLoad`), parsed from its Prometheus `/metrics` text.

Pure: vLLM's and SGLang's metric names in (sources: `engine_metrics_sources.md`), one record out;
fetching is `arks.adapters.scrape`'s. Why: docs/architecture.md, section 6 (Engine metrics).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

Runtime = Literal["vllm", "sglang", "unknown"]


class MetricsParseError(ValueError):
    """The text is not a Prometheus exposition (the message names the line)."""


@dataclass(frozen=True, slots=True)
class HistogramTotals:
    """A histogram's cumulative `_sum` and `_count`, summed across series."""

    sum: float
    count: float


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What one scrape said about an engine; None where the engine did not say."""

    runtime: Runtime
    waiting: float | None = None
    running: float | None = None
    kv_cache_usage: float | None = None  # 0..1
    requests_total: float | None = None  # cumulative, finished requests
    errors_total: float | None = None  # cumulative, of which errors or aborts
    ttft: HistogramTotals | None = None  # cumulative
    e2e: HistogramTotals | None = None  # cumulative


@dataclass(frozen=True, slots=True)
class ScrapeFailure:
    """The engine did not answer its probe this round (the reason is for logs)."""

    reason: str


Observation = EngineLoad | ScrapeFailure


@dataclass(frozen=True, slots=True)
class LoadWindow:
    """Rates between two scrapes of one engine; None when nothing finished in between."""

    finished: float | None
    error_ratio: float | None
    mean_ttft_s: float | None
    mean_e2e_s: float | None


def window(previous: EngineLoad | None, current: EngineLoad) -> LoadWindow:
    """Error ratio and mean latencies over the interval from `previous` to `current`.

    A counter that went down means the engine restarted: that figure is None for this window.
    """

    def delta(now: float | None, before: float | None) -> float | None:
        if now is None or before is None or now < before:
            return None
        return now - before

    def mean(now: HistogramTotals | None, before: HistogramTotals | None) -> float | None:
        if now is None or before is None:
            return None
        count, total = delta(now.count, before.count), delta(now.sum, before.sum)
        if not count or total is None:
            return None
        return total / count

    if previous is None:
        return LoadWindow(None, None, None, None)
    finished = delta(current.requests_total, previous.requests_total)
    errors = delta(current.errors_total, previous.errors_total)
    ratio = min(1.0, errors / finished) if finished and errors is not None else None
    return LoadWindow(
        finished=finished,
        error_ratio=ratio,
        mean_ttft_s=mean(current.ttft, previous.ttft),
        mean_e2e_s=mean(current.e2e, previous.e2e),
    )


# --------------------------------------------------------------------------- parsing

# metric sample name -> (field, runtime). Histograms are listed by their _sum/_count samples.
_FIELDS: dict[str, tuple[str, Runtime]] = {
    "vllm:num_requests_waiting": ("waiting", "vllm"),
    "vllm:num_requests_running": ("running", "vllm"),
    "vllm:kv_cache_usage_perc": ("kv", "vllm"),
    "vllm:gpu_cache_usage_perc": ("kv_legacy", "vllm"),
    "vllm:request_success_total": ("requests", "vllm"),
    "vllm:time_to_first_token_seconds_sum": ("ttft_sum", "vllm"),
    "vllm:time_to_first_token_seconds_count": ("ttft_count", "vllm"),
    "vllm:e2e_request_latency_seconds_sum": ("e2e_sum", "vllm"),
    "vllm:e2e_request_latency_seconds_count": ("e2e_count", "vllm"),
    "sglang:num_queue_reqs": ("waiting", "sglang"),
    "sglang:num_running_reqs": ("running", "sglang"),
    "sglang:token_usage": ("kv", "sglang"),
    "sglang:num_requests_total": ("requests", "sglang"),
    "sglang:num_aborted_requests_total": ("errors", "sglang"),
    "sglang:time_to_first_token_seconds_sum": ("ttft_sum", "sglang"),
    "sglang:time_to_first_token_seconds_count": ("ttft_count", "sglang"),
    "sglang:e2e_request_latency_seconds_sum": ("e2e_sum", "sglang"),
    "sglang:e2e_request_latency_seconds_count": ("e2e_count", "sglang"),
}
_VLLM_ERROR_REASONS = frozenset({"error", "abort"})
_AVERAGED = frozenset({"kv", "kv_legacy"})


# name{labels} value [timestamp]; labels matched lazily so an OpenMetrics exemplar after
# " # " cannot swallow the value.
_SAMPLE = re.compile(
    r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*?)\})?[ \t]+(\S+)(?:[ \t]+-?[0-9]+)?(?:[ \t]+#.*)?"
)


def _split_sample(line: str, lineno: int) -> tuple[str, str, str]:
    """(name, label text without braces, value) of one sample line."""
    match = _SAMPLE.fullmatch(line)
    if match is None:
        raise MetricsParseError(f"line {lineno}: not a sample: {line[:120]!r}")
    name, labels, value = match.groups()
    return name, labels or "", value


def _label(labels: str, key: str) -> str | None:
    """The value of one label; values here are plain words, so no unescaping is needed."""
    at = labels.find(key + '="')
    while at > 0 and labels[at - 1] not in ", ":
        at = labels.find(key + '="', at + 1)
    if at == -1:
        return None
    start = at + len(key) + 2
    end = labels.find('"', start)
    return labels[start:end] if end != -1 else None


def _value(text: str, lineno: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise MetricsParseError(f"line {lineno}: value is not a number: {text[:40]!r}") from None


def parse_engine_metrics(text: str) -> EngineLoad:
    """Normalise a vLLM or SGLang exposition; unknown or missing metrics leave fields None.

    Raises `MetricsParseError` when a non-comment line is not a sample (an HTML error page,
    a truncated body, binary data).
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    runtime: Runtime = "unknown"
    errors = 0.0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] == "#":
            continue
        name, labels, value_text = _split_sample(line, lineno)
        entry = _FIELDS.get(name)
        if entry is None:
            continue
        value = _value(value_text, lineno)
        if math.isnan(value):
            continue
        field, seen = entry
        if runtime == "unknown":
            runtime = seen
        elif seen != runtime:
            continue  # one runtime per engine; ignore the other's stray series
        sums[field] = sums.get(field, 0.0) + value
        counts[field] = counts.get(field, 0) + 1
        if field == "requests" and _label(labels, "finished_reason") in _VLLM_ERROR_REASONS:
            errors += value

    def total(field: str) -> float | None:
        if field not in sums:
            return None
        return sums[field] / counts[field] if field in _AVERAGED else sums[field]

    def histogram(prefix: str) -> HistogramTotals | None:
        s, c = total(prefix + "_sum"), total(prefix + "_count")
        return HistogramTotals(s, c) if s is not None and c is not None else None

    kv = total("kv")
    if kv is None:
        kv = total("kv_legacy")
    requests = total("requests")
    if runtime == "vllm":
        error_total = errors if requests is not None else None
    else:
        error_total = total("errors")
    return EngineLoad(
        runtime=runtime,
        waiting=total("waiting"),
        running=total("running"),
        kv_cache_usage=None if kv is None else min(1.0, max(0.0, kv)),
        requests_total=requests,
        errors_total=error_total,
        ttft=histogram("ttft"),
        e2e=histogram("e2e"),
    )
