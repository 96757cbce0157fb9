"""envoyproxy/ratelimit's own service, cache, integration and health tests replayed against the
real `python -m ratelimit`, as a client sees it: over gRPC, its HTTP port and its metrics. Each
test names the upstream test it replays; docs/ratelimit-compatibility.md accounts for all of them
(upstream's commit, and what is covered elsewhere or deliberately different).

Counting replays run on the memory store and on Redis (the shared server, under a key prefix of
their own), and upstream's integration test also on Redis behind the local over-limit cache, over
xDS and on a TLS Redis with a password and a client certificate. One service process per store
and per environment is shared by the module. Upstream's mocked counts are reached here by a
first request charging what the mock pretends was there; the metric deltas of the request under
test are what upstream's stat assertions are compared with.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis
import yaml
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.xds.cache import SnapshotCache
from launcher.procs import Supervisor, free_port, wait_http, wait_port
from rls_protos import rls_conf_pb2 as rls
from tests.integration.test_ratelimit_service import NOT_SERVING, SERVING, Service, descriptor
from tests.integration.test_ratelimit_xds import RETRY, ControlPlane, snapshot
from tests.support.certs import authority, issue
from tests.support.exposition import sample
from tests.support.redis_server import SHARED_REDIS, PrivateRedis
from tests.support.waiting import wait_for

RUNTIME = (
    Path(__file__).parents[1]
    / "unit/arks/limits/fixtures/upstream/test/integration/runtime/current/ratelimit"
)

Response = rls_pb2.RateLimitResponse
OK, OVER = Response.OK, Response.OVER_LIMIT
SECOND, MINUTE, HOUR, DAY = (
    Response.RateLimit.Unit.Value(u) for u in ("SECOND", "MINUTE", "HOUR", "DAY")
)

# The limits the service-test replays use, beside upstream's runtime directory. Hours, where
# upstream's mocks say seconds or minutes, so a sequence never straddles a window's end.
REPLAY = """
domain: {domain}
descriptors:
  - key: foo
    rate_limit: {{unit: minute, requests_per_unit: 10}}
  - key: baz
    rate_limit: {{unlimited: true}}
  - key: shadow
    shadow_mode: true
    rate_limit: {{unit: hour, requests_per_unit: 1}}
  - key: shadow15
    shadow_mode: true
    rate_limit: {{unit: hour, requests_per_unit: 15}}
  - key: regular
    rate_limit: {{unit: hour, requests_per_unit: 1}}
  - key: regular3
    rate_limit: {{unit: hour, requests_per_unit: 3}}
  - key: quota
    quota_mode: true
    rate_limit: {{unit: hour, requests_per_unit: 3}}
  - key: quota1
    quota_mode: true
    rate_limit: {{unit: hour, requests_per_unit: 1}}
  - key: key2
    descriptors:
      - key: subkey2
        rate_limit: {{unit: minute, requests_per_unit: 10}}
  - key: key3
    rate_limit: {{unit: hour, requests_per_unit: 10}}
    descriptors:
      - key: subkey3
        rate_limit: {{unit: day, requests_per_unit: 10}}
  - key: near8
    rate_limit: {{unit: hour, requests_per_unit: 8}}
  - key: near10
    rate_limit: {{unit: hour, requests_per_unit: 10}}
  - key: near15
    rate_limit: {{unit: hour, requests_per_unit: 15}}
  - key: near20
    rate_limit: {{unit: hour, requests_per_unit: 20}}
  - key: stop14
    rate_limit: {{unit: hour, requests_per_unit: 14}}
  - key: key1
    value: value1
    descriptors:
      - key: subkey1
        rate_limit: {{unit: second, requests_per_unit: 5}}
