"""envoyproxy/ratelimit's Redis settings (REDIS_*, CACHE_KEY_PREFIX, BACKEND_TYPE,
STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT in its `src/settings/settings.go`) read as our flags'
defaults, so an existing deployment's env block finds the same Redis. Pure: the environment is a
mapping passed in.

Upstream's REDIS_URL by REDIS_TYPE, and ours (arks.adapters.redis.client):
  SINGLE    host:port (REDIS_SOCKET_TYPE=tcp) or a socket path (unix)  redis://host:port, unix://
  CLUSTER   host:port,host:port,...                                    redis+cluster://...
  SENTINEL  master,host:port,host:port,...                             redis+sentinel://.../master
REDIS_TLS makes each `rediss`. A URL with a scheme already (redis://...) is taken as it is.
With REDIS_PERSECOND=true the same settings under REDIS_PERSECOND_* name a second Redis for the
counters of per-second limits (`arks.limits.backends.per_second`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from arks.adapters.redis.client import Tls
from ratelimit.environment import EnvError, env_int, go_duration, parse_bool


@dataclass(frozen=True)
class RedisEnv:
    """What the environment says about Redis; None: not set (our flag's default stands)."""

    url: str | None = None
    username: str | None = None
    password: str | None = None  # REDIS_AUTH: "password" or "user:password"
    sentinel_username: str | None = None
    sentinel_password: str | None = None  # REDIS_SENTINEL_AUTH: as REDIS_AUTH
    pool_size: int | None = None
    timeout_s: float | None = None
    tls: Tls | None = None
    key_prefix: str | None = None
    stop_increment_when_over: bool = False
    local_cache_bytes: int = 0  # LOCAL_CACHE_SIZE_IN_BYTES: 0, no local over-limit cache
    # EXPIRATION_JITTER_MAX_SECONDS; unset: 0 (upstream's 300 keeps a per-second limit's spent
    # keys up to 5 minutes: ~150 times the keys in Redis)
    expiry_jitter_s: int = 0
    # REDIS_PERSECOND=true: the per-second Redis's connection (its url, auth, pool, timeout, tls;
    # the other fields unused), from REDIS_PERSECOND_URL, _TYPE, _SOCKET_TYPE, _AUTH, ...
    per_second: RedisEnv | None = None

    def __repr__(self) -> str:  # never the passwords
        return (
            f"RedisEnv(url={self.url!r}, key_prefix={self.key_prefix!r}, "
            f"per_second={self.per_second!r})"
        )


# What upstream refuses for its pool when empty (radix v4 only waits, so do we); any other value,
# unknown ones too, is waiting, as upstream (which logs a warning for an unknown one).
_POOL_ON_EMPTY_REFUSED = ("ERROR", "CREATE")


def redis_env(environ: Mapping[str, str]) -> RedisEnv:
    """The Redis settings in `environ`; EnvError names a variable we cannot honour."""
    backend = environ.get("BACKEND_TYPE", "")
    if backend not in ("", "redis"):
        raise EnvError(f"BACKEND_TYPE={backend!r}: only redis (or our in-memory counters)")
    per_second = None
    if parse_bool("REDIS_PERSECOND", environ.get("REDIS_PERSECOND", "")):
        per_second = _connection(environ, "REDIS_PERSECOND")
        if per_second.url is None:
            raise EnvError("REDIS_PERSECOND=true needs REDIS_PERSECOND_URL")
    return replace(
        _connection(environ, "REDIS"),
        per_second=per_second,
        key_prefix=environ["CACHE_KEY_PREFIX"] if "CACHE_KEY_PREFIX" in environ else None,
        local_cache_bytes=_non_negative(environ, "LOCAL_CACHE_SIZE_IN_BYTES"),
        expiry_jitter_s=_non_negative(environ, "EXPIRATION_JITTER_MAX_SECONDS"),
        stop_increment_when_over=parse_bool(
            "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT",
            environ.get("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", ""),
        ),
    )


def _connection(environ: Mapping[str, str], prefix: str) -> RedisEnv:
    """One Redis's settings under `prefix` (REDIS, or REDIS_PERSECOND for the per-second one;
    the TLS files, REDIS_TLS_*, are both's, as upstream's)."""

    def get(name: str) -> str:
        return environ.get(f"{prefix}_{name}", "")

    on_empty = get("POOL_ON_EMPTY_BEHAVIOR").upper()
    if on_empty in _POOL_ON_EMPTY_REFUSED:
        raise EnvError(
            f"{prefix}_POOL_ON_EMPTY_BEHAVIOR={on_empty}: only WAIT (upstream refuses {on_empty} "
            "too)"
        )
    tls_on = parse_bool(f"{prefix}_TLS", get("TLS"))
    url = redis_url(
        get("URL"), get("TYPE") or "SINGLE", get("SOCKET_TYPE") or "unix", tls_on, prefix
    )
    username, password = _auth(get("AUTH"))
    sentinel_username, sentinel_password = _auth(get("SENTINEL_AUTH"))
    tls = None
    if tls_on:
        tls = Tls(
            ca_file=environ.get("REDIS_TLS_CACERT") or None,
            cert_file=environ.get("REDIS_TLS_CLIENT_CERT") or None,
            key_file=environ.get("REDIS_TLS_CLIENT_KEY") or None,
            check_hostname=not parse_bool(
                "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION",
                environ.get("REDIS_TLS_SKIP_HOSTNAME_VERIFICATION", ""),
            ),
        )
        if (tls.cert_file is None) != (tls.key_file is None):
            raise EnvError("REDIS_TLS_CLIENT_CERT and REDIS_TLS_CLIENT_KEY go together")
    timeout = get("TIMEOUT")
    pool = env_int(environ, f"{prefix}_POOL_SIZE", 0)
    if pool < 0:
        raise EnvError(f"{prefix}_POOL_SIZE={pool}: a pool holds at least one connection")
    return RedisEnv(
        url=url,
        username=username,
        password=password,
        sentinel_username=sentinel_username,
        sentinel_password=sentinel_password,
        pool_size=pool or None,
        # Upstream's 0 is no deadline at all; ours bounds every decision, so 0 keeps our
        # default (a deadline of 0 would time every call out).
        timeout_s=(go_duration(f"{prefix}_TIMEOUT", timeout) or None) if timeout else None,
        tls=tls,
    )


def _non_negative(environ: Mapping[str, str], name: str) -> int:
    value = env_int(environ, name, 0)
    if value < 0:
        raise EnvError(f"{name}={value}: not negative")
    return value


def redis_url(
    url: str, kind: str, socket_type: str, tls: bool, prefix: str = "REDIS"
) -> str | None:
    """Upstream's REDIS_URL under REDIS_TYPE and REDIS_SOCKET_TYPE as our Redis URL; None when
    it is not set."""
    if not url:
        return None
    if "://" in url:
        return url
    s = "s" if tls else ""
    match kind.lower():
        case "single":
            if socket_type.lower() == "unix":
                return f"unix://{url}"
            if socket_type.lower() != "tcp":
                raise EnvError(f"{prefix}_SOCKET_TYPE={socket_type!r}: tcp or unix")
            return f"redis{s}://{url}"
        case "cluster":
            return f"redis{s}+cluster://{url}"
        case "sentinel":
            master, _, sentinels = url.partition(",")
            if not master or not sentinels:
                raise EnvError(
                    f"{prefix}_URL for {prefix}_TYPE=sentinel is <master name>,<sentinel>,...,"
                    "<sentinel>"
                )
            return f"redis{s}+sentinel://{sentinels}/{master}"
    raise EnvError(f"{prefix}_TYPE={kind!r}: single, cluster or sentinel")


def _auth(value: str) -> tuple[str | None, str | None]:
    """REDIS_AUTH (and REDIS_SENTINEL_AUTH) as upstream reads it: "user:password", or a
    password alone."""
    if not value:
        return None, None
    user, colon, password = value.partition(":")
    return (user, password) if colon else (None, value)
