"""The engines of stored responses in Redis: what one gateway replica records, every replica
finds; an entry expires; Redis away is `BackendUnavailable` (the servicer answers 503)."""

from __future__ import annotations

import asyncio

import pytest

from arks.limits.model import BackendUnavailable
from extproc.response_homes import RedisHomes, ResponseHome
from launcher.procs import free_port
from tests.support.redis_server import SHARED_REDIS, fresh_prefix

pytestmark = pytest.mark.timeout(30)
HOME = ResponseHome("default", "qwen", "10.0.0.7:8000")


async def test_a_response_recorded_by_one_replica_is_found_by_another() -> None:
    async with fresh_prefix("response") as prefix:
        a = RedisHomes(SHARED_REDIS, prefix=prefix)
        b = RedisHomes(SHARED_REDIS, prefix=prefix)
        try:
            await a.remember("resp_1", HOME)

            assert await b.find("resp_1") == HOME
            assert await b.find("resp_2") is None
        finally:
            await a.close()
            await b.close()


async def test_a_recorded_response_expires() -> None:
    async with fresh_prefix("response") as prefix:
        homes = RedisHomes(SHARED_REDIS, ttl_s=0.2, prefix=prefix)
        try:
            await homes.remember("resp_1", HOME)
            await asyncio.sleep(0.4)

            assert await homes.find("resp_1") is None
        finally:
            await homes.close()


async def test_redis_away_is_backend_unavailable() -> None:
    homes = RedisHomes(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    try:
        with pytest.raises(BackendUnavailable):
            await homes.find("resp_1")
        with pytest.raises(BackendUnavailable):
            await homes.remember("resp_1", HOME)
    finally:
        await homes.close()