"""


class Rls:
    """A running service: asked in any domain, its counters read through one connection."""

    def __init__(self, svc: Service, prefix: str = "") -> None:
        self.svc = svc
        self.prefix = prefix  # its Redis keys' ("" on memory)
        self.scraper = httpx.Client(base_url=f"http://127.0.0.1:{svc.metrics_port}")

    @property
    def domain(self) -> str:
        return self.svc.domain

    def call(
        self, domain: str, *descriptors: common.RateLimitDescriptor, hits_addend: int = 0
    ) -> rls_pb2.RateLimitResponse:
        request = rls_pb2.RateLimitRequest(
            domain=domain, descriptors=descriptors, hits_addend=hits_addend
        )
        return self.svc.stub.ShouldRateLimit(request, timeout=5)

    def ask(self, *descriptors: common.RateLimitDescriptor) -> rls_pb2.RateLimitResponse:
        return self.call(self.domain, *descriptors)

    def counters(self) -> Counters:
        return Counters(self.scraper.get("/metrics").text)

    def close(self) -> None:
        self.scraper.close()
        self.svc.channel.close()


class Counters:
    """Upstream's per-limit stats (total_hits, over_limit, near_limit, within_limit,
    shadow_mode) under our names, by stats key."""

    def __init__(self, text: str) -> None:
        self.text = text

    def get(self, stat: str, key: str, domain: str = "") -> float:
        name = {"total_hits": "hits"}.get(stat, stat)
        found = sample(
            self.text, f"arks_ratelimit_{name}_total", domain=domain or key.split(".")[0], key=key
        )
        return found or 0.0

    def split(self, key: str) -> tuple[float, ...]:
        """(total_hits, over_limit, near_limit, within_limit)"""
        return tuple(
            self.get(stat, key)
            for stat in ("total_hits", "over_limit", "near_limit", "within_limit")
        )

    def since(self, before: Counters, key: str) -> tuple[float, ...]:
        """What `split` counted between `before` and these."""
        return tuple(a - b for a, b in zip(self.split(key), before.split(key), strict=True))


def fresh() -> str:
    return uuid.uuid4().hex[:12]


def room_in_window(window_s: int, needed_s: float) -> None:
    """Start a sequence of asks in one fixed window: wait for the next when this one ends in
    fewer than `needed_s` (upstream's own tests take that chance)."""
    left = window_s - time.time() % window_s
    if left < needed_s:
        time.sleep(left + 0.05)


def status(
    code: int, per: int | None = None, unit: int = 0, remaining: int = 0
) -> Response.DescriptorStatus:
    out = Response.DescriptorStatus(code=code, limit_remaining=remaining)
    if per is not None:
        out.current_limit.CopyFrom(Response.RateLimit(requests_per_unit=per, unit=unit))
    return out


def assert_answer(
    answer: rls_pb2.RateLimitResponse, code: int, *statuses: Response.DescriptorStatus
) -> None:
    """Upstream's AssertProtoEqual of the whole response, each limited status's time to its
    reset taken from the answer (as upstream's tests take it)."""
    expected = Response(overall_code=code, statuses=statuses)
    for mine, theirs in zip(expected.statuses, answer.statuses, strict=False):
        if mine.HasField("current_limit"):
            mine.duration_until_reset.CopyFrom(theirs.duration_until_reset)
    assert answer == expected


def start(
    sup: Supervisor, tmp: Path, *extra: str, env: dict[str, str] | None = None, prefix: str = ""
) -> Rls:
    """A service on REPLAY and upstream's integration runtime directory."""
    return Rls(
        Service(sup, tmp, "--config", str(RUNTIME / "config"), *extra, env=env, config_text=REPLAY),
        prefix,
    )


def on_redis(prefix: str, **more: str) -> dict[str, str]:
    """Upstream's variables for the shared Redis, its counters under `prefix`."""
    return {
        "REDIS_SOCKET_TYPE": "tcp",
        "REDIS_URL": SHARED_REDIS.removeprefix("redis://").removesuffix("/0"),
        "CACHE_KEY_PREFIX": prefix,
        **more,
    }


def forget(prefix: str) -> None:
    admin = redis.Redis.from_url(SHARED_REDIS)
    try:
        keys = list(admin.scan_iter(f"{prefix}*"))
        if keys:
            admin.delete(*keys)
    finally:
        admin.close()


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Supervisor, Path]]:
    tmp = tmp_path_factory.mktemp("upstream-replay")
    with Supervisor(log_dir=tmp / "logs") as supervisor:
        yield supervisor, tmp


STORES = ["memory", "redis"]


@pytest.fixture(scope="module")
def per_second_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def stores(
    sup: tuple[Supervisor, Path], per_second_redis: PrivateRedis
) -> Iterator[dict[str, Rls]]:
    """memory; Redis under a prefix (upstream's CACHE_KEY_PREFIX: its WithCachePrefix); Redis
    behind the local over-limit cache (LOCAL_CACHE_SIZE_IN_BYTES: its WithLocalCache); and
    per-second limits in a Redis of their own (REDIS_PERSECOND: its WithPerSecondRedis)."""
    supervisor, tmp = sup
    redis_prefix, cached_prefix, split_prefix = (f"replay-{fresh()}:" for _ in range(3))
    per_second = {
        "REDIS_PERSECOND": "true",
        "REDIS_PERSECOND_SOCKET_TYPE": "tcp",
        "REDIS_PERSECOND_URL": f"127.0.0.1:{per_second_redis.port}",
    }
    running = {
        "memory": start(supervisor, tmp),
        "redis": start(supervisor, tmp, env=on_redis(redis_prefix), prefix=redis_prefix),
        "redis-local-cache": start(
            supervisor,
            tmp,
            env=on_redis(cached_prefix, LOCAL_CACHE_SIZE_IN_BYTES="1000000"),
            prefix=cached_prefix,
        ),
        "redis-per-second": start(
            supervisor, tmp, env=on_redis(split_prefix, **per_second), prefix=split_prefix
        ),
    }
    yield running
    for service in running.values():
        service.close()
        if service.prefix:
            forget(service.prefix)


# --- test/integration/integration_test.go: testBasicBaseConfig ------------------------------


