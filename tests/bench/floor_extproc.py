"""The Python floor: an ext_proc server that answers the request-headers message and nothing else.

Same gRPC and event-loop setup as `extproc/server.py`, no work per request beyond decoding the
message and encoding an empty answer, so no Python gateway can cost less. Envoy is configured to
send only request headers (`processing_mode`: request headers SEND, everything else SKIP/NONE).

    python -m tests.bench.floor_extproc --grpc-address 127.0.0.1:50052
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
import uvloop
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

_HEADERS_ANSWER = ep.ProcessingResponse(request_headers=ep.HeadersResponse())


class FloorProcessor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(
        self,
        request_iterator: AsyncIterator[ep.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ep.ProcessingResponse]:
        async for message in request_iterator:
            if message.WhichOneof("request") == "request_headers":
                yield _HEADERS_ANSWER
            else:  # Envoy was told not to send these; answer anyway rather than hang it
                yield ep.ProcessingResponse()


async def serve(address: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ep_grpc.add_ExternalProcessorServicer_to_server(FloorProcessor(), server)
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
    args = parser.parse_args(argv)
    uvloop.run(serve(args.grpc_address))


if __name__ == "__main__":
    main()
