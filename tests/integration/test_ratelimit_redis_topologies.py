"""The rate-limit service on a real Redis Cluster and on a real Sentinel-watched master, set up
by envoyproxy/ratelimit's own environment variables (REDIS_TYPE, REDIS_URL, ...): counting
spread over the cluster's masters, all-or-nothing across slots, and a master killed under load
(the replica promoted): every call answered, limits held within one window's worth, the service
back on Redis by itself."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import grpc
import pytest
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2
from redis.crc import key_slot

from arks.adapters.redis.backend import RedisBackend
from arks.limits.model import Algorithm, Hit
from launcher.procs import Supervisor
from tests.integration.test_ratelimit_service import (
    NOT_SERVING,
    OK,
    OVER,
    SERVING,
    Service,
    descriptor,
    health_of,
)
from tests.support.exposition import sample
from tests.support.redis_topologies import Cluster, Sentinels, command, running
from tests.support.waiting import wait_for

CONFIG = """
domain: {domain}
descriptors:
  - key: tenant
    rate_limit: {{unit: day, requests_per_unit: 20}}
  - key: a
    rate_limit: {{unit: day, requests_per_unit: 1}}
  - key: b
    rate_limit: {{unit: day, requests_per_unit: 3}}
"""
LIMIT = 20  # a tenant's


@pytest.fixture
def cluster(redis_cluster: Cluster) -> Cluster:
    return redis_cluster


def upstream_env(kind: str, url: str, **more: str) -> dict[str, str]:
    """A deployment's env block for envoyproxy/ratelimit, as its README writes it."""
    return {"REDIS_SOCKET_TYPE": "tcp", "REDIS_TYPE": kind, "REDIS_URL": url, **more}


def keys_on(port: int, prefix: str) -> list[str]:
    return command(port, "--scan", "--pattern", f"{prefix}*").split()


def test_counters_spread_over_the_masters_under_the_key_prefix(
    cluster: Cluster, tmp_path: Path
) -> None:
    env = upstream_env("CLUSTER", cluster.urls, CACHE_KEY_PREFIX="team-a:")
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(sup, tmp_path, env=env, config_text=CONFIG)
        tenants = [f"t{i}" for i in range(12)]
        for tenant in tenants:
            codes = [svc.ask(descriptor(("tenant", tenant))).overall_code for _ in range(LIMIT + 1)]
            assert codes == [OK] * LIMIT + [OVER], tenant
        # Several descriptors, in several slots, in one call.
        answer = svc.ask(*(descriptor(("tenant", t)) for t in tenants))
        assert [s.code for s in answer.statuses] == [OVER] * len(tenants)
        svc.channel.close()
    held = {m.port: keys_on(m.port, "team-a:") for m in cluster.masters()}
    assert sum(len(keys) for keys in held.values()) == len(tenants)
    assert sum(1 for keys in held.values() if keys) >= 2, f"one master holds them all: {held}"
    assert all(
        key.startswith(f"team-a:{svc.domain}_tenant_") for keys in held.values() for key in keys
    )


def two_slots(domain: str) -> tuple[str, str]:
    """Values of `a` and `b` whose counters live in different slots (so, scripts)."""
    for i in range(100):
        a, b = f"x{i}", f"y{i}"
        if key_slot(f"{domain}_a_{a}".encode()) != key_slot(f"{domain}_b_{b}".encode()):
            return a, b
    raise AssertionError("no two slots found")


def test_a_refused_request_charges_no_slot_when_upstreams_switch_says_so(
    cluster: Cluster, tmp_path: Path
) -> None:
    env = upstream_env("cluster", cluster.urls, STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT="true")
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(sup, tmp_path, env=env, config_text=CONFIG)
        a, b = two_slots(svc.domain)
        both = (descriptor(("a", a)), descriptor(("b", b)))
        assert svc.ask(*both).overall_code == OK  # a: 1 of 1, b: 1 of 3
        for _ in range(5):  # a is spent: refused, and b (another slot) gives its hit back
            refused = svc.ask(*both)
            assert [s.code for s in refused.statuses] == [OVER, OK]
        alone = [svc.ask(descriptor(("b", b))).overall_code for _ in range(3)]
        assert alone == [OK, OK, OVER], "b was charged by the refused requests"
        svc.channel.close()


def test_without_the_switch_a_refused_request_still_charges_as_upstream(
    cluster: Cluster, tmp_path: Path
) -> None:
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(sup, tmp_path, env=upstream_env("cluster", cluster.urls), config_text=CONFIG)
        a, b = two_slots(svc.domain)
        both = (descriptor(("a", a)), descriptor(("b", b)))
        assert [svc.ask(*both).overall_code for _ in range(2)] == [OK, OVER]
        assert svc.ask(descriptor(("b", b))).overall_code == OK  # b: 3 of 3
        assert svc.ask(descriptor(("b", b))).overall_code == OVER
        svc.channel.close()