def replay_basic_base_config(r: Rls, *, stop_increment: bool = False) -> None:
    """testBasicBaseConfig on upstream's runtime directory (basic.yaml, another.yaml): statuses
    and total_hits / over_limit, call by call. `stop_increment`: the service runs with
    STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT, and key2 is not charged once key3 refuses."""
    assert_answer(r.call("foo", descriptor(("hello", "world"))), OK, status(OK))
    assert_answer(r.call("basic", descriptor(("key1", "foo"))), OK, status(OK, 50, SECOND, 49))
    assert r.counters().get("total_hits", "basic.key1") == 1

    room_in_window(60, 3)  # key2 is per minute; both loops below in one window
    value = fresh()
    for i in range(25):
        answer = r.call("another", descriptor(("key2", value)))
        code, remaining = (OVER, 0) if i >= 20 else (OK, 20 - (i + 1))
        assert_answer(answer, code, status(code, 20, MINUTE, remaining))
        counters = r.counters()
        assert counters.get("total_hits", "another.key2") == i + 1
        assert counters.get("over_limit", "another.key2") == max(0, i - 19)

    value = fresh()
    for i in range(15):
        answer = r.call("another", descriptor(("key2", value)), descriptor(("key3", value)))
        code = OVER if i >= 10 else OK
        remaining1 = 10 if i >= 10 and stop_increment else 20 - (i + 1)
        remaining2 = 0 if i >= 10 else 10 - (i + 1)
        assert_answer(
            answer, code, status(OK, 20, MINUTE, remaining1), status(code, 10, HOUR, remaining2)
        )
        counters = r.counters()
        assert counters.get("total_hits", "another.key2") == i + 26
        assert counters.get("over_limit", "another.key2") == 5
        assert counters.get("total_hits", "another.key3") == i + 1
        assert counters.get("over_limit", "another.key3") == max(0, i - 9)


@pytest.mark.parametrize("store", [*STORES, "redis-local-cache", "redis-per-second"])
def test_basic_base_config(
    stores: dict[str, Rls], store: str, per_second_redis: PrivateRedis
) -> None:
    """TestBasicConfig (WithoutPerSecondRedis, WithoutPerSecondRedisWithLocalCache,
    WithoutPerSecondRedisWithCachePrefix, WithPerSecondRedis): testBasicBaseConfig, the local
    cache's own stats aside (docs/ratelimit-compatibility.md)."""
    r = stores[store]
    replay_basic_base_config(r)
    if not r.prefix:
        return
    admin = redis.Redis.from_url(SHARED_REDIS)  # upstream's CACHE_KEY_PREFIX: every key under it
    fast = redis.Redis.from_url(per_second_redis.url)
    try:
        assert any(admin.scan_iter(f"{r.prefix}another_key2_*"))
        # basic's key1 is per second: in the per-second Redis when there is one. Its key lives
        # one second, long gone after the replay: charged again, then looked for at once.
        r.call("basic", descriptor(("key1", "foo")))
        split = store == "redis-per-second"
        assert any(fast.scan_iter(f"{r.prefix}basic_key1_*")) == split
        assert any(admin.scan_iter(f"{r.prefix}basic_key1_*")) != split
    finally:
        admin.close()
        fast.close()


def test_duration_until_reset_counts_down(stores: dict[str, Rls]) -> None:
    """testBasicBaseConfig's last step: the same day-long counter asked again later says less
    time is left (one sleep for every store)."""
    ask = descriptor(("key4", "durTest"))
    before = {name: r.call("another", ask) for name, r in stores.items()}
    time.sleep(1.05)  # whole seconds: one more second gone is one less
    for name, r in stores.items():
        after = r.call("another", ask).statuses[0].duration_until_reset.seconds
        assert after < before[name].statuses[0].duration_until_reset.seconds, name


@pytest.mark.parametrize("store", STORES)
def test_share_threshold(stores: dict[str, Rls], store: str) -> None:
    """TestShareThreshold (integration): values a share_threshold wildcard matches share one
    count of 10 an hour; those of a plain wildcard count apart."""
    r = stores[store]
    room_in_window(3600, 5)
    domain = "share-threshold-test"
    for _ in range(10):
        assert r.call(domain, descriptor(("files", "files/a.pdf"))).overall_code == OK
    shared = r.call(domain, descriptor(("files", "files/b.csv")))
    assert_answer(shared, OVER, status(OVER, 10, HOUR, 0))
    for _ in range(10):
        answer = r.call(domain, descriptor(("files_no_share", f"files_no_share/{fresh()}")))
        assert_answer(answer, OK, status(OK, 10, HOUR, 9))


# --- test/redis/fixed_cache_impl_test.go ------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize(
    ("key", "limit", "hits", "after", "split"),
    [
        # (over, near, within) of the request's `hits` that bring the count to `after`
        ("near10", 10, 1, 5, (0, 0, 1)),  # TestRedis, the first call
        ("near10", 10, 1, 11, (1, 0, 0)),  # TestRedis, the second call's limited descriptor
        ("near15", 15, 1, 11, (0, 0, 1)),  # TestNearLimit: under the near ratio
        ("near15", 15, 1, 13, (0, 1, 1)),  # at it, still OK
        ("near15", 15, 1, 16, (1, 0, 0)),  # over: near only counts below the limit
        ("near20", 20, 3, 5, (0, 0, 3)),  # hits_addend 3, all under near
        ("near8", 8, 2, 7, (0, 1, 2)),  # some over near
        ("near20", 20, 3, 19, (0, 3, 3)),  # all over near
        ("near20", 20, 3, 22, (2, 1, 0)),  # some over the limit
        ("near20", 20, 7, 22, (2, 4, 0)),  # some in all three
        ("near10", 10, 3, 30, (3, 0, 0)),  # all over the limit
    ],
)
def test_near_limit(
    stores: dict[str, Rls],
    store: str,
    key: str,
    limit: int,
    hits: int,
    after: int,
    split: tuple[int, int, int],
) -> None:
    """TestRedis and TestNearLimit: the status, and the request's hits split into over, near
    and within as upstream counts them (near: above floor(limit x 0.8))."""
    r = stores[store]
    value = fresh()
    if after > hits:
        r.ask(descriptor((key, value), hits=after - hits))  # what upstream's mock says was there
    before = r.counters()
    answer = r.ask(descriptor((key, value), hits=hits))
    code = OVER if after > limit else OK
    assert_answer(answer, code, status(code, limit, HOUR, max(0, limit - after)))
    stats_key = f"{r.domain}.{key}"
    delta = r.counters().since(before, stats_key)
    assert delta == (hits, *split)


