"""The Prometheus series each engine release exports for the load and latency it reports. Pure.

Autoscaling asks for exactly these (through prometheus-adapter or a KEDA query) and the engine
simulator exports them, so a renamed series cannot go unnoticed. vLLM renamed two in 0.11:
`vllm:gpu_cache_usage_perc` -> `vllm:kv_cache_usage_perc` (the new name exists since 0.9.2 on the
V1 engine; the old one is hidden in 0.11 and removed in 0.12) and
`vllm:time_per_output_token_seconds` -> `vllm:inter_token_latency_seconds` (hidden in 0.12,
removed in 0.13). Sources: docs/architecture.md, section "Autoscaling".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Generation = Literal["vllm", "vllm-legacy", "sglang"]
GENERATIONS: tuple[Generation, ...] = ("vllm", "vllm-legacy", "sglang")

# vLLM releases before this one export the old names by default (and not all the new ones).
VLLM_RENAME = (0, 11)


@dataclass(frozen=True, slots=True)
class EngineSeries:
    """One engine generation's series; histograms are named without `_bucket`/`_sum`/`_count`."""

    waiting: str  # gauge: requests queued for a batch slot
    kv_cache: str  # gauge, 0..1: KV-cache blocks (or tokens) in use
    ttft: str  # histogram, seconds: time to first token
    tpot: str  # histogram, seconds: time between output tokens


SERIES: dict[Generation, EngineSeries] = {
    "vllm": EngineSeries(
        waiting="vllm:num_requests_waiting",
        kv_cache="vllm:kv_cache_usage_perc",
        ttft="vllm:time_to_first_token_seconds",
        tpot="vllm:inter_token_latency_seconds",
    ),
    "vllm-legacy": EngineSeries(  # vLLM < 0.11, e.g. v0.8.5
        waiting="vllm:num_requests_waiting",
        kv_cache="vllm:gpu_cache_usage_perc",
        ttft="vllm:time_to_first_token_seconds",
        tpot="vllm:time_per_output_token_seconds",
    ),
    "sglang": EngineSeries(
        waiting="sglang:num_queue_reqs",
        kv_cache="sglang:token_usage",
        ttft="sglang:time_to_first_token_seconds",
        tpot="sglang:time_per_output_token_seconds",
    ),
}

_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.\d+)*(?:[-+.][0-9A-Za-z.+-]*)?$")


def parse_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of a release such as `v0.8.5`, `0.10.1.1` or `v0.11.0-cu128`; else None."""
    match = _VERSION.match(text.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def image_tag(image: str) -> str:
    """The tag of an image reference ("" when it has none or is pinned by digest only)."""
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


def generation(runtime: str, image: str = "", engine_version: str = "") -> Generation:
    """Which series an engine exports: from `engine_version` when given, else from the image tag
    (vLLM's own images only: a Dynamo tag is Dynamo's release, not its vLLM's); unknown -> the
    current names."""
    if runtime == "sglang":
        return "sglang"
    version = parse_version(engine_version) if engine_version else None
    if version is None and runtime == "vllm" and image:
        version = parse_version(image_tag(image))
    if version is not None and version < VLLM_RENAME:
        return "vllm-legacy"
    return "vllm"


# The custom metrics API names our prometheus-adapter rules
# (manifests/autoscaling/prometheus-adapter-rules.yaml) give these series: prefixed, so they
# cannot collide with other rules, and without the colon. A latency histogram is offered at
# these quantiles, one name each.
ADAPTER_PREFIX = "arks_"
ADAPTER_QUANTILES = (50, 90, 95, 99)


def adapter_metric(series: str, quantile: int | None = None) -> str:
    """The custom metrics API name of `series` (a gauge) or of its `quantile` (a histogram)."""
    name = ADAPTER_PREFIX + series.replace(":", "_")
    if quantile is None:
        return name
    if quantile not in ADAPTER_QUANTILES:
        raise ValueError(f"quantile {quantile} is not one of {ADAPTER_QUANTILES}")
    return f"{name}_p{quantile}"
