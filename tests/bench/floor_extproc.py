"""The Python floor: an ext_proc server that answers the request-headers message and nothing else.

Same gRPC and event-loop setup as `extproc/server.py`, no work per request beyond decoding the
message and encoding an empty answer, so no Python gateway can cost less. Envoy is configured to
send only request headers (`processing_mode`: request headers SEND, everything else SKIP/NONE).

With `--usage-channel` it is the second floor: the usage channel's structural cost. Its answer
carries a constant `io.arks` metadata of the gateway's shape and size (prebuilt: encoding it is
gRPC's C), and it also serves the gRPC access-log service, which takes Envoy's batches (decoded
by gRPC, as the gateway's are) and reads nothing in them.

With `--gateway-answer` (for the Envoy filter ladder, `tests/bench/breakdown.py`) its answer is
the gateway's whole answer to the bench's requests: the routing headers set, the credential
removed, and the metadata (a streamed request's, when Envoy lifted `stream: true`).

    python -m tests.bench.floor_extproc --grpc-address 127.0.0.1:50052 [--usage-channel | --gateway-answer]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2

from arks.wire import (
    METADATA_NAMESPACE,
    MODEL_HEADER,
    NAMESPACE_HEADER,
    REQUEST_METADATA_NAMESPACE,
    USER_HEADER,
)

_HEADERS_ANSWER = ep.ProcessingResponse(request_headers=ep.HeadersResponse())


def _metadata(stream: bool, usage: bool) -> struct_pb2.Struct:
    """The `io.arks` metadata the gateway gives the bench's requests (what its access-log filter
    selects on, and what makes its entries as large as the gateway's); with `usage`, also the
    usage the gateway's usage.lua adds (the usage channel's floor has no usage.lua)."""
    fields = struct_pb2.Struct()
    fields.update(
        {
            "namespace": "default",
            "user": "bench",
            "model": "bench-model",
            "stream": stream,
            "quota": "bench",
            "limits": {"tpm": 10**12},
            "concurrency": True,
            "admitted_at": 1796540870.204082,
        }
    )
    if not stream:
        fields["check_types"] = True
    if usage:
        fields.update({"prompt_tokens": 9, "completion_tokens": 16, "total_tokens": 25})
    metadata = struct_pb2.Struct()
    metadata.fields[METADATA_NAMESPACE].struct_value.CopyFrom(fields)
    return metadata


def _usage_answer() -> ep.ProcessingResponse:
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(), dynamic_metadata=_metadata(False, usage=True)
    )


def _set(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _gateway_answer(stream: bool) -> ep.ProcessingResponse:
    mutation = ep.HeaderMutation(
        set_headers=[
            _set(MODEL_HEADER, "bench-model"),
            _set(NAMESPACE_HEADER, "default"),
            _set(USER_HEADER, "bench"),
            _set("content-type", "application/json"),
        ],
        remove_headers=["authorization"],
    )
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(
            response=ep.CommonResponse(header_mutation=mutation, clear_route_cache=True)
        ),
        dynamic_metadata=_metadata(stream, usage=False),
    )


class GatewayShapedProcessor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Answers as the gateway does, from two prebuilt answers: no decision, no admission."""

    def __init__(self) -> None:
        self.answers = {False: _gateway_answer(False), True: _gateway_answer(True)}

    async def Process(
        self,
        request_iterator: AsyncIterator[ep.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ep.ProcessingResponse]:
        async for message in request_iterator:
            if message.WhichOneof("request") != "request_headers":
                yield ep.ProcessingResponse()
                continue
            facts = message.metadata_context.filter_metadata.get(REQUEST_METADATA_NAMESPACE)
            stream = facts is not None and facts.fields["stream"].bool_value
            yield self.answers[stream]


class FloorProcessor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, answer: ep.ProcessingResponse = _HEADERS_ANSWER) -> None:
        self.answer = answer

    async def Process(
        self,
        request_iterator: AsyncIterator[ep.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ep.ProcessingResponse]:
        async for message in request_iterator:
            if message.WhichOneof("request") == "request_headers":
                yield self.answer
            else:  # Envoy was told not to send these; answer anyway rather than hang it
                yield ep.ProcessingResponse()


class FloorAccessLog(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Takes the batches and reads nothing in them."""

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        async for _ in request_iterator:
            pass
        return als_pb2.StreamAccessLogsResponse()


async def serve(address: str, usage_channel: bool = False, gateway_answer: bool = False) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    processor: ep_grpc.ExternalProcessorServicer = (
        GatewayShapedProcessor()
        if gateway_answer
        else FloorProcessor(_usage_answer() if usage_channel else _HEADERS_ANSWER)
    )
    ep_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    if usage_channel or gateway_answer:
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(FloorAccessLog(), server)
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.floor_extproc", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--grpc-address", default="127.0.0.1:50052")
    parser.add_argument(
        "--usage-channel",
        action="store_true",
        help="also the access-log service, and metadata of the gateway's shape in the answer",
    )
    parser.add_argument(
        "--gateway-answer",
        action="store_true",
        help="answer as the gateway does (headers, metadata); serve the access log too",
    )
    args = parser.parse_args(argv)
    uvloop.run(serve(args.grpc_address, args.usage_channel, args.gateway_answer))


if __name__ == "__main__":
    main()