@pytest.mark.parametrize("store", STORES)
def test_a_zero_hits_descriptor_over_its_limit_is_over_and_counts_nothing(
    stores: dict[str, Rls], store: str
) -> None:
    """TestRedis, its third call: per-descriptor hits_addend 0 on a counter already over its
    limit says OVER_LIMIT and counts no stat; the other descriptor's hit counts over."""
    r = stores[store]
    value = fresh()
    r.ask(
        descriptor(("key3", value), hits=11), descriptor(("key3", value), ("subkey3", "s"), hits=12)
    )
    before = r.counters()
    answer = r.ask(
        descriptor(("key3", value), hits=0), descriptor(("key3", value), ("subkey3", "s"), hits=1)
    )
    assert_answer(answer, OVER, status(OVER, 10, HOUR, 0), status(OVER, 10, DAY, 0))
    after = r.counters()
    for key, expected in (
        (f"{r.domain}.key3", (0, 0, 0, 0)),
        (f"{r.domain}.key3.subkey3", (1, 1, 0, 0)),
    ):
        assert after.since(before, key) == expected


@pytest.mark.parametrize("store", STORES)
def test_a_descriptor_without_a_limit_beside_one_over_it(
    stores: dict[str, Rls], store: str
) -> None:
    """TestRedis, its second call: a descriptor matching no limit (hits_addend 0) beside one
    over its limit: OK with no limit and the other OVER_LIMIT."""
    r = stores[store]
    value = fresh()
    room_in_window(60, 2)
    r.ask(descriptor(("key2", value), ("subkey2", "s"), hits=10))
    answer = r.ask(
        descriptor(("key2", value), hits=0), descriptor(("key2", value), ("subkey2", "s"), hits=1)
    )
    assert_answer(answer, OVER, status(OK), status(OVER, 10, MINUTE, 0))


@pytest.mark.parametrize("store", [*STORES, "redis-local-cache"])
@pytest.mark.parametrize("shadow", [False, True], ids=["enforced", "shadow"])
def test_over_limit_then_answered_again(stores: dict[str, Rls], store: str, shadow: bool) -> None:
    """TestOverLimitWithLocalCache and TestOverLimitWithLocalCacheShadowRule (and
    base_limiter_test's TestGetResponseStatusOverLimitWithLocalCache[ShadowMode]): 11, 13, 16 of
    15, then once more (from the local cache where there is one): OVER_LIMIT, or OK with the
    limit in shadow mode; every hit counted, over the limit in over_limit (and shadow_mode)."""
    r = stores[store]
    key, value = ("shadow15" if shadow else "near15"), fresh()
    stats_key = f"{r.domain}.{key}"
    before = r.counters()
    r.ask(descriptor((key, value), hits=10))
    answers = [r.ask(descriptor((key, value), hits=n)) for n in (1, 2, 3, 1)]
    over = OK if shadow else OVER
    assert [
        (a.overall_code, a.statuses[0].code, a.statuses[0].limit_remaining) for a in answers
    ] == [
        (OK, OK, 4),
        (OK, OK, 2),
        (over, over, 0),
        (over, over, 0),
    ]
    after = r.counters()
    delta = after.since(before, stats_key)
    # hits 17 = 10 + 1 + 2 + 3 + 1; over 2 (16 and 17); near 3 (13, then 14 and 15)
    assert delta == (17, 2, 3, 11 + 2)
    shadowed = after.get("shadow_mode", stats_key) - before.get("shadow_mode", stats_key)
    assert shadowed == (2 if shadow else 0)


# --- test/service/ratelimit_test.go -----------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
def test_unlimited(stores: dict[str, Rls], store: str) -> None:
    """TestUnlimited (and base_limiter_test's TestGetResponseStatusEmptyKey): a limited
    descriptor, one matching nothing (OK, remaining 0) and an unlimited one (OK, no limit,
    remaining 2^32-1) in one request; only the first is counted."""
    r = stores[store]
    value = fresh()
    room_in_window(60, 2)
    answer = r.ask(
        descriptor(("foo", value)), descriptor(("hello", "world")), descriptor(("baz", value))
    )
    assert_answer(
        answer, OK, status(OK, 10, MINUTE, 9), status(OK), status(OK, remaining=2**32 - 1)
    )


