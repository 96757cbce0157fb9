"""The Python floor: an ext_proc server that answers the request-headers message and nothing else.

Same gRPC and event-loop setup as `extproc/server.py`, no work per request beyond decoding the
message and encoding an empty answer, so no Python gateway can cost less. Envoy is configured to
send only request headers (`processing_mode`: request headers SEND, everything else SKIP/NONE).

With `--usage-channel` it is the second floor: the usage channel's structural cost. Its answer
carries a constant `io.arks` metadata of the gateway's shape and size (prebuilt: encoding it is
gRPC's C), and it also serves the gRPC access-log service, which takes Envoy's batches (decoded
by gRPC, as the gateway's are) and reads nothing in them.

    python -m tests.bench.floor_extproc --grpc-address 127.0.0.1:50052 [--usage-channel]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
import uvloop
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2

from arks.wire import METADATA_NAMESPACE

_HEADERS_ANSWER = ep.ProcessingResponse(request_headers=ep.HeadersResponse())


def _usage_answer() -> ep.ProcessingResponse:
    """The headers answer with metadata of the gateway's shape for the bench's token (what its
    access-log filter selects on, and what makes its entries as large as the gateway's), and
    the usage the gateway's usage.lua adds."""
    fields = struct_pb2.Struct()
    fields.update(
        {
            "namespace": "default",
            "user": "bench",
            "model": "bench-model",
            "stream": False,
            "quota": "bench",
            "limits": {"tpm": 10**12},
            "concurrency": True,
            "check_types": True,
            "admitted_at": 1796540870.204082,
            "prompt_tokens": 9,
            "completion_tokens": 16,
            "total_tokens": 25,
        }
    )
    metadata = struct_pb2.Struct()
    metadata.fields[METADATA_NAMESPACE].struct_value.CopyFrom(fields)
    return ep.ProcessingResponse(request_headers=ep.HeadersResponse(), dynamic_metadata=metadata)


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


async def serve(address: str, usage_channel: bool = False) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    answer = _usage_answer() if usage_channel else _HEADERS_ANSWER
    ep_grpc.add_ExternalProcessorServicer_to_server(FloorProcessor(answer), server)
    if usage_channel:
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
    args = parser.parse_args(argv)
    uvloop.run(serve(args.grpc_address, args.usage_channel))


if __name__ == "__main__":
    main()