# --- a master killed under load ---------------------------------------------------------------


PHASE_S = 0.5  # the load's tenants are new every half second: each is counted from zero


class Load:
    """`clients` concurrent gRPC callers asking for `tenants` in turn until stopped, each tenant
    named anew every PHASE_S (so counting is tried before, during and after the failure);
    every answer counted by (tenant, phase) and code, every failed call kept."""

    def __init__(self, svc: Service, tenants: list[str], clients: int = 32) -> None:
        self.svc, self.tenants, self.clients = svc, tenants, clients
        self.answers: collections.Counter[tuple[str, int]] = collections.Counter()
        self.failures: list[str] = []
        self.stop = asyncio.Event()
        self.start = time.monotonic()
        self.killed_at = self.healed_at = 0.0

    def phase(self, at: float) -> int:
        return int((at - self.start) / PHASE_S)

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.svc.port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            await asyncio.gather(*(self._client(stub, i) for i in range(self.clients)))

    async def _client(self, stub: rls_pb2_grpc.RateLimitServiceStub, offset: int) -> None:
        i = offset
        while not self.stop.is_set():
            tenant = f"{self.tenants[i % len(self.tenants)]}-p{self.phase(time.monotonic())}"
            i += 1
            request = rls_pb2.RateLimitRequest(
                domain=self.svc.domain, descriptors=[descriptor(("tenant", tenant))]
            )
            try:
                answer = await stub.ShouldRateLimit(request, timeout=5)
            except grpc.aio.AioRpcError as err:
                self.failures.append(f"{err.code()}: {err.details()}")
                continue
            self.answers[(tenant, answer.overall_code)] += 1

    def passed(self) -> dict[str, int]:
        out: dict[str, int] = collections.defaultdict(int)
        for (tenant, code), n in self.answers.items():
            out[tenant] += n if code == OK else 0
        return out

    def asked(self, tenant: str) -> int:
        return self.answers[(tenant, OK)] + self.answers[(tenant, OVER)]


async def under_load(svc: Service, tenants: list[str], kill: object, back: object) -> Load:
    """Load on, then `kill()` after a second, then wait for `back()` (the topology healed), then
    2.5 more seconds of load."""
    load = Load(svc, tenants)
    running_load = asyncio.create_task(load.run())
    await asyncio.sleep(1.0)
    load.killed_at = time.monotonic()
    kill()  # type: ignore[operator]
    deadline = time.monotonic() + 30
    while not await asyncio.to_thread(back):  # type: ignore[arg-type]
        assert time.monotonic() < deadline, "the topology did not heal"
        await asyncio.sleep(0.1)
    load.healed_at = time.monotonic()
    await asyncio.sleep(2.5)
    load.stop.set()
    await running_load
    return load


def assert_limits_held(load: Load) -> None:
    """Every call answered; no tenant let through more than one window's worth beyond its
    limit (fail-closed: a tenant whose master is down is refused; what a replica had not
    received yet is the most counted again); tenants counted wholly before the kill or after
    the healing pass exactly their limit."""
    assert not load.failures, f"calls failed: {collections.Counter(load.failures)}"
    passed = load.passed()
    print(
        f"{sum(load.answers.values())} calls, {len(passed)} tenants, healed "
        f"{load.healed_at - load.killed_at:.1f} s after the kill; passed: {sorted(passed.items())}"
    )
    assert all(n <= 2 * LIMIT for n in passed.values()), passed
    # The client learns the new topology after the nodes do: a second's grace after healing.
    before, after = load.phase(load.killed_at), load.phase(load.healed_at + 1.0) + 1
    whole = {
        tenant: n
        for tenant, n in passed.items()
        if (int(tenant.rpartition("-p")[2]) < before or int(tenant.rpartition("-p")[2]) > after)
        and load.asked(tenant) > LIMIT
    }
    assert len(whole) >= len(load.tenants) * 2, "too little load to tell"
    assert all(n == LIMIT for n in whole.values()), whole


def assert_recovered(svc: Service, load: Load, fresh: int) -> None:
    """Limits held under the load, the outage seen (decided without Redis, fail-closed), and
    the service back by itself: SERVING, `fresh` new tenants (their keys over every slot range)
    counted in Redis again, the process never down."""
    assert_limits_held(load)
    errors = sample(svc.metrics(), "arks_ratelimit_backend_errors_total", policy="fail_closed")
    assert (errors or 0) > 0
    assert wait_for(lambda: health_of(svc), lambda h: h == {SERVING}, timeout=15)
    for i in range(fresh):
        tenant = f"after-{i}"
        codes = [svc.ask(descriptor(("tenant", tenant))).overall_code for _ in range(LIMIT + 1)]
        assert codes == [OK] * LIMIT + [OVER], tenant
    assert svc.child.alive()