@pytest.mark.parametrize("store", STORES)
def test_rule_shadow_mode(stores: dict[str, Rls], store: str) -> None:
    """TestRuleShadowMode: two descriptors over limits in shadow mode: OK, each status OK."""
    r = stores[store]
    both = (descriptor(("shadow", fresh())), descriptor(("shadow", fresh())))
    r.ask(*both)
    assert_answer(r.ask(*both), OK, status(OK, 1, HOUR, 0), status(OK, 1, HOUR, 0))


@pytest.mark.parametrize("store", STORES)
def test_mixed_rule_shadow_mode(stores: dict[str, Rls], store: str) -> None:
    """TestMixedRuleShadowMode: over a shadowed limit (OK) and over an enforced one: OVER."""
    r = stores[store]
    both = (descriptor(("shadow", fresh())), descriptor(("regular", fresh())))
    r.ask(*both)
    assert_answer(r.ask(*both), OVER, status(OK, 1, HOUR, 0), status(OVER, 1, HOUR, 0))


@pytest.mark.parametrize("store", STORES)
def test_per_descriptor_quota_mode(stores: dict[str, Rls], store: str) -> None:
    """TestServiceMixedPerDescriptorModesUnderLimit, TestServicePerDescriptorQuotaMode and
    TestServiceMixedPerDescriptorModes: a rate limit over refuses whatever the quota says; the
    only quota-mode descriptor over refuses too; nothing over passes."""
    r = stores[store]
    regular, quota = descriptor(("regular", fresh())), descriptor(("quota", fresh()))
    assert_answer(r.ask(regular, quota), OK, status(OK, 1, HOUR, 0), status(OK, 3, HOUR, 2))
    assert_answer(r.ask(regular, quota), OVER, status(OVER, 1, HOUR, 0), status(OK, 3, HOUR, 1))
    regular3, quota1 = descriptor(("regular3", fresh())), descriptor(("quota1", fresh()))
    r.ask(regular3, quota1)
    assert_answer(r.ask(regular3, quota1), OVER, status(OK, 3, HOUR, 1), status(OVER, 1, HOUR, 0))


@pytest.mark.parametrize("store", STORES)
def test_quota_mode_all_or_some_over(stores: dict[str, Rls], store: str) -> None:
    """TestServiceQuotaModeOnlySomeOverTheLimit and …OnlyAllOverTheLimit: quota-mode
    descriptors refuse only when every one of them is over."""
    r = stores[store]
    small, large = descriptor(("quota1", fresh())), descriptor(("quota", fresh()))
    r.ask(small, large)
    assert_answer(r.ask(small, large), OK, status(OVER, 1, HOUR, 0), status(OK, 3, HOUR, 1))
    r.ask(large)
    assert_answer(r.ask(small, large), OVER, status(OVER, 1, HOUR, 0), status(OVER, 3, HOUR, 0))


# --- test/config/config_test.go: TestConfigLimitOverride, through the service ---------------


@pytest.mark.parametrize("store", STORES)
def test_an_override_counts_per_value_and_answers_its_own_limit(
    stores: dict[str, Rls], store: str
) -> None:
    """TestConfigLimitOverride: Envoy's override is the limit answered (unnamed), over a
    configured descriptor's; a changed override keeps counting the same counter (same unit);
    another value counts apart."""
    r = stores[store]
    entries = (("key1", "value1"), ("subkey1", fresh()))

    def overridden(count: int, *entries: tuple[str, str]) -> common.RateLimitDescriptor:
        d = descriptor(*entries)
        d.limit.CopyFrom(
            common.RateLimitDescriptor.RateLimitOverride(requests_per_unit=count, unit=HOUR)
        )
        return d

    codes = [r.ask(overridden(2, *entries)).overall_code for _ in range(3)]
    assert codes == [OK, OK, OVER]
    assert_answer(r.ask(overridden(5, *entries)), OK, status(OK, 5, HOUR, 1))
    other = (("key1", "value1"), ("subkey1", fresh()))
    assert_answer(r.ask(overridden(2, *other)), OK, status(OK, 2, HOUR, 1))


# --- environment switches: SHADOW_MODE, QUOTA_MODE with RESPONSE_DYNAMIC_METADATA, headers ---

SWITCHED = """
domain: {domain}
descriptors:
  - key: foo
    rate_limit: {{unit: minute, requests_per_unit: 10}}
  - key: regular
    rate_limit: {{unit: hour, requests_per_unit: 10}}
    metadata: {{name: service_1}}
  - key: quota
    quota_mode: true
    rate_limit: {{unit: hour, requests_per_unit: 1}}
    metadata: {{name: service_2}}
  - key: other
    quota_mode: true
    rate_limit: {{unit: hour, requests_per_unit: 5}}
    metadata: {{some_other_name: service_2}}
  - key: same
    rate_limit: {{unit: hour, requests_per_unit: 5}}
    metadata: {{name: service_2}}
"""


