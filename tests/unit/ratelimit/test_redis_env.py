"""envoyproxy/ratelimit's Redis environment variables, read as our settings."""

from __future__ import annotations

import pytest

from arks.adapters.redis.client import Tls, target
from ratelimit.environment import EnvError, go_duration
from ratelimit.redis_env import RedisEnv, redis_env, redis_url


def test_nothing_set_is_nothing_said() -> None:
    assert redis_env({}) == RedisEnv()


@pytest.mark.parametrize(
    ("url", "kind", "socket", "tls", "ours"),
    [
        ("redis:6379", "SINGLE", "tcp", False, "redis://redis:6379"),
        ("redis:6379", "single", "tcp", True, "rediss://redis:6379"),
        ("/var/run/nutcracker/ratelimit.sock", "SINGLE", "unix", False,
         "unix:///var/run/nutcracker/ratelimit.sock"),
        ("a:7000,b:7001", "CLUSTER", "tcp", False, "redis+cluster://a:7000,b:7001"),
        ("a:7000", "cluster", "unix", True, "rediss+cluster://a:7000"),
        ("mymaster,s1:26379,s2:26379", "SENTINEL", "tcp", False,
         "redis+sentinel://s1:26379,s2:26379/mymaster"),
        ("redis://already:1/2", "CLUSTER", "tcp", False, "redis://already:1/2"),
    ],
)  # fmt: skip
def test_upstreams_url_by_type_is_ours(
    url: str, kind: str, socket: str, tls: bool, ours: str
) -> None:
    assert redis_url(url, kind, socket, tls) == ours
    target(ours)  # and ours parses


def test_envoy_gateways_env_block() -> None:
    """What Envoy Gateway's rate-limit Deployment sets (internal/infrastructure/kubernetes/
    ratelimit/resource.go): a TCP Redis, its TLS, and a plain password."""
    env = redis_env(
        {
            "REDIS_SOCKET_TYPE": "tcp",
            "REDIS_URL": "redis.redis-system.svc.cluster.local:6379",
            "REDIS_TLS": "true",
            "REDIS_TLS_CACERT": "/redis-certs/ca.crt",
            "REDIS_TLS_CLIENT_CERT": "/redis-certs/tls.crt",
            "REDIS_TLS_CLIENT_KEY": "/redis-certs/tls.key",
            "REDIS_AUTH": "s3cret",
        }
    )
    assert env.url == "rediss://redis.redis-system.svc.cluster.local:6379"
    assert env.tls == Tls("/redis-certs/ca.crt", "/redis-certs/tls.crt", "/redis-certs/tls.key")
    assert (env.username, env.password) == (None, "s3cret")
    assert "s3cret" not in repr(env)


def test_auth_user_password_sentinel_auth_pool_timeout_prefix_and_stop_increment() -> None:
    env = redis_env(
        {
            "REDIS_TYPE": "sentinel",
            "REDIS_URL": "m,s:26379",
            "REDIS_AUTH": "user:pa:ss",
            "REDIS_SENTINEL_AUTH": "sentinel-pw",
            "REDIS_POOL_SIZE": "20",
            "REDIS_TIMEOUT": "1m30.5s",
            "CACHE_KEY_PREFIX": "",
            "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT": "true",
            "EXPIRATION_JITTER_MAX_SECONDS": "300",
            "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION": "true",  # without REDIS_TLS: nothing
        }
    )
    assert env.url == "redis+sentinel://s:26379/m"
    assert (env.username, env.password, env.sentinel_password) == ("user", "pa:ss", "sentinel-pw")
    assert (env.pool_size, env.timeout_s, env.tls) == (20, 90.5, None)
    assert env.key_prefix == "", "set, even empty, replaces our prefix"
    assert env.stop_increment_when_over
    assert env.expiry_jitter_s == 300


def test_sentinel_auth_is_read_as_upstream_reads_it_user_and_password() -> None:
    """driver_impl.go's createDialer cuts REDIS_SENTINEL_AUTH at its first colon, as
    REDIS_AUTH."""
    env = redis_env({"REDIS_SENTINEL_AUTH": "watcher:pa:ss"})
    assert (env.sentinel_username, env.sentinel_password) == ("watcher", "pa:ss")
    assert "pa:ss" not in repr(env)


def test_a_zero_timeout_upstreams_none_keeps_our_default() -> None:
    """Upstream's REDIS_TIMEOUT=0 sets no deadline; ours would time every call out at once."""
    assert redis_env({"REDIS_TIMEOUT": "0"}).timeout_s is None
    assert redis_env({"REDIS_TIMEOUT": "0s"}).timeout_s is None


