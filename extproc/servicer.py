"""The gRPC servicers: ext_proc (one decision per request) and the access-log receiver (usage).

Thin loops: per-request state lives in a `RequestProcessor`, decisions in `gateway.py`, the
wire in `codec.py`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from arks.api import ArksToken
from arks.envoy_config import PICKED_WEIGHTINGS
from arks.limits.model import BackendUnavailable
from arks.policy import PolicySource
from arks.wire import METADATA_NAMESPACE
from extproc import codec
from extproc.admission import Admission, Reservation
from extproc.decision import Decision, Deny, Forward, Identity, ReadBody, Reply
from extproc.gateway import decide_body, decide_headers
from extproc.inflight import Admitted, InFlight
from extproc.ledger import Ledger
from extproc.metrics import GatewayMetrics
from extproc.picking.service import Destination, Picking
from extproc.reported import ReportedElsewhere, SingleReplica
from extproc.request import RequestInfo
from extproc.usage import Usage, usage_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """What every request needs, built once in `main`."""

    policy: PolicySource
    ledger: Ledger
    metrics: GatewayMetrics
    inflight: InFlight
    admission: Admission
    now: Callable[[], datetime]
    monotonic: Callable[[], float]
    reported: ReportedElsewhere = field(default_factory=SingleReplica)
    picking: Picking | None = None  # endpoint picking for least-load and prefix-cache endpoints

    def charge(self, usage: Usage, status: int) -> None:
        self.ledger.charge(usage)
        self.metrics.charge(usage, status)

    async def expire_unreported(self) -> int:
        """Charge the admitted requests whose access-log entry never came; how many there were.

        An entry that went to another replica is not lost: that replica charged the request.
        If the shared store cannot say, the request is charged (a lost entry must cost something).
        """
        expired = self.inflight.expire(self.monotonic())
        if not expired:
            return 0
        try:
            elsewhere = await self.reported.seen([e.request_id for e in expired])
        except BackendUnavailable as err:
            log.warning("cannot tell whether %d requests were reported elsewhere: %s", len(expired), err)
            elsewhere = set()
        self.metrics.reported_elsewhere.inc(len(elsewhere))
        lost = [e for e in expired if e.request_id not in elsewhere]
        for entry in lost:
            usage = entry.usage()
            self.metrics.unreported.labels(usage.namespace, usage.user, usage.model).inc()
            self.charge(usage, 0)
            await self.admission.settle(
                entry.request_id, entry.identity, entry.reservation, entry.limits,
                usage.prompt_tokens, usage.completion_tokens,
            )
        return len(lost)


class RequestProcessor:
    """One HTTP request's conversation with Envoy: headers, then (sometimes) the body."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.info: RequestInfo | None = None
        self.token: ArksToken | None = None
        self.destination: str | None = None  # the engines picked for it, `ip:port,...`

    def _encode(self, decision: Decision, phase: str) -> ep.ProcessingResponse:
        match decision:
            case Forward():
                assert self.info is not None
                ours = decision.metadata[METADATA_NAMESPACE]
                self.ctx.inflight.admit(
                    Admitted(
                        self.info.request_id,
                        decision.identity,
                        decision.prompt_estimate,
                        decision.max_tokens,
                        self.ctx.monotonic(),
                        reservation=Reservation.from_metadata(ours),
                        limits=ours.get("limits", {}),
                    )
                )
                if phase == "headers":
                    return codec.forward_headers(decision, self.destination)
                return codec.forward_body(decision, self.destination)
            case Deny():
                self.ctx.metrics.denials.labels(str(decision.status), decision.code).inc()
                return codec.deny(decision)
            case Reply():
                return codec.reply(decision)
            case ReadBody():
                self.token = decision.token
                return codec.read_body(decision)

    async def _admit(self, decision: Decision) -> Decision:
        """Pick the engine (where the endpoint asks for it), then admit; a refused request's pick
        is released. Picking comes first so that failing closed refuses before anything is charged."""
        assert self.info is not None
        picking = self.ctx.picking
        if picking is None or not isinstance(decision, Forward) or decision.weighting not in PICKED_WEIGHTINGS:
            return await self.ctx.admission.admit(self.info, decision)
        picked = picking.choose(self.info.request_id, decision.identity, decision.weighting, decision.prompt)
        if isinstance(picked, Deny):
            return picked
        admitted = await self.ctx.admission.admit(self.info, decision)
        if isinstance(picked, Destination):
            if isinstance(admitted, Forward):
                self.destination = picked.value
            else:
                picking.finished(self.info.request_id)
        return admitted

    async def handle(self, message: ep.ProcessingRequest) -> ep.ProcessingResponse:
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            self.info = codec.request_info(message.request_headers, message.metadata_context)
            decision = decide_headers(self.info, self.ctx.policy.current(), self.ctx.now())
            return self._encode(await self._admit(decision), "headers")
        if kind == "request_body" and self.info is not None and self.token is not None:
            decision = decide_body(self.info, message.request_body.body, self.token, self.ctx.policy.current())
            if isinstance(decision, ReadBody):  # cannot happen with a parsed body; never loop
                decision = Deny(400, "invalid_request_error", "The request body could not be processed.")
            return self._encode(await self._admit(decision), "body")
        # Anything else means Envoy sends more than we asked for: let it pass unchanged.
        log.warning("unexpected ext_proc message %s; passing it through", kind)
        return _pass_through(kind)


def _pass_through(kind: str | None) -> ep.ProcessingResponse:
    if kind in ("request_headers", "response_headers"):
        return ep.ProcessingResponse(**{kind: ep.HeadersResponse()})
    if kind in ("request_body", "response_body"):
        return ep.ProcessingResponse(**{kind: ep.BodyResponse()})
    if kind in ("request_trailers", "response_trailers"):
        return ep.ProcessingResponse(**{kind: ep.TrailersResponse()})
    return ep.ProcessingResponse()


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        processor = RequestProcessor(self.ctx)
        async for message in request_iterator:
            yield await processor.handle(message)


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Envoy's batched access log: one entry per finished request, carrying its usage."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def record(self, message: als_pb2.StreamAccessLogsMessage) -> None:
        metrics = self.ctx.metrics
        foreign: list[str] = []  # admitted by another replica, which is waiting for them
        for entry in message.http_logs.log_entry:
            metrics.access_log_entries.inc()
            done = codec.finished(entry)
            if done is None:
                continue
            if self.ctx.picking is not None:
                self.ctx.picking.finished(done.request_id)
            if not self.ctx.inflight.finish(done.request_id) and done.request_id:
                foreign.append(done.request_id)
            usage = usage_of(done)
            if usage is None:
                metrics.requests.labels(done.namespace, done.user, done.model, str(done.status)).inc()
            else:
                self.ctx.charge(usage, done.status)
            await self.ctx.admission.settle(
                done.request_id, Identity(done.namespace, done.user, done.model), done.reservation, done.limits,
                usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
            )
        try:
            await self.ctx.reported.mark(foreign)
        except BackendUnavailable as err:
            log.warning("could not tell other replicas about %d reported requests: %s", len(foreign), err)

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            await self.record(message)
        return als_pb2.StreamAccessLogsResponse()