@pytest.fixture(scope="module")
def switched(sup: tuple[Supervisor, Path]) -> Iterator[dict[str, Rls]]:
    supervisor, tmp = sup
    envs = {
        "shadow": {"SHADOW_MODE": "true"},
        "quota": {"QUOTA_MODE": "true", "RESPONSE_DYNAMIC_METADATA": "true"},
        "headers": {
            "LIMIT_RESPONSE_HEADERS_ENABLED": "true",
            "LIMIT_LIMIT_HEADER": "A-Ratelimit-Limit",
            "LIMIT_REMAINING_HEADER": "A-Ratelimit-Remaining",
            "LIMIT_RESET_HEADER": "A-Ratelimit-Reset",
        },
    }
    running = {
        name: Rls(Service(supervisor, tmp, env=env, config_text=SWITCHED))
        for name, env in envs.items()
    }
    yield running
    for service in running.values():
        service.close()


def test_global_shadow_mode(switched: dict[str, Rls]) -> None:
    """TestServiceGlobalShadowMode, TestServiceQuotaModeWithShadowMode and
    TestServiceMixedModeWithShadowMode: SHADOW_MODE answers OK, each status as it is."""
    r = switched["shadow"]
    room_in_window(60, 2)
    pairs = [
        (descriptor(("foo", fresh()), hits=11), descriptor(("hello", "world"))),
        (descriptor(("quota", fresh()), hits=2), descriptor(("quota", fresh()), hits=2)),
        (descriptor(("regular", fresh()), hits=11), descriptor(("quota", fresh()), hits=2)),
    ]
    foo, both_quota, mixed = (r.ask(*pair) for pair in pairs)
    assert_answer(foo, OK, status(OVER, 10, MINUTE, 0), status(OK))
    assert_answer(both_quota, OK, status(OVER, 1, HOUR, 0), status(OVER, 1, HOUR, 0))
    assert_answer(mixed, OK, status(OVER, 10, HOUR, 0), status(OVER, 1, HOUR, 0))


def metadata_of(answer: rls_pb2.RateLimitResponse) -> dict[str, Any]:
    return json_format.MessageToDict(answer.dynamic_metadata).get("metadata", {})


def test_global_quota_mode_and_the_metadata_of_passed_descriptors(
    switched: dict[str, Rls],
) -> None:
    """TestServiceGlobalQuotaMode, TestMetadataReturnedForPassedDescriptors,
    TestMetadataReturnedForAllPassedDescriptors, TestOverlappingMetadataReturnsTheFirstValue:
    with QUOTA_MODE every descriptor is a quota (all over: OVER_LIMIT); the dynamic metadata
    merges the metadata of the limits that passed, the first descriptor's value winning."""
    r = switched["quota"]
    spent = (descriptor(("quota", fresh()), hits=2), descriptor(("quota", fresh()), hits=2))
    assert_answer_codes(r.ask(*spent), OVER, [OVER, OVER])

    passed = r.ask(descriptor(("regular", fresh())), descriptor(("quota", fresh()), hits=2))
    assert_answer_codes(passed, OK, [OK, OVER])
    assert metadata_of(passed) == {"name": "service_1"}

    both = r.ask(descriptor(("regular", fresh())), descriptor(("other", fresh())))
    assert_answer_codes(both, OK, [OK, OK])
    assert metadata_of(both) == {"name": "service_1", "some_other_name": "service_2"}

    overlapping = r.ask(descriptor(("regular", fresh())), descriptor(("same", fresh())))
    assert metadata_of(overlapping) == {"name": "service_1"}


def assert_answer_codes(answer: rls_pb2.RateLimitResponse, code: int, codes: list[int]) -> None:
    assert (answer.overall_code, [s.code for s in answer.statuses]) == (code, codes)


def test_custom_rate_limit_headers(switched: dict[str, Rls]) -> None:
    """TestServiceWithCustomRatelimitHeaders: LIMIT_*_HEADER name the three headers; they
    describe the descriptor over its limit (the count alone, 0 left, whole seconds to its
    window's end)."""
    r = switched["headers"]
    room_in_window(60, 2)
    value = fresh()
    r.ask(descriptor(("foo", value), hits=10))
    answer = r.ask(descriptor(("foo", value)), descriptor(("hello", "world")))
    reset = answer.statuses[0].duration_until_reset.seconds
    assert answer.overall_code == OVER and 1 <= reset <= 60
    assert [(h.key, h.value) for h in answer.response_headers_to_add] == [
        ("A-Ratelimit-Limit", "10"),
        ("A-Ratelimit-Remaining", "0"),
        ("A-Ratelimit-Reset", str(reset)),
    ]


# --- configuration reloads: files (upstream's runtime layout) and xDS --------------------------


def reloads(scraper: httpx.Client) -> tuple[float, float]:
    text = scraper.get("/metrics").text
    return (
        sample(text, "arks_ratelimit_config_reloads_total") or 0.0,
        sample(text, "arks_ratelimit_config_errors_total") or 0.0,
    )


