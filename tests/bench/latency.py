"""`make bench`'s latency-histograms section: what recording a request's timings costs the gateway.

    .venv/bin/python -m tests.bench.gateway --out docs/benchmarks.md --only latency

In process, CPU time per request: reading Envoy's timings off an access-log entry
(`extproc.codec.finished`, with against without them) and observing the four histograms
(`GatewayMetrics.latency`); a settled request's cost (its quota's price looked up, the cost
counter incremented) and the three decision-latency observations (headers, admission,
settlement); and, for scale, one access-log entry's whole settlement with a priced quota over the
in-memory stores. Takes a few seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from arks.api import token_digest
from arks.policy import build_policy
from extproc import codec, settlement
from extproc.context import Context
from extproc.decision import Identity
from extproc.metrics import GatewayMetrics
from extproc.reservation import Reservation
from extproc.usage import Finished
from tests.bench import report
from tests.support import objects
from tests.support.clock import FakeClock
from tests.support.gateway import StaticPolicy, make_context

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


def _priced_context() -> Context:
    """A gateway context whose token's grant names a priced quota, over the in-memory stores."""
    alice = objects.token("alice", ["qwen"], tokenHash=token_digest("sk-alice"))
    alice["spec"]["qos"][0]["quota"] = {"name": "team"}
    alice["spec"]["qos"][0]["rateLimits"] = [{"type": "tpm", "value": 10**9}]
    team = {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksQuota",
        "metadata": {"name": "team", "namespace": "default"},
        "spec": {
            "quotas": [{"type": "cost", "value": 10**6, "period": "month"}],
            "prices": [{"model": "qwen", "input": 0.15, "output": 0.6}],
        },
    }
    policy = StaticPolicy(
        build_policy([("t", alice), ("e", objects.endpoint("qwen")), ("q", team)])
    )
    ctx = make_context(FakeClock())
    return dataclasses.replace(
        ctx, policy=policy, admission=dataclasses.replace(ctx.admission, policy=policy)
    )


def _settle_cpu_us(ctx: Context, entry: Finished, n: int) -> float:
    """One access-log entry's whole settlement (metrics, cost, budgets), per entry."""
    entries = [dataclasses.replace(entry, request_id=f"r{i}") for i in range(n)]

    async def run() -> float:
        await settlement.finished(ctx, entries[: n // 10])  # warm up (ids settle once)
        started = time.process_time()
        await settlement.finished(ctx, entries)
        return (time.process_time() - started) / n * 1e6

    return asyncio.run(run())


def run_section(*, quick: bool, command: str) -> str:
    n = 20_000 if quick else 100_000
    timed, untimed = _entry(True), _entry(False)
    metrics = GatewayMetrics.create()
    done = codec.finished(timed)
    assert done is not None and done.first_byte_s is not None
    read = _cpu_us(lambda: codec.finished(timed), n) - _cpu_us(lambda: codec.finished(untimed), n)
    observe = _cpu_us(lambda: metrics.latency(done), n)
    print(f"reading timings {read:.1f} µs, observing {observe:.1f} µs per request", flush=True)

    ctx = _priced_context()
    who = Identity("default", "alice", "qwen")
    reservation = Reservation(1.7e9, "team")
    policy = ctx.policy.current()

    def cost() -> None:
        charge = settlement.quota_charge(policy, who, reservation, 10, 11)
        assert charge is not None and charge.cost is not None
        ctx.metrics.charge_cost(who, charge.cost)

    def decisions() -> None:
        ctx.metrics.decided("headers", 1e-4)
        ctx.metrics.decided("admission", 5e-5)
        ctx.metrics.decided("settlement", 8e-5)

    costing = _cpu_us(cost, n)
    deciding = _cpu_us(decisions, n)
    priced = dataclasses.replace(
        done,
        namespace="default",
        user="alice",
        model="qwen",
        reservation=reservation,
        limits={"tpm": 10**9},
    )
    settling = _settle_cpu_us(ctx, priced, n // 5)
    print(
        f"cost {costing:.1f} µs, decision histograms {deciding:.1f} µs, "
        f"whole settlement {settling:.1f} µs per request",
        flush=True,
    )
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
            f"| a settled request's cost (price lookup, cost counter) | {costing:.1f} |",
            f"| the three decision-latency observations (headers, admission, settlement) | {deciding:.1f} |",
            f"| for scale: one entry's whole settlement (metrics, cost, decision time, tpm and priced quota budgets in memory) | {settling:.1f} |",
            END,
        ]
    )


def write_section(path: Path, text: str) -> None:
    report.replace_section(path, BEGIN, END, text)