def test_a_cluster_master_killed_under_load(tmp_path: Path) -> None:
    with (
        running(Cluster(tmp_path / "cluster")) as cluster,
        Supervisor(log_dir=tmp_path / "logs") as sup,
    ):
        assert isinstance(cluster, Cluster)
        env = upstream_env("CLUSTER", cluster.urls, REDIS_TIMEOUT="300ms")
        svc = Service(sup, tmp_path, "--fail-closed", env=env, config_text=CONFIG)
        tenants = [f"t{i}" for i in range(8)]
        victim = cluster.masters()[0]

        def healed() -> bool:
            return victim.proc is None and len(cluster.masters()) == 3

        load = asyncio.run(under_load(svc, tenants, victim.kill, healed))
        cluster.wait_ok()
        assert_recovered(svc, load, fresh=8)
        svc.channel.close()


def test_a_sentinel_master_killed_under_load(tmp_path: Path) -> None:
    with (
        running(Sentinels(tmp_path / "sentinel")) as sentinels,
        Supervisor(log_dir=tmp_path / "logs") as sup,
    ):
        assert isinstance(sentinels, Sentinels)
        env = upstream_env("SENTINEL", sentinels.url, REDIS_TIMEOUT="300ms")
        svc = Service(sup, tmp_path, "--fail-closed", env=env, config_text=CONFIG)
        assert [svc.ask(descriptor(("tenant", "first"))).overall_code for _ in range(2)] == [OK, OK]
        tenants = [f"t{i}" for i in range(8)]
        old = sentinels.master.port

        def healed() -> bool:
            return sentinels.current_master() == sentinels.replica.port

        load = asyncio.run(under_load(svc, tenants, sentinels.master.kill, healed))
        assert sentinels.current_master() != old
        assert_recovered(svc, load, fresh=2)
        # What the old master held came over with the replica.
        assert svc.ask(descriptor(("tenant", "first"))).statuses[0].limit_remaining == LIMIT - 3
        assert svc.child.alive()
        svc.channel.close()


def test_health_follows_a_sentinel_master_that_cannot_be_found(tmp_path: Path) -> None:
    with (
        running(Sentinels(tmp_path / "sentinel", count=1)) as sentinels,
        Supervisor(log_dir=tmp_path / "logs") as sup,
    ):
        assert isinstance(sentinels, Sentinels)
        env = upstream_env("SENTINEL", sentinels.url, REDIS_TIMEOUT="300ms")
        svc = Service(sup, tmp_path, env=env, config_text=CONFIG)
        assert svc.ask(descriptor(("tenant", "x"))).overall_code == OK
        for node in (*sentinels.sentinels, sentinels.replica, sentinels.master):
            node.kill()
        assert wait_for(lambda: health_of(svc), lambda h: h == {NOT_SERVING}, timeout=15)
        assert svc.ask(descriptor(("tenant", "x"))).overall_code == OK  # fail-open
        assert health_pb2.HealthCheckResponse.SERVING not in health_of(svc)
        svc.channel.close()


async def test_a_sentinel_found_master_waits_for_connections_and_closes_the_sentinels_ones(
    tmp_path: Path,
) -> None:
    """More concurrent applies than connections wait their turn (as one server's pool makes
    them), none refused. The client asks the sentinels where the master is; closed, it leaves
    no connection to them open (redis-py closes those only with its Sentinel object)."""
    with running(Sentinels(tmp_path / "sentinel", count=1)) as sentinels:
        assert isinstance(sentinels, Sentinels)
        (sentinel,) = sentinels.sentinels

        def ours() -> list[str]:  # every client but redis-cli asking (one sentinel: no peers)
            listed = command(sentinel.port, "CLIENT", "LIST").splitlines()
            return [line for line in listed if "cmd=client|list" not in line]

        backend = RedisBackend(
            f"redis+sentinel://{sentinel.address}/{sentinels.name}",
            timeout_s=5.0,
            max_connections=2,
        )
        now = time.time()
        busy = Hit("busy", 100, 60, 1, Algorithm.FIXED_WINDOW)
        answers = await asyncio.gather(*(backend.apply([busy], now) for _ in range(40)))
        assert sorted(outcome.used for (outcome,) in answers) == list(range(1, 41))
        assert ours()
        await backend.close()
        deadline = time.monotonic() + 5
        while ours() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert ours() == []
