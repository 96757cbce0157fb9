"""`make bench`'s latency-histograms section: what recording a request's timings costs the gateway.

    .venv/bin/python -m tests.bench.gateway --out docs/benchmarks.md --only latency

In process, CPU time per request: reading Envoy's timings off an access-log entry
(`extproc.codec.finished`, with against without them) and observing the four histograms
(`GatewayMetrics.latency`). Takes a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from extproc import codec
from extproc.metrics import GatewayMetrics
from tests.bench import report

BEGIN = "<!-- latency-bench: begin (python -m tests.bench.gateway --only latency replaces this section) -->"
END = "<!-- latency-bench: end -->"


def _entry(timed: bool) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry(
        request=accesslog_pb2.HTTPRequestProperties(request_id="r", path="/v1/chat/completions"),
        response=accesslog_pb2.HTTPResponseProperties(
            response_code=wrappers_pb2.UInt32Value(value=200)
        ),
    )
    ours = struct_pb2.Struct()
    ours.update(
        {"namespace": "team-a", "user": "alice", "model": "qwen", "stream": True}
        | {"prompt_tokens": 10, "completion_tokens": 11, "total_tokens": 21}
        | ({"first_byte_ms": 1_700_000_000_250} if timed else {})
    )
    common = entry.common_properties
    common.metadata.filter_metadata["io.arks"].CopyFrom(ours)
    if timed:
        common.start_time.FromMilliseconds(1_700_000_000_000)
        common.duration.FromMilliseconds(900)
        common.time_to_first_upstream_tx_byte.FromMilliseconds(2)
        common.time_to_last_upstream_rx_byte.FromMilliseconds(880)
    return entry


def _cpu_us(work: Callable[[], object], n: int) -> float:
    for _ in range(n // 10):
        work()
    started = time.process_time()
    for _ in range(n):
        work()
    return (time.process_time() - started) / n * 1e6


def run_section(*, quick: bool, command: str) -> str:
    n = 20_000 if quick else 100_000
    timed, untimed = _entry(True), _entry(False)
    metrics = GatewayMetrics.create()
    done = codec.finished(timed)
    assert done is not None and done.first_byte_s is not None
    read = _cpu_us(lambda: codec.finished(timed), n) - _cpu_us(lambda: codec.finished(untimed), n)
    observe = _cpu_us(lambda: metrics.latency(done), n)
    print(f"reading timings {read:.1f} µs, observing {observe:.1f} µs per request", flush=True)
    return "\n".join(
        [
            BEGIN,
            "## Latency histograms: cost per request",
            "",
            f"`{command}`, CPU time per request in the gateway, {n} requests:",
            "",
            "| step | µs |",
            "| --- | --- |",
            f"| reading Envoy's timings off the access-log entry | {read:.1f} |",
            f"| observing the four histograms | {observe:.1f} |",
            END,
        ]
    )


def write_section(path: Path, text: str) -> None:
    report.replace_section(path, BEGIN, END, text)
