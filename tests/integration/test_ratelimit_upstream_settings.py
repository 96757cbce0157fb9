"""Upstream's settings that change what a deployment sees from outside, on the real
`python -m ratelimit`: its Prometheus series names (USE_PROMETHEUS, read by a real Prometheus as
Envoy Gateway's end-to-end test queries them), its gRPC connection age
(GRPC_MAX_CONNECTION_AGE), its keys' expiration jitter (EXPIRATION_JITTER_MAX_SECONDS) and its
per-second Redis (REDIS_PERSECOND)."""

from __future__ import annotations

import socket
import struct
import time
import uuid
from pathlib import Path

import redis

from arks.prometheus_config import service_job
from launcher.procs import Supervisor
from tests.integration.test_ratelimit_service import OK, OVER, Service, descriptor
from tests.support.exposition import sample
from tests.support.prometheus import Prometheus
from tests.support.redis_server import PrivateRedis

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_upstreams_series_names_are_served_with_use_prometheus(tmp_path: Path) -> None:
    """With USE_PROMETHEUS=true the limits' stats are also served under upstream's names and
    labels (statsd_exporter's default mapping: domain, key1, key2), scraped by a real Prometheus
    and queried as Envoy Gateway's e2e test queries them."""
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(sup, tmp_path, env={"USE_PROMETHEUS": "true"})
        codes = [svc.ask(descriptor(("user", "alice"))).overall_code for _ in range(4)]
        deeper = svc.ask(descriptor(("user", "bob"), ("model", "m"))).overall_code
        prom = Prometheus.start_jobs(
            sup, tmp_path / "prom", [service_job("ratelimit", [f"127.0.0.1:{svc.metrics_port}"])]
        )
        prom.wait_up(1)
        prom.wait_scrapes(1)

        def value(expr: str) -> float | None:
            found = prom.query(expr)
            assert len(found) <= 1, found
            return found[0][1] if found else None

        d = svc.domain
        over = value(f'ratelimit_service_rate_limit_over_limit{{domain="{d}",key1="user",key2=""}}')
        hits = value(f'ratelimit_service_rate_limit_total_hits{{domain="{d}",key1="user",key2=""}}')
        within = value(
            f'ratelimit_service_rate_limit_within_limit{{domain="{d}",key1="user",key2=""}}'
        )
        nested = value(
            f'ratelimit_service_rate_limit_total_hits{{domain="{d}",key1="user",key2="model"}}'
        )
        calls = value('ratelimit_service_total_requests{grpc_method="ShouldRateLimit"}')
        timed = value(
            'ratelimit_service_response_time_seconds_count{grpc_method="ShouldRateLimit"}'
        )
        loaded = value("ratelimit_service_config_load_error")
        ours = value(f'arks_ratelimit_over_limit_total{{domain="{d}",key="{d}.user"}}')
        svc.channel.close()
    assert codes == [OK, OK, OK, OVER] and deeper == OK
    assert (over, hits, nested, calls, timed, loaded, ours) == (1, 4, 1, 5, 5, 0, 1)
    assert within is not None and within < 4  # the near-limit hits are counted apart


def test_upstreams_series_names_are_off_without_use_prometheus_and_on_when_asked(
    tmp_path: Path,
) -> None:
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        plain = Service(sup, tmp_path)
        asked = Service(sup, tmp_path, "--upstream-stat-names")
        for svc in (plain, asked):
            svc.ask(descriptor(("user", "alice")))
        texts = [svc.metrics() for svc in (plain, asked)]
        for svc in (plain, asked):
            svc.channel.close()
    assert "ratelimit_service_" not in texts[0]
    hits = "ratelimit_service_rate_limit_total_hits"
    assert sample(texts[1], hits, domain=asked.domain, key1="user") == 1


