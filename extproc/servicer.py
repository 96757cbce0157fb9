"""The gRPC servicers: ext_proc (one decision per request) and the access-log receiver (usage).

Thin loops: per-request state lives in a `RequestProcessor`, decisions in `gateway.py`, the
wire in `codec.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from arks.api import ArksToken
from arks.envoy_config import PICKED_WEIGHTINGS
from arks.limits.model import BackendUnavailable
from arks.metric_rules import UNKNOWN as UNKNOWN_MODEL
from extproc import codec, settlement
from extproc.auth import authenticate
from extproc.context import Context
from extproc.decision import Decision, Deny, Forward, Identity, ReadBody, Reply
from extproc.decision_cache import Kept
from extproc.gateway import decide_body, follow
from extproc.picking.service import Destination
from extproc.request import PathKind, RequestInfo, stored_response
from extproc.response_homes import ResponseHome

log = logging.getLogger(__name__)

UNKNOWN = Identity("", "", "")  # a refusal before the token matched an ArksToken


class RequestProcessor:
    """One HTTP request's conversation with Envoy: headers, then (sometimes) the body."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.info: RequestInfo | None = None
        self.token: ArksToken | None = None
        self.destination: str | None = None  # the engines picked for it, `ip:port,...`
        self.kept: Kept | None = None  # the kept headers decision it was given, if any

    def _encode(self, decision: Decision, phase: str) -> ep.ProcessingResponse:
        match decision:
            case Forward():
                if phase == "headers":
                    kept = self.kept
                    if (
                        kept is not None
                        and self.destination is None
                        and decision.metadata is kept.decision.metadata
                    ):  # the kept decision, admitted: its answer's fixed part is built already
                        return codec.forward_prebuilt(kept.prebuilt(), decision.reservation)
                    return codec.forward_headers(decision, self.destination)
                return codec.forward_body(decision, self.destination)
            case Deny():
                self.ctx.metrics.deny(decision, self._who(decision))
                return codec.deny(decision)
            case Reply():
                return codec.reply(decision)
            case ReadBody():
                self.token = decision.token
                return codec.read_body(decision)

    def _who(self, decision: Deny) -> Identity:
        """The refused request's namespace, user and model as far as they are known: the
        decision names them once the token matched (`gateway.py`: the model only if it is a
        configured one, else "unknown"); a refusal of the gateway's own after the token was read
        (an internal error) its namespace and user; anything earlier none (empty labels)."""
        if decision.identity is not None:
            return decision.identity
        if self.token is not None:
            return Identity(self.token.key.namespace, self.token.key.name, UNKNOWN_MODEL)
        return UNKNOWN

    async def _find_home(self, response_id: str) -> ResponseHome | Deny | None:
        """Where a stored response lives. An answer's id reaches us in its access-log entry,
        flushed every HOME_POLL_S or so after the answer ended: a client asking at once for the
        response it was just given may be ahead of it, so an unknown id is looked up a few times
        (HOME_WAIT_S in all) before it is not found."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HOME_WAIT_S
        while True:
            try:
                home = await self.ctx.homes.find(response_id)
            except BackendUnavailable as err:
                log.warning("looking up response %s: %s", response_id, err)
                return STORE_UNAVAILABLE
            if home is not None or loop.time() >= deadline:
                return home
            await asyncio.sleep(HOME_POLL_S)

    async def _admit(self, decision: Decision) -> Decision:
        """Admit a routed request and, once it is, note it for settlement."""
        assert self.info is not None
        if isinstance(decision, Forward) and decision.follows is not None:
            home = await self._find_home(decision.follows)
            if isinstance(home, Deny):
                return home
            decision = follow(decision, home)
        admitted = await self._pick_and_admit(decision)
        if isinstance(admitted, Forward):
            settlement.admitted(self.ctx, self.info, admitted)
        elif isinstance(admitted, Deny) and isinstance(decision, Forward):
            admitted = dataclasses.replace(admitted, identity=decision.identity)
        return admitted

    async def _pick_and_admit(self, decision: Decision) -> Decision:
        """Pick the engine (where the endpoint asks for it), then admit; a refused request's pick
        is released. Picking comes first so that failing closed refuses before anything is charged."""
        assert self.info is not None
        if isinstance(decision, Forward) and decision.engine is not None:
            admitted = await self._admission(decision)  # a stored response's engine: no choice
            if isinstance(admitted, Forward):
                self.destination = decision.engine
            return admitted
        picking = self.ctx.picking
        if (
            picking is None
            or not isinstance(decision, Forward)
            or decision.weighting not in PICKED_WEIGHTINGS
        ):
            return await self._admission(decision)
        picked = picking.choose(
            self.info.request_id, decision.identity, decision.weighting, decision.prompt
        )
        if isinstance(picked, Deny):
            return picked
        admitted = await self._admission(decision)
        if isinstance(picked, Destination):
            if isinstance(admitted, Forward):
                self.destination = picked.value
            else:
                picking.finished(self.info.request_id)
        return admitted

    async def _admission(self, decision: Decision) -> Decision:
        """Admission (rate limits, quotas, concurrency), timed when there is any to do."""
        assert self.info is not None
        if not isinstance(decision, Forward):
            return await self.ctx.admission.admit(self.info, decision)
        started = self.ctx.timer()
        admitted = await self.ctx.admission.admit(self.info, decision)
        self.ctx.metrics.decided("admission", self.ctx.timer() - started)
        return admitted

    async def handle(self, message: ep.ProcessingRequest) -> ep.ProcessingResponse:
        """One message's answer; a request's headers or body message is timed up to it."""
        started = self.ctx.timer()
        response = await self._handle(message)
        self.ctx.metrics.decided("headers", self.ctx.timer() - started)
        return response

    async def _handle(self, message: ep.ProcessingRequest) -> ep.ProcessingResponse:
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            self.info = codec.request_info(message.request_headers, message.metadata_context)
            home: ResponseHome | None = None
            found = stored_response(self.info.path)
            if self.info.kind is PathKind.STORED and found is not None:
                looked = await self._find_home(found[0])
                if isinstance(looked, Deny):
                    return self._encode(looked, "headers")
                home = looked
            decision, self.kept = self.ctx.decisions.decide(
                self.info, self.ctx.policy.current(), self.ctx.now(), self.ctx.model_lens, home
            )
            return self._encode(await self._admit(decision), "headers")
        if kind == "request_body" and self.info is not None and self.token is not None:
            decision = decide_body(
                self.info, message.request_body.body, self.token, self.ctx.policy.current()
            )
            if isinstance(decision, ReadBody):  # cannot happen with a parsed body; never loop
                decision = Deny(
                    400, "invalid_request_error", "The request body could not be processed."
                )
            return self._encode(await self._admit(decision), "body")
        # Anything else means Envoy sends more than we asked for: let it pass unchanged.
        log.warning("unexpected ext_proc message %s; passing it through", kind)
        return _pass_through(kind)


HOME_WAIT_S = 0.5  # an unknown response id is looked up again for this long (access-log flushes)
HOME_POLL_S = 0.05
STORE_UNAVAILABLE = Deny(
    503,
    "store_unavailable",
    "The gateway cannot look up stored responses right now; try again.",
    type="server_error",
)

INTERNAL_ERROR = Deny(
    500, "internal_error", "The gateway failed to process this request.", type="server_error"
)


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
        self,
        request_iterator: AsyncIterator[ep.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ep.ProcessingResponse]:
        processor = RequestProcessor(self.ctx)
        async for message in request_iterator:
            try:
                response = await processor.handle(message)
            except Exception:  # a bug must not read as "the gateway is away" (503)
                # The request id is the one its answer and its usage record carry.
                request_id = processor.info.request_id if processor.info else ""
                log.exception("ext_proc message failed; answering 500 (request %s)", request_id)
                response = processor._encode(INTERNAL_ERROR, "headers")
            yield response


class EarlyAuth(authz_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Envoy's ext_authz check of a request whose body may be large, on its headers alone: a
    wrong credential is refused before the body is read. The request's other checks come later,
    on the ext_proc stream, as for every request."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def Check(
        self, request: authz.CheckRequest, context: grpc.aio.ServicerContext
    ) -> authz.CheckResponse:
        found = authenticate(
            codec.check_headers(request), self.ctx.policy.current(), self.ctx.now()
        )
        if isinstance(found, Deny):
            self.ctx.metrics.deny(found, UNKNOWN)
            return codec.check_denied(found)
        return codec.CHECK_OK


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Envoy's batched access log: one entry per finished request, carrying its usage."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def record(self, message: als_pb2.StreamAccessLogsMessage) -> None:
        entries = message.http_logs.log_entry
        self.ctx.metrics.access_log_entries.inc(len(entries))
        await settlement.finished(
            self.ctx, (done for entry in entries if (done := codec.finished(entry)) is not None)
        )

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            await self.record(message)
        return als_pb2.StreamAccessLogsResponse()
