"""The rate-limit service's own Python work per decision, without gRPC: request bytes in, response
bytes out, through the servicer as `python -m ratelimit` builds it; CPU from the process clock.

    .venv/bin/python -m tests.bench.ratelimit_hotpath [--decisions 20000] [--rounds 5] [--redis URL]

`tests.bench.ratelimit` measures this plus gRPC's and the event loop's machinery; this isolates
our part, precisely enough to compare one change (min of several rounds). Each stage is also
timed alone over the same requests (the bench's: one descriptor `user: u<i % 100>`).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from tempfile import TemporaryDirectory

import uvloop
from envoy.service.ratelimit.v3 import rls_pb2

from arks.adapters.redis.backend import RedisBackend
from arks.limits.backends import CounterBackend, MemoryBackend
from arks.limits.config import load_config
from arks.limits.limiter import Limiter
from ratelimit import codec
from ratelimit.server import create_metrics
from ratelimit.servicer import RateLimitService
from tests.bench.ratelimit import USERS, _requests, rate_limit_config

DOMAIN = "bench"


def _service(config: Path, backend: CounterBackend) -> RateLimitService:
    config_now = load_config((config,))
    metrics, calls = create_metrics()
    limiter = Limiter(
        config=lambda: config_now,
        backend=backend,
        metrics=metrics,
        clock=time.time,
        overrides_anywhere=False,
    )
    return RateLimitService(limiter, calls)


async def _per_decision(
    step: Callable[[int], Awaitable[object]], decisions: int, rounds: int, in_flight: int
) -> float:
    """µs of process CPU per call of `step`, the least of `rounds`, `in_flight` callers at once."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()

        async def caller(k: int) -> None:
            for i in range(k, decisions, in_flight):
                await step(i)

        await asyncio.gather(*(caller(k) for k in range(in_flight)))
        best = min(best, (time.process_time() - started) / decisions * 1e6)
    return best


async def measure(
    backend_name: str, redis_url: str, decisions: int, rounds: int, in_flight: int
) -> None:
    raw = _requests(DOMAIN)
    parse = rls_pb2.RateLimitRequest.FromString
    with TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(rate_limit_config(DOMAIN))
        backend: CounterBackend = (
            RedisBackend(redis_url, prefix="arks:bench-hotpath:")
            if backend_name == "redis"
            else MemoryBackend()
        )
        service = _service(config, backend)
    parsed = [parse(b) for b in raw]
    asked = [codec.request(m) for m in parsed]
    answers = [await service.limiter.decide(a) for a in asked]
    responses = [codec.response(a) for a in answers]

    async def whole(i: int) -> object:
        return (await service.answer(parse(raw[i % USERS]))).SerializeToString()

    async def decode(i: int) -> object:
        return codec.request(parse(raw[i % USERS]))

    async def decide(i: int) -> object:
        return await service.limiter.decide(asked[i % USERS])

    async def encode(i: int) -> object:
        return codec.response(answers[i % USERS]).SerializeToString()

    async def serialize(i: int) -> object:
        return responses[i % USERS].SerializeToString()

    async def timer(i: int) -> object:
        service.metrics.called(DOMAIN, 0.001)
        return None

    print(
        f"{backend_name}: µs of CPU per decision, least of {rounds} rounds of {decisions}, {in_flight} in flight"
    )
    for name, step in (
        ("whole (bytes -> bytes)", whole),
        ("decode (parse + codec.request)", decode),
        ("limiter.decide", decide),
        ("encode (codec.response + serialize)", encode),
        ("  of which serialize", serialize),
        ("call timer (metrics.called)", timer),
    ):
        us = await _per_decision(step, decisions, rounds, in_flight)
        print(f"  {name:38} {us:7.2f}")
    await backend.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.ratelimit_hotpath", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--backend", choices=("memory", "redis", "both"), default="both")
    args = parser.parse_args(argv)
    names = ("memory", "redis") if args.backend == "both" else (args.backend,)
    for name in names:
        uvloop.run(measure(name, args.redis, args.decisions, args.rounds, args.in_flight))


if __name__ == "__main__":
    main()