def _goaway_after(port: int, timeout_s: float) -> float | None:
    """Seconds until the server sends an HTTP/2 GOAWAY on an idle connection (None: not within
    `timeout_s`)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        buffer = b""
        while time.monotonic() - started < timeout_s:
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                return None
            buffer += chunk
            while len(buffer) >= 9:
                length = struct.unpack(">I", b"\x00" + buffer[:3])[0]
                kind = buffer[3]
                if len(buffer) < 9 + length:
                    break
                if kind == 0x7:  # GOAWAY
                    return time.monotonic() - started
                if kind == 0x4 and not buffer[4] & 0x1:  # the server's SETTINGS: acknowledge
                    conn.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
                buffer = buffer[9 + length :]
    return None


def test_a_connection_is_sent_goaway_after_grpc_max_connection_age(tmp_path: Path) -> None:
    """GRPC_MAX_CONNECTION_AGE=1s (upstream's variable, Go duration): an idle connection gets
    its GOAWAY after about a second (gRPC adds +/-10 %), and none by default (24h)."""
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        aged = Service(
            sup,
            tmp_path,
            env={"GRPC_MAX_CONNECTION_AGE": "1s", "GRPC_MAX_CONNECTION_AGE_GRACE": "500ms"},
        )
        default = Service(sup, tmp_path)
        assert aged.ask(descriptor(("user", "alice"))).overall_code == OK
        after = _goaway_after(aged.port, timeout_s=5.0)
        never = _goaway_after(default.port, timeout_s=2.0)
        for svc in (aged, default):
            svc.channel.close()
    assert after is not None and 0.8 <= after <= 3.0, after
    assert never is None


def test_expiration_jitter_lengthens_each_new_keys_life_by_a_random_amount(
    tmp_path: Path,
) -> None:
    """EXPIRATION_JITTER_MAX_SECONDS=1000: a fixed window's new key lives its minute plus a
    random 0-1000 s (as upstream: [0, max)); without it, the minute alone."""
    prefixes = [f"jitter-{uuid.uuid4().hex[:6]}:", f"plain-{uuid.uuid4().hex[:6]}:"]
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with Supervisor(log_dir=tmp_path / "logs") as sup:
            jittered = Service(
                sup,
                tmp_path,
                "--redis",
                REDIS_URL,
                "--key-prefix",
                prefixes[0],
                env={"EXPIRATION_JITTER_MAX_SECONDS": "1000"},
            )
            plain = Service(sup, tmp_path, "--redis", REDIS_URL, "--key-prefix", prefixes[1])
            for svc in (jittered, plain):
                for user in range(20):
                    assert svc.ask(descriptor(("user", f"u{user}"))).overall_code == OK
                svc.channel.close()
        ttls = [
            [client.ttl(key) for key in client.scan_iter(match=f"{prefix}*")] for prefix in prefixes
        ]
    finally:
        for prefix in prefixes:
            for key in client.scan_iter(match=f"{prefix}*"):
                client.delete(key)
        client.close()
    assert len(ttls[0]) == len(ttls[1]) == 20
    assert all(0 < ttl <= 60 + 1000 for ttl in ttls[0]) and max(ttls[0]) > 60
    assert len(set(ttls[0])) > 1  # a random amount per key, not one for all
    assert all(0 < ttl <= 60 for ttl in ttls[1])


PER_SECOND_CONFIG = """
domain: {domain}
descriptors:
  - key: rps
    rate_limit: {{unit: second, requests_per_unit: 5}}
  - key: rpm
    rate_limit: {{unit: minute, requests_per_unit: 1}}
"""


def test_redis_persecond_keeps_per_second_counters_in_their_own_redis(
    tmp_path: Path, private_redis: PrivateRedis
) -> None:
    """Upstream's REDIS_PERSECOND env block: the per-second limit counts in REDIS_PERSECOND_URL's
    Redis, the minute's in REDIS_URL's; with STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT a request
    the minute refuses charges the second nothing, across the two servers."""
    prefix = f"persecond-{uuid.uuid4().hex[:6]}:"
    env = {
        "REDIS_SOCKET_TYPE": "tcp",
        "REDIS_URL": "127.0.0.1:6379",
        "REDIS_PERSECOND": "true",
        "REDIS_PERSECOND_SOCKET_TYPE": "tcp",
        "REDIS_PERSECOND_URL": f"127.0.0.1:{private_redis.port}",
        "CACHE_KEY_PREFIX": prefix,
        "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT": "true",
    }
    main = redis.Redis.from_url(REDIS_URL)
    fast = redis.Redis.from_url(private_redis.url)
    try:
        with Supervisor(log_dir=tmp_path / "logs") as sup:
            svc = Service(sup, tmp_path, env=env, config_text=PER_SECOND_CONFIG)
            both = (descriptor(("rps", "a")), descriptor(("rpm", "a")))
            codes = [svc.ask(*both).overall_code for _ in range(3)]
            svc.channel.close()

        def counts(client: redis.Redis) -> dict[str, int]:
            return {
                key.decode().split(":", 1)[1]: int(client.get(key))
                for key in client.scan_iter(match=f"{prefix}*")
            }

        in_main, in_fast = counts(main), counts(fast)
    finally:
        for key in main.scan_iter(match=f"{prefix}*"):
            main.delete(key)
        main.close()
        fast.close()
    assert codes == [OK, OVER, OVER]
    assert all("rpm" in key for key in in_main) and sum(in_main.values()) == 1
    assert in_fast and all("rps" in key for key in in_fast)
    assert sum(in_fast.values()) == 1  # the refused requests charged the second nothing


def test_envoy_gateways_prometheus_settings_and_its_mapping_file(tmp_path: Path) -> None:
    """What Envoy Gateway sets with its rate-limit telemetry on: USE_PROMETHEUS, PROMETHEUS_ADDR,
    PROMETHEUS_MAPPER_YAML (its statsd-exporter ConfigMap, mounted optional) and
    FORCE_START_WITHOUT_INITIAL_CONFIG. The service starts, and names the series by the file's
    rules; a file that is not there (the optional ConfigMap absent) leaves no rule, as upstream:
    every series under its escaped statsd name."""
    rules = tmp_path / "conf.yaml"
    env = {
        "USE_PROMETHEUS": "true",
        "PROMETHEUS_ADDR": "127.0.0.1:19001",  # the port is the test's (--metrics-port)
        "PROMETHEUS_MAPPER_YAML": str(rules),
        "FORCE_START_WITHOUT_INITIAL_CONFIG": "true",
        "USE_STATSD": "false",
    }
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(sup, tmp_path, env={**env, "PROMETHEUS_MAPPER_YAML": str(tmp_path / "none")})
        rules.write_text(
            "mappings:\n"
            "  - match: 'ratelimit\\.service\\.rate_limit\\.test-[^.]*\\.user\\.(.*)'\n"
            "    match_type: regex\n"
            "    name: ratelimit_service_rate_limit_${1}\n"
            "    labels: {ratelimit_policy_name: per-user, ratelimit_policy_namespace: default}\n"
        )
        mapped = Service(sup, tmp_path, env=env)
        for service in (svc, mapped):
            for _ in range(4):
                service.ask(descriptor(("user", "alice")))
        escaped, named = svc.metrics(), mapped.metrics()
        for service in (svc, mapped):
            service.channel.close()
    policy = {"ratelimit_policy_name": "per-user", "ratelimit_policy_namespace": "default"}
    assert sample(named, "ratelimit_service_rate_limit_over_limit", **policy) == 1
    assert sample(named, "ratelimit_service_rate_limit_total_hits", **policy) == 4
    assert (
        sample(
            escaped, f"ratelimit_service_rate_limit_{svc.domain.replace('-', '_')}_user_over_limit"
        )
        == 1
    )