def test_skipping_the_hostname_check_keeps_the_chain_checked() -> None:
    env = redis_env(
        {"REDIS_URL": "r:6379", "REDIS_SOCKET_TYPE": "tcp", "REDIS_TLS": "1",
         "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION": "1"}
    )  # fmt: skip
    assert env.tls == Tls(check_hostname=False)


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"BACKEND_TYPE": "memcache"}, "BACKEND_TYPE"),
        ({"REDIS_PERSECOND": "true"}, "REDIS_PERSECOND_URL"),
        (
            {"REDIS_PERSECOND": "1", "REDIS_PERSECOND_URL": "r:1", "REDIS_PERSECOND_TYPE": "x"},
            "REDIS_PERSECOND_TYPE",
        ),
        (
            {
                "REDIS_PERSECOND": "1",
                "REDIS_PERSECOND_URL": "r:1",
                "REDIS_PERSECOND_POOL_ON_EMPTY_BEHAVIOR": "CREATE",
            },
            "REDIS_PERSECOND_POOL_ON_EMPTY_BEHAVIOR",
        ),
        ({"REDIS_PERSECOND": "maybe"}, "REDIS_PERSECOND"),
        ({"REDIS_POOL_ON_EMPTY_BEHAVIOR": "ERROR"}, "REDIS_POOL_ON_EMPTY_BEHAVIOR"),
        ({"REDIS_URL": "r:1", "REDIS_TYPE": "twemproxy"}, "REDIS_TYPE"),
        ({"REDIS_URL": "r:1", "REDIS_SOCKET_TYPE": "udp"}, "REDIS_SOCKET_TYPE"),
        ({"REDIS_URL": "just-a-master", "REDIS_TYPE": "sentinel"}, "REDIS_TYPE=sentinel"),
        ({"REDIS_TIMEOUT": "10"}, "REDIS_TIMEOUT"),
        ({"REDIS_POOL_SIZE": "-1"}, "REDIS_POOL_SIZE"),
        ({"LOCAL_CACHE_SIZE_IN_BYTES": "-1"}, "LOCAL_CACHE_SIZE_IN_BYTES"),
        ({"LOCAL_CACHE_SIZE_IN_BYTES": "1MB"}, "LOCAL_CACHE_SIZE_IN_BYTES"),
        ({"EXPIRATION_JITTER_MAX_SECONDS": "-5"}, "EXPIRATION_JITTER_MAX_SECONDS"),
        ({"EXPIRATION_JITTER_MAX_SECONDS": "5m"}, "EXPIRATION_JITTER_MAX_SECONDS"),
        ({"REDIS_TLS": "true", "REDIS_TLS_CLIENT_CERT": "/c"}, "REDIS_TLS_CLIENT_KEY"),
    ],
)
def test_what_cannot_be_honoured_is_refused_by_name(environ: dict[str, str], named: str) -> None:
    with pytest.raises(EnvError, match=named):
        redis_env(environ)


def test_go_durations() -> None:
    assert go_duration("X", "0") == 0
    assert go_duration("X", "250ms") == pytest.approx(0.25)
    assert go_duration("X", "1h2m3s") == 3723
    assert go_duration("X", "1.5us") == pytest.approx(1.5e-6)
    for bad in ("", "s", "1x", "1s2"):
        with pytest.raises(EnvError, match="X"):
            go_duration("X", bad)


def test_the_per_second_redis_has_its_own_connection_settings() -> None:
    """REDIS_PERSECOND=true: REDIS_PERSECOND_URL under its own _TYPE, _SOCKET_TYPE, _AUTH,
    _SENTINEL_AUTH, _POOL_SIZE, _TIMEOUT and _TLS (the TLS files are REDIS_TLS_*'s, shared, as
    upstream's); the main Redis's are not changed by them."""
    env = redis_env(
        {
            "REDIS_SOCKET_TYPE": "tcp",
            "REDIS_URL": "main:6379",
            "REDIS_AUTH": "main-pw",
            "REDIS_PERSECOND": "true",
            "REDIS_PERSECOND_TYPE": "sentinel",
            "REDIS_PERSECOND_URL": "fast,s1:26379,s2:26379",
            "REDIS_PERSECOND_AUTH": "u:fast-pw",
            "REDIS_PERSECOND_SENTINEL_AUTH": "s-pw",
            "REDIS_PERSECOND_POOL_SIZE": "7",
            "REDIS_PERSECOND_TIMEOUT": "250ms",
            "REDIS_PERSECOND_TLS": "true",
            "REDIS_TLS_CACERT": "/ca.pem",
        }
    )
    assert (env.url, env.password, env.tls) == ("redis://main:6379", "main-pw", None)
    fast = env.per_second
    assert fast is not None
    assert fast.url == "rediss+sentinel://s1:26379,s2:26379/fast"
    assert (fast.username, fast.password, fast.sentinel_password) == ("u", "fast-pw", "s-pw")
    assert (fast.pool_size, fast.timeout_s) == (7, 0.25)
    assert fast.tls is not None and fast.tls.ca_file == "/ca.pem"
    assert redis_env({"REDIS_PERSECOND": "false", "REDIS_PERSECOND_URL": "x:1"}).per_second is None


def test_an_unknown_pool_on_empty_behaviour_falls_back_to_waiting() -> None:
    """driver_impl_test.go TestPoolOnEmptyBehavior: "unknown behavior falls back to default";
    lowercase "wait" works; ERROR and CREATE, any case, are refused (the list above)."""
    assert redis_env({"REDIS_POOL_ON_EMPTY_BEHAVIOR": "QUEUE"}) == RedisEnv()
    assert redis_env({"REDIS_POOL_ON_EMPTY_BEHAVIOR": "wait"}) == RedisEnv()
    with pytest.raises(EnvError, match="ERROR"):
        redis_env({"REDIS_POOL_ON_EMPTY_BEHAVIOR": "error"})
