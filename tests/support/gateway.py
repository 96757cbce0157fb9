"""The gateway's servicer context over in-memory stores, and the Envoy messages that drive it:
ext_proc requests (headers, body) and access-log entries, built as Envoy sends them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2, wrappers_pb2

from arks.api import token_digest
from arks.limits.backends import MemoryBackend
from arks.limits.budgets import MemoryBudgets
from arks.limits.config import RateLimitConfig
from arks.limits.limiter import Limiter
from arks.limits.metrics import RateLimitMetrics
from arks.policy import Policy, build_policy
from extproc import qos
from extproc.admission import AdmissionControl
from extproc.context import Context
from extproc.inflight import InFlight
from extproc.metrics import GatewayMetrics
from extproc.reported import ReportedElsewhere, SingleReplica
from tests.support import objects

NOW = datetime(2030, 1, 1, tzinfo=UTC)
MAX_AGE = 600.0


class StaticPolicy:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def current(self) -> Policy:
        return self.policy


def make_context(clock: Callable[[], float], reported: ReportedElsewhere | None = None) -> Context:
    """A gateway replica's context over in-memory stores (and `reported`, if given)."""
    alice = objects.token("alice", ["qwen"], tokenHash=token_digest("sk-alice"))
    qwen = objects.endpoint("qwen")
    policy = StaticPolicy(build_policy([("token", alice), ("endpoint", qwen)]))
    metrics = GatewayMetrics.create()
    admission = AdmissionControl(
        limiter=Limiter(
            RateLimitConfig,
            MemoryBackend(),
            RateLimitMetrics.create(),
            clock=lambda: 1e9,
            own_domains=frozenset({qos.DOMAIN}),  # as extproc's: its limits come as overrides
        ),
        budgets=MemoryBudgets(),
        policy=policy,
        clock=lambda: 1e9,
    )
    return Context(
        policy=policy,
        metrics=metrics,
        inflight=InFlight(MAX_AGE, recheck=reported is not None),
        admission=admission,
        now=lambda: NOW,
        monotonic=clock,
        reported=reported or SingleReplica(),
    )


def _struct(fields: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(fields)
    return out


def headers_message(
    facts: dict[str, Any] | None,
    token: str = "sk-alice",
    request_id: str = "req-1",
    content_length: int | None = None,
) -> ep.ProcessingRequest:
    headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("authorization", f"Bearer {token}"),
        ("x-request-id", request_id),
    ]
    if content_length is not None:
        headers.append(("content-length", str(content_length)))
    metadata = base_pb2.Metadata()
    if facts is not None:
        metadata.filter_metadata["io.arks.request"].CopyFrom(_struct(facts))
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers]
            )
        ),
        metadata_context=metadata,
    )


def body_message(body: dict[str, Any]) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(
        request_body=ep.HttpBody(body=orjson.dumps(body), end_of_stream=True)
    )


def sample(ctx: Context, name: str, labels: dict[str, str] | None = None) -> float:
    value = ctx.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_requests: int = 0


def charged(ctx: Context) -> dict[tuple[str, str, str], Totals]:
    """What the gateway charged per (namespace, user, model), read from its metrics: only tenants
    that were charged tokens (a failed answer is counted in arks_requests but charged nothing)."""
    counts: defaultdict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for metric in ctx.metrics.registry.collect():
        for s in metric.samples:
            if not s.name.endswith("_total"):
                continue
            identity = (
                s.labels.get("namespace", ""),
                s.labels.get("user", ""),
                s.labels.get("model", ""),
            )
            field = {
                "arks_requests_total": "requests",
                "arks_usage_estimated_requests_total": "estimated_requests",
            }.get(s.name) or (
                f"{s.labels['type']}_tokens" if s.name == "arks_usage_tokens_total" else None
            )
            if field is not None:
                counts[identity][field] = counts[identity].get(field, 0) + s.value
    return {
        identity: Totals(**{k: int(v) for k, v in fields.items()})
        for identity, fields in counts.items()
        if "prompt_tokens" in fields
    }


def log_message(
    status: int, request_id: str = "req-1", **arks: Any
) -> als_pb2.StreamAccessLogsMessage:
    entry = accesslog_pb2.HTTPAccessLogEntry(
        request=accesslog_pb2.HTTPRequestProperties(
            request_id=request_id, path="/v1/chat/completions"
        ),
        response=accesslog_pb2.HTTPResponseProperties(
            response_code=wrappers_pb2.UInt32Value(value=status)
        ),
    )
    fields = {"namespace": "default", "user": "alice", "model": "qwen", "stream": False, **arks}
    entry.common_properties.metadata.filter_metadata["io.arks"].CopyFrom(_struct(fields))
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.append(entry)
    return message
