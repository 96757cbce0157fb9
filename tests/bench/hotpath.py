"""extproc's own Python work per request, without gRPC: what our code costs, stage by stage.

    .venv/bin/python -m tests.bench.hotpath [--requests 10000] [--no-limits]

The bench's "Python CPU per request" is our code plus gRPC's and the event loop's machinery.
This drives the servicers' per-request code directly, on messages shaped as Envoy sends them
(the request-headers message with the body facts in metadata; access-log entries in batches
as the gateway's Envoy flushes them), in one process, CPU time from the process clock. What
the bench measures minus this is the machinery's share.

Stages, each timed alone over the same messages:
- decode: the request-headers message to `RequestInfo` (`codec.request_info`);
- decide: auth, model, routing (`gateway.decide_headers`);
- admission: rate limits, budgets, concurrency (`AdmissionControl.admit` + its settlement);
- encode: the decision to Envoy's answer (`codec.forward_headers`);
- entry: an access-log entry to `Finished` (`codec.finished`);
and `handle + record`: the servicers' whole per-request path (metrics, in-flight, settlement),
which is what the stages add up to plus the glue.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from arks.limits.backends import MemoryBackend
from arks.limits.budgets import MemoryBudgets
from arks.limits.config import RateLimitConfig
from arks.limits.limiter import Limiter
from arks.policy import FilePolicySource
from arks.wire import METADATA_NAMESPACE, REQUEST_METADATA_NAMESPACE
from extproc import codec, qos
from extproc.admission import AdmissionControl
from extproc.context import Context
from extproc.decision import Forward
from extproc.gateway import decide_headers
from extproc.inflight import InFlight
from extproc.picking.service import Picking, PickSettings
from extproc.server import create_metrics
from extproc.servicer import AccessLogReceiver, RequestProcessor
from tests.bench.targets import MODEL, bench_policy

TOKEN = "sk-arks-hotpath-0123456789abcdef0123456789abcdef"
ENTRIES_PER_BATCH = 12  # about what one 16 KiB access-log flush holds
ROUNDS = 3


def headers_message(request_id: str, token: str = TOKEN) -> ep.ProcessingRequest:
    """What Envoy sends for a non-streamed chat request: its headers, and the body's facts
    json_to_metadata lifted (model) in the request namespace."""
    headers = [
        (":authority", "127.0.0.1:8080"),
        (":path", "/v1/chat/completions"),
        (":method", "POST"),
        (":scheme", "http"),
        ("authorization", f"Bearer {token}"),
        ("content-type", "application/json"),
        ("content-length", "73"),
        ("user-agent", "OpenAI/Python 1.99.0"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", request_id),
    ]
    facts = struct_pb2.Struct(fields={"model": struct_pb2.Value(string_value=MODEL)})
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers]
            ),
            end_of_stream=False,
        ),
        metadata_context=base_pb2.Metadata(filter_metadata={REQUEST_METADATA_NAMESPACE: facts}),
    )


def access_log_entry(
    request_id: str, answer: ep.ProcessingResponse
) -> accesslog_pb2.HTTPAccessLogEntry:
    """The entry Envoy logs for an answered request: extproc's metadata plus usage.lua's."""
    ours = struct_pb2.Struct()
    ours.CopyFrom(answer.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value)
    for key, value in (("prompt_tokens", 9), ("completion_tokens", 16), ("total_tokens", 25)):
        ours.fields[key].number_value = value
    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    common.metadata.filter_metadata[METADATA_NAMESPACE].CopyFrom(ours)
    common.start_time.GetCurrentTime()
    common.duration.FromMilliseconds(2)
    common.time_to_first_upstream_tx_byte.FromMicroseconds(300)
    common.time_to_last_upstream_rx_byte.FromMicroseconds(1500)
    common.upstream_remote_address.socket_address.address = "127.0.0.1"
    common.upstream_remote_address.socket_address.port_value = 8000
    common.upstream_request_attempt_count = 1
    entry.request.request_id = request_id
    entry.request.path = "/v1/chat/completions"
    entry.request.request_body_bytes = 73
    entry.response.response_code.value = 200
    entry.response.response_body_bytes = 420
    return entry


def context(policy_file: Path) -> Context:
    """extproc's context as `server.serve` builds it with counters in memory (no Redis, no
    ledger), picking on (every served gateway has it)."""
    metrics = create_metrics()
    source = FilePolicySource(policy_file)
    admission = AdmissionControl(
        limiter=Limiter(
            config=RateLimitConfig,
            backend=MemoryBackend(),
            metrics=metrics.limits,
            clock=time.time,
            own_domains=frozenset({qos.DOMAIN}),
        ),
        budgets=MemoryBudgets(),
        policy=source,
        clock=time.time,
    )
    return Context(
        policy=source,
        metrics=metrics.gateway,
        inflight=InFlight(max_age=630.0),
        admission=admission,
        now=lambda: datetime.now(UTC),
        monotonic=time.monotonic,
        picking=Picking(PickSettings(), metrics.gateway),
    )


@dataclass(frozen=True)
class Stage:
    name: str
    us_per_request: float


def _timed(run: Callable[[int], None], requests: int) -> float:
    started = time.process_time()
    run(requests)
    return (time.process_time() - started) / requests * 1e6


def measure(requests: int, *, limits: bool = True) -> list[Stage]:
    with tempfile.TemporaryDirectory(prefix="arks-hotpath-") as tmp:
        policy = Path(tmp) / "policy.yaml"
        text = bench_policy(8000, TOKEN)
        if not limits:  # the token with no limits and no quota: auth, routing, usage only
            text = _without_limits(text)
        policy.write_text(text)
        ctx = context(policy)
        return asyncio.run(_stages(ctx, requests))


def _without_limits(text: str) -> str:
    docs = list(yaml.safe_load_all(text))
    for doc in docs:
        if doc["kind"] == "ArksToken":
            for grant in doc["spec"]["qos"]:
                grant.pop("rateLimits", None)
                grant.pop("quota", None)
    return yaml.safe_dump_all([d for d in docs if d["kind"] != "ArksQuota"], sort_keys=False)


async def _stages(ctx: Context, requests: int) -> list[Stage]:
    ids = [f"hotpath-{i:08d}" for i in range(requests)]
    messages = [headers_message(i) for i in ids]
    receiver = AccessLogReceiver(ctx)

    async def whole(n: int) -> list[accesslog_pb2.HTTPAccessLogEntry]:
        entries = []
        for i in range(n):
            answer = await RequestProcessor(ctx).handle(messages[i])
            entries.append(access_log_entry(ids[i], answer))
        return entries

    # Warm up (policy indexes, metric children), and build the entries the later stages read.
    entries = await whole(min(requests, 500))
    entries = await whole(requests)
    batches = []
    for start in range(0, requests, ENTRIES_PER_BATCH):
        batch = als_pb2.StreamAccessLogsMessage()
        batch.http_logs.log_entry.extend(entries[start : start + ENTRIES_PER_BATCH])
        batches.append(batch)
    for batch in batches:  # settle the warm-up's admissions
        await receiver.record(batch)

    async def handle_and_record() -> float:
        started = time.process_time()
        for i in range(requests):
            await RequestProcessor(ctx).handle(messages[i])
            if i % ENTRIES_PER_BATCH == ENTRIES_PER_BATCH - 1:
                await receiver.record(batches[i // ENTRIES_PER_BATCH])
        spent = (time.process_time() - started) / requests * 1e6
        for batch in batches[requests // ENTRIES_PER_BATCH :]:
            await receiver.record(batch)
        return spent

    policy = ctx.policy.current()
    infos = [codec.request_info(m.request_headers, m.metadata_context) for m in messages]
    now = ctx.now()
    decisions = [d for info in infos if isinstance(d := decide_headers(info, policy, now), Forward)]
    assert len(decisions) == len(infos), "the bench's token must be forwarded"

    def decode(n: int) -> None:
        for m in messages[:n]:
            codec.request_info(m.request_headers, m.metadata_context)

    def decide(n: int) -> None:
        for info in infos[:n]:
            decide_headers(info, policy, now)

    def encode(n: int) -> None:
        for d in decisions[:n]:
            codec.forward_headers(d)

    def entry(n: int) -> None:
        for e in entries[:n]:
            codec.finished(e)

    async def admission() -> float:
        started = time.process_time()
        for info, d in zip(infos, decisions, strict=True):
            admitted = await ctx.admission.admit(info, d)
            assert isinstance(admitted, Forward)
            ours = admitted.metadata[METADATA_NAMESPACE]
            await ctx.admission.settle(
                info.request_id, d.identity, admitted.reservation, ours.get("limits", {}), 9, 16
            )
        return (time.process_time() - started) / requests * 1e6

    best: dict[str, float] = {}
    for _ in range(
        ROUNDS
    ):  # the least of a few rounds: what the code costs, not the machine's noise
        for name, spent in (
            ("decode (codec.request_info)", _timed(decode, requests)),
            ("decide (gateway.decide_headers)", _timed(decide, requests)),
            ("admission (AdmissionControl.admit and settle)", await admission()),
            ("encode (codec.forward_headers)", _timed(encode, requests)),
            ("entry (codec.finished)", _timed(entry, requests)),
            ("handle + record (the whole per-request path)", await handle_and_record()),
        ):
            best[name] = min(spent, best.get(name, spent))
    return [Stage(name, spent) for name, spent in best.items()]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.hotpath", description=__doc__)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--no-limits", action="store_true")
    args = parser.parse_args()
    for stage in measure(args.requests, limits=not args.no_limits):
        print(f"{stage.us_per_request:8.1f} µs  {stage.name}")


if __name__ == "__main__":
    main()
