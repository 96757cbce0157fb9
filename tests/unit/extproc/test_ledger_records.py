"""The usage record of each settled request, built in settlement and handed to the ledger writer,
driven through the real processor and access-log receiver over in-memory stores (no sockets)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from envoy.config.core.v3 import address_pb2
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage
from google.protobuf import timestamp_pb2

from arks.ledger import UsageRecord
from extproc.context import Context
from extproc.servicer import AccessLogReceiver, RequestProcessor
from extproc.settlement import expire_unreported
from tests.support.clock import FakeClock
from tests.support.gateway import MAX_AGE, headers_message, log_message
from tests.unit.extproc.test_cost_and_decision_metrics import priced_context


@dataclasses.dataclass
class Collected:
    """A record sink keeping what settlement handed over, in order."""

    records: list[UsageRecord] = dataclasses.field(default_factory=list)

    def submit(self, record: UsageRecord) -> None:
        self.records.append(record)


def ledgered(clock: FakeClock) -> tuple[Collected, Context]:
    sink = Collected()
    ctx = dataclasses.replace(priced_context(clock), ledger=sink)
    return sink, ctx


def with_timing_and_engine(
    message: StreamAccessLogsMessage, start_s: float, duration_s: float, host: str, port: int
) -> StreamAccessLogsMessage:
    common = message.http_logs.log_entry[0].common_properties
    common.start_time.CopyFrom(timestamp_pb2.Timestamp(seconds=int(start_s)))
    common.duration.FromMilliseconds(int(duration_s * 1000))
    common.upstream_remote_address.CopyFrom(
        address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))
    )
    return message


async def test_a_reported_request_is_one_record_with_its_usage_cost_engine_and_time() -> None:
    sink, ctx = ledgered(FakeClock())
    await RequestProcessor(ctx).handle(headers_message({"model": "qwen", "max_tokens": 64}))
    log = log_message(200, prompt_tokens=1234, completion_tokens=567, admitted_at=1e9, quota="team")
    log = with_timing_and_engine(log, 1_700_000_000, 1.5, "10.0.0.7", 8000)
    await AccessLogReceiver(ctx).record(log)

    assert sink.records == [
        UsageRecord(
            request_id="req-1",
            time=datetime.fromtimestamp(1_700_000_001.5, UTC),
            namespace="default",
            user="alice",
            model="qwen",
            engine="10.0.0.7:8000",
            path="/v1/chat/completions",
            status=200,
            prompt_tokens=1234,
            completion_tokens=567,
            cost=(1234 * 0.15 + 567 * 0.6) / 1e6,
            source="reported",
            estimate_reason=None,
            duration_s=1.5,
            ttft_s=None,
        )
    ]


async def test_a_request_without_usage_is_recorded_as_the_estimate_it_was_charged() -> None:
    sink, ctx = ledgered(FakeClock())
    await AccessLogReceiver(ctx).record(log_message(200, prompt_estimate=40))

    (record,) = sink.records
    assert (record.source, record.estimate_reason) == ("estimated", "no_usage_reported")
    assert record.prompt_tokens == 40
    assert record.engine == ""  # no upstream address in the entry
    assert record.cost is None  # no quota reserved: no price applies


async def test_an_error_answer_is_recorded_with_no_tokens() -> None:
    sink, ctx = ledgered(FakeClock())
    await AccessLogReceiver(ctx).record(log_message(503))

    (record,) = sink.records
    assert (record.status, record.prompt_tokens, record.completion_tokens) == (503, 0, 0)
    assert (record.source, record.cost) == ("reported", None)


async def test_an_unreported_request_is_recorded_once_as_its_estimate() -> None:
    clock = FakeClock()
    sink, ctx = ledgered(clock)
    await RequestProcessor(ctx).handle(
        headers_message({"model": "qwen", "max_tokens": 64}, content_length=400)
    )
    clock.advance(MAX_AGE + 1)
    assert await expire_unreported(ctx) == 1

    (record,) = sink.records
    assert (record.prompt_tokens, record.completion_tokens) == (100, 64)
    assert (record.source, record.estimate_reason, record.status) == (
        "estimated",
        "access_log_lost",
        0,
    )
    assert record.path == "/v1/chat/completions"
    assert record.cost == (100 * 0.15 + 64 * 0.6) / 1e6  # what arks_usage_cost_total counted


async def test_no_ledger_no_records_and_settlement_unchanged() -> None:
    ctx = priced_context(FakeClock())
    assert ctx.ledger is None
    await AccessLogReceiver(ctx).record(log_message(200, prompt_tokens=1, completion_tokens=2))
    labels = {"namespace": "default", "user": "alice", "model": "qwen", "code": "200"}
    assert ctx.metrics.registry.get_sample_value("arks_requests_total", labels) == 1