def test_config_reload_from_upstreams_runtime_layout(tmp_path: Path) -> None:
    """TestBasicReloadConfig (BasicWithoutWatchRoot, ReloadWithoutWatchRoot: testConfigReload
    with RUNTIME_WATCH_ROOT=false), TestService (a failed reload keeps the configuration) and
    TestServiceHealthStatusAtLeastOneConfigLoaded (a configuration without domains is
    unhealthy, one with a domain healthy again)."""
    runtime = tmp_path / "runtime" / "current"
    shutil.copytree(RUNTIME, runtime / "ratelimit")
    config = runtime / "ratelimit" / "config"
    ports = {name: free_port() for name in ("PORT", "DEBUG_PORT", "GRPC_PORT")}
    env = {
        **{name: str(port) for name, port in ports.items()},
        "GRPC_HOST": "127.0.0.1",
        "RUNTIME_ROOT": str(runtime),
        "RUNTIME_SUBDIRECTORY": "ratelimit",
        "RUNTIME_WATCH_ROOT": "false",
        "HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED": "true",
    }
    metrics_port = free_port()
    with (
        Supervisor(log_dir=tmp_path / "logs") as sup,
        httpx.Client(base_url=f"http://127.0.0.1:{metrics_port}") as scraper,
    ):
        child = sup.python("ratelimit", "ratelimit", "--metrics-port", str(metrics_port), env=env)
        wait_http(child, f"http://127.0.0.1:{ports['PORT']}/healthcheck")
        with grpc.insecure_channel(f"127.0.0.1:{ports['GRPC_PORT']}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)

            def call(domain: str, *entries: tuple[str, str]) -> rls_pb2.RateLimitResponse:
                request = rls_pb2.RateLimitRequest(
                    domain=domain, descriptors=[descriptor(*entries)]
                )
                return stub.ShouldRateLimit(request, timeout=5)

            def changed(before: tuple[float, float], index: int) -> tuple[float, float]:
                return wait_for(lambda: reloads(scraper), lambda now: now[index] > before[index])

            def health() -> tuple[int, int]:
                http = httpx.get(f"http://127.0.0.1:{ports['PORT']}/healthcheck").status_code
                ask = health_pb2.HealthCheckRequest(service="ratelimit")
                return http, health_pb2_grpc.HealthStub(channel).Check(ask, timeout=5).status

            assert_answer(call("reload", ("block", "foo")), OK, status(OK))
            counts = reloads(scraper)
            shutil.copy(runtime / "ratelimit" / "reload.yaml", tmp_path / "reload.yaml")
            (tmp_path / "reload.yaml").rename(config / "reload.yaml")  # whole, at once
            counts = changed(counts, 0)
            assert_answer(call("reload", ("key1", "foo")), OK, status(OK, 50, SECOND, 49))
            (config / "reload.yaml").unlink()  # a file removed is a reload too
            counts = changed(counts, 0)
            assert_answer(call("reload", ("key1", "foo")), OK, status(OK))

            # A broken file first: whatever a reload catches of the moves is refused.
            (config / "broken.yaml").write_text("domain: broken\ndescriptors: [a]\n")
            aside = tmp_path / "aside"
            aside.mkdir()
            for file in config.iterdir():
                if file.name != "broken.yaml":
                    file.rename(aside / file.name)
            counts = changed(counts, 1)  # refused: the last good configuration stays
            assert (
                call("basic", ("one_per_minute", "x")).statuses[0].current_limit.requests_per_unit
                == 1
            )
            assert health() == (200, SERVING)
            (config / "broken.yaml").unlink()  # no file left: no domain
            counts = changed(counts, 0)
            assert wait_for(health, lambda h: h == (500, NOT_SERVING))
            for file in aside.iterdir():
                file.rename(config / file.name)
            changed(counts, 0)
            assert wait_for(health, lambda h: h == (200, SERVING))


def resource(path: Path) -> rls.RateLimitConfig:
    """An upstream runtime file as the RateLimitConfig upstream's xDS test serves (its
    xds_sotw_integration_test.go's initial and reload snapshots are these files)."""
    document = yaml.safe_load(path.read_text())

    def descriptors(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for item in items:
            item = dict(item)
            if "rate_limit" in item:
                item["rate_limit"] = {
                    **item["rate_limit"],
                    "unit": item["rate_limit"]["unit"].upper(),
                }
            if "descriptors" in item:
                item["descriptors"] = descriptors(item["descriptors"])
            out.append(item)
        return out

    message = {"name": document["domain"], "domain": document["domain"]}
    message["descriptors"] = descriptors(document["descriptors"])
    return json_format.ParseDict(message, rls.RateLimitConfig())


def test_basic_config_and_reload_over_xds(tmp_path: Path) -> None:
    """TestXdsProviderBasicConfig (testBasicBaseConfig with the limits from an xDS server) and
    TestXdsProviderBasicConfigReload (testConfigReload: a snapshot adding the reload domain,
    then one without it)."""
    initial = [resource(RUNTIME / "config" / f"{name}.yaml") for name in ("basic", "another")]
    reload = resource(RUNTIME / "reload.yaml")
    plane = ControlPlane(SnapshotCache())
    plane.start()
    prefix = f"replay-{fresh()}:"
    node = "init-test-node"
    try:
        plane.cache.set(snapshot("1", *initial), node_id=node)
        with Supervisor(log_dir=tmp_path / "logs") as sup:
            svc = Service(
                sup,
                tmp_path,
                "--config-type",
                "grpc-xds-sotw",
                "--config-xds-server",
                f"127.0.0.1:{plane.port}",
                "--config-xds-node-id",
                node,
                "--config-xds-retry-interval",
                RETRY,
                env=on_redis(prefix),
            )
            r = Rls(svc, prefix)
            try:
                wait_for(lambda: reloads(r.scraper), lambda n: n[0] >= 1)
                replay_basic_base_config(r)

                assert_answer(r.call("reload", descriptor(("block", "foo"))), OK, status(OK))
                plane.cache.set(snapshot("2", *initial, reload), node_id=node)
                wait_for(lambda: reloads(r.scraper), lambda n: n[0] >= 2)
                answer = r.call("reload", descriptor(("key1", "foo")))
                assert_answer(answer, OK, status(OK, 50, SECOND, 49))
                plane.cache.set(snapshot("3", *initial), node_id=node)
                wait_for(lambda: reloads(r.scraper), lambda n: n[0] >= 3)
                assert_answer(r.call("reload", descriptor(("key1", "foo"))), OK, status(OK))
            finally:
                r.close()
    finally:
        plane.close()
        forget(prefix)


# --- Redis over TLS, with a password and a client certificate ---------------------------------


def test_basic_config_on_a_tls_redis_with_a_password_and_a_client_certificate(
    tmp_path: Path,
) -> None:
    """TestBasicTLSConfig (WithoutPerSecondRedisTLS, …WithClientCert) and TestBasicAuthConfig
    (WithoutPerSecondRedisAuth): testBasicBaseConfig on a Redis that speaks only TLS, asks for
    REDIS_AUTH's password and verifies the client certificate of REDIS_TLS_CLIENT_CERT."""
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = authority(certs)
    server_crt, server_key = issue(
        certs, ca, "redis", "localhost", ("DNS:localhost", "IP:127.0.0.1")
    )
    client_crt, client_key = issue(certs, ca, "client", "ratelimit")
    port = free_port()
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        server = sup.start(
            "redis-tls",
            [
                "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                "--tls-cert-file", str(server_crt), "--tls-key-file", str(server_key),
                "--tls-ca-cert-file", str(ca["ca.crt"]), "--tls-auth-clients", "yes",
                "--requirepass", "password123", "--save", "", "--appendonly", "no",
            ],
        )  # fmt: skip
        wait_port(server, port)
        env = {
            "REDIS_SOCKET_TYPE": "tcp",
            "REDIS_URL": f"localhost:{port}",
            "REDIS_TLS": "true",
            "REDIS_AUTH": "password123",
            "REDIS_TLS_CACERT": str(ca["ca.crt"]),
            "REDIS_TLS_CLIENT_CERT": str(client_crt),
            "REDIS_TLS_CLIENT_KEY": str(client_key),
        }
        r = start(sup, tmp_path, env=env)
        try:
            replay_basic_base_config(r)
        finally:
            r.close()


# STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT: an uncharged descriptor says what is left ---------------


@pytest.fixture(scope="module")
def stopping(sup: tuple[Supervisor, Path]) -> Iterator[dict[str, Rls]]:
    supervisor, tmp = sup
    prefix, stop = f"replay-{fresh()}:", {"STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT": "true"}
    running = {
        "memory": start(supervisor, tmp, env=stop),
        "redis": start(supervisor, tmp, env=on_redis(prefix, **stop), prefix=prefix),
    }
    yield running
    for service in running.values():
        service.close()
    forget(prefix)


@pytest.mark.parametrize("store", STORES)
def test_basic_base_config_stopping_increments(stopping: dict[str, Rls], store: str) -> None:
    """TestBasicConfig, …WithstopCacheKeyIncrementWhenOverlimitConfig: once key3 refuses, key2
    is not charged and says so (10 left, as before the refusal)."""
    replay_basic_base_config(stopping[store], stop_increment=True)


@pytest.mark.parametrize("store", STORES)
def test_over_limit_with_stop_cache_key_increment(stopping: dict[str, Rls], store: str) -> None:
    """TestOverLimitWithStopCacheKeyIncrementWhenOverlimitConfig: limits of 15 and 14 at 13; 2
    more hits each take the second over: it refuses, and the first, not charged, says 2 left."""
    r = stopping[store]
    a, b = ("near15", fresh()), ("stop14", fresh())
    r.ask(descriptor(a, hits=13), descriptor(b, hits=13))
    answer = r.ask(descriptor(a, hits=2), descriptor(b, hits=2))
    assert_answer(answer, OVER, status(OK, 15, HOUR, 2), status(OVER, 14, HOUR, 0))


# Health: unhealthy until Redis has answered -------------------------------------------------


def test_unhealthy_until_redis_has_answered(tmp_path: Path) -> None:
    """TestHealthCheck, TestGrpcHealthCheck: Redis starts unhealthy until the connection is
    confirmed: a service whose Redis never answers is never healthy, from its first answer."""
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(sup, tmp_path, "--redis", f"redis://127.0.0.1:{free_port()}/0")
        try:
            http = httpx.get(f"http://127.0.0.1:{svc.http_port}/healthcheck").status_code
            ask = health_pb2.HealthCheckRequest(service="ratelimit")
            grpc_health = health_pb2_grpc.HealthStub(svc.channel).Check(ask, timeout=5).status
            assert (http, grpc_health) == (500, NOT_SERVING)
        finally:
            svc.channel.close()
