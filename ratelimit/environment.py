"""envoyproxy/ratelimit's environment variables (its `src/settings/settings.go`): those read as
the defaults of our flags, and the switches refused at start-up. Pure: an environment is a
mapping passed in, read once by `Settings.from_args`."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path


class EnvError(ValueError):
    """A variable we cannot honour; the message is one line naming it."""


# envoyproxy/ratelimit reads its booleans with Go's strconv.ParseBool.
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def parse_bool(name: str, value: str, default: bool = False) -> bool:
    """Go's strconv.ParseBool of `name`'s value ("": `default`, upstream's when unset)."""
    if value == "":
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise EnvError(f"{name}={value!r} is not a boolean (true or false)")


def env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value, 10)
    except ValueError:
        raise EnvError(f"{name}={value!r} is not an integer") from None


def env_float(environ: Mapping[str, str], name: str, default: float) -> float:
    value = environ.get(name, "")
    if value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise EnvError(f"{name}={value!r} is not a number") from None


def join_host_port(host: str, port: int) -> str:
    """Go's net.JoinHostPort: an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def grpc_address(environ: Mapping[str, str], host: str, port: int) -> str:
    """The gRPC address: GRPC_UDS (a unix socket, as upstream then listens only there), else
    GRPC_HOST and GRPC_PORT, each defaulting to ours."""
    uds = environ.get("GRPC_UDS", "")
    if uds:
        return f"unix:{uds}"
    return join_host_port(environ.get("GRPC_HOST") or host, env_int(environ, "GRPC_PORT", port))


def prometheus_address(environ: Mapping[str, str]) -> tuple[str, int] | None:
    """With USE_PROMETHEUS=true, where upstream serves Prometheus (PROMETHEUS_ADDR, ":9090": an
    empty host is every address); None otherwise. Our metrics are served there instead."""
    if not parse_bool("USE_PROMETHEUS", environ.get("USE_PROMETHEUS", "")):
        return None
    value = environ.get("PROMETHEUS_ADDR") or ":9090"
    host, _, port = value.rpartition(":")
    try:
        number = int(port, 10)
    except ValueError:
        raise EnvError(f"PROMETHEUS_ADDR={value!r} is not host:port") from None
    return host.strip("[]") or "0.0.0.0", number


RUNTIME_ROOT = "/srv/runtime_data/current"  # upstream's defaults
RUNTIME_APPDIRECTORY = "config"


def runtime_config(environ: Mapping[str, str]) -> tuple[Path, ...]:
    """Where upstream's file provider reads its configuration: RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/
    RUNTIME_APPDIRECTORY. () when it reads nothing: with RUNTIME_WATCH_ROOT (its default) and no
    RUNTIME_SUBDIRECTORY, upstream's runtime loader is the empty one. RUNTIME_WATCH_ROOT only
    changes which changes upstream watches; we look at the files every second either way."""
    root = environ.get("RUNTIME_ROOT") or RUNTIME_ROOT
    sub = environ.get("RUNTIME_SUBDIRECTORY", "")
    app = environ.get("RUNTIME_APPDIRECTORY") or RUNTIME_APPDIRECTORY
    watch_root = parse_bool("RUNTIME_WATCH_ROOT", environ.get("RUNTIME_WATCH_ROOT", ""), True)
    if watch_root and not sub:
        return ()
    return (Path(root, sub, app) if sub else Path(root, app),)


# logrus's level names (LOG_LEVEL, any case) as the logging module's.
_LOG_LEVELS = {
    "trace": "DEBUG",
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
    "fatal": "CRITICAL",
    "panic": "CRITICAL",
    "critical": "CRITICAL",
}


def log_level(name: str, value: str) -> str:
    """A level named as logrus (upstream's LOG_LEVEL) or the logging module names it."""
    level = _LOG_LEVELS.get(value.strip().lower())
    if level is None:
        raise EnvError(f"{name}={value!r} is not a log level ({', '.join(_LOG_LEVELS)})")
    return level


def _true(name: str) -> Callable[[Mapping[str, str]], bool]:
    return lambda env: parse_bool(name, env.get(name, ""))


def _set(name: str) -> Callable[[Mapping[str, str]], bool]:
    return lambda env: env.get(name, "") != ""


# Upstream's switches for what this service does not do: refused when they ask for it, so a
# deployment moved over from envoyproxy/ratelimit fails at start-up instead of silently losing
# the feature. (variable, asks for it, what it is)
REFUSED: tuple[tuple[str, Callable[[Mapping[str, str]], bool], str], ...] = (
    ("USE_STATSD", _true("USE_STATSD"), "statsd stats (ours are Prometheus: --metrics-port)"),
    ("USE_DOG_STATSD", _true("USE_DOG_STATSD"), "DogStatsD stats"),
    ("EXTRA_TAGS", _set("EXTRA_TAGS"), "extra tags on every stat"),
    ("TRACING_ENABLED", _true("TRACING_ENABLED"), "OpenTelemetry tracing"),
    ("LOG_FORMAT", lambda env: env.get("LOG_FORMAT", "").lower() == "json", "JSON logs"),
)
# Accepted and ignored, as harmless here: GRPC_SERVER_TLS_CERT/_KEY, GRPC_CLIENT_TLS_CACERT/_SAN without GRPC_SERVER_USE_TLS
# (as upstream: see `grpc_tls`); GRPC_SERVER_TLS_CA_CERT (set by Envoy Gateway, read by no
# version of upstream: the client CA is GRPC_CLIENT_TLS_CACERT); LOG_FORMAT text; STATSD_HOST/PORT, USE_DOG_STATSD_MOGRIFIERS, STATS_FLUSH_INTERVAL (read only by the
# refused sinks); DISABLE_STATS (our metrics are only pulled, never pushed); PROMETHEUS_PATH
# (our metrics port answers on every path); MEMCACHE_* (read only with BACKEND_TYPE=memcache,
# which `ratelimit.redis_env` refuses with the other counter-store settings);
# TRACING_* but TRACING_ENABLED; RUNTIME_WATCH_ROOT beyond the path (see `runtime_config`);
# RUNTIME_IGNOREDOTFILES (dotfiles are always skipped: upstream's behaviour with it true, the
# one a mounted ConfigMap needs).


def refusal(environ: Mapping[str, str]) -> str | None:
    """The first refused switch the environment sets, as one line; None when there is none."""
    for name, asks, what in REFUSED:
        if asks(environ):
            return (
                f"{name}={environ.get(name, '')!r} asks for {what}, which this service does "
                "not implement; unset it"
            )
    return None


@dataclass(frozen=True)
class GrpcTls:
    """Upstream's TLS on the gRPC port (settings.go's GrpcServerTlsConfig): the files and the
    client SAN are read only with GRPC_SERVER_USE_TLS=true."""

    use_tls: bool = False
    cert: Path | None = None  # GRPC_SERVER_TLS_CERT
    key: Path | None = None  # GRPC_SERVER_TLS_KEY
    client_ca: Path | None = None  # GRPC_CLIENT_TLS_CACERT: client certificates required
    client_san: str = ""  # GRPC_CLIENT_TLS_SAN: a name the client certificate must hold


def grpc_tls(environ: Mapping[str, str]) -> GrpcTls:
    if not parse_bool("GRPC_SERVER_USE_TLS", environ.get("GRPC_SERVER_USE_TLS", "")):
        return GrpcTls()

    def path(name: str) -> Path | None:
        value = environ.get(name, "")
        return Path(value) if value else None

    return GrpcTls(
        use_tls=True,
        cert=path("GRPC_SERVER_TLS_CERT"),
        key=path("GRPC_SERVER_TLS_KEY"),
        client_ca=path("GRPC_CLIENT_TLS_CACERT"),
        client_san=environ.get("GRPC_CLIENT_TLS_SAN", ""),
    )


@dataclass(frozen=True)
class Defaults:
    """Our flags' defaults as upstream's variables set them (ours where a variable is unset)."""

    http_host: str
    http_port: int
    debug_host: str
    debug_port: int
    grpc_address: str
    metrics_address: str
    metrics_port: int
    config: tuple[Path, ...]
    log_level: str
    near_ratio: float
    dynamic_metadata: bool
    healthy_with_config: bool
    grpc_tls: GrpcTls
    use_prometheus: bool  # USE_PROMETHEUS: upstream's series names served too
    # with it, PROMETHEUS_MAPPER_YAML (statsd_exporter's rules for those names; None: upstream's
    # default ones) and PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS
    prometheus_mapper: Path | None
    response_time_ms: bool
    shadow_mode: bool
    quota_mode: bool
    response_headers: bool  # LIMIT_RESPONSE_HEADERS_ENABLED
    merge_domains: bool  # MERGE_DOMAIN_CONFIG
    # GRPC_MAX_CONNECTION_AGE(_GRACE): a connection is sent GOAWAY after this long (gRPC adds
    # +/-10 % jitter, as upstream says of its own), and closed the grace after that
    max_connection_age_s: float
    max_connection_age_grace_s: float


def defaults(
    environ: Mapping[str, str],
    *,
    host: str,
    grpc_default: str,
    metrics: tuple[str, int],
    level_default: str,
    near_ratio: float,
) -> Defaults:
    """Read once at start-up; EnvError for a value that is not one, or a refused switch.
    Upstream listens on 0.0.0.0 by default; we default to `host` (127.0.0.1), as our gRPC port."""
    refused = refusal(environ)
    if refused is not None:
        raise EnvError(refused)
    grpc_host, _, grpc_port = grpc_default.rpartition(":")
    level = environ.get("LOG_LEVEL", "")

    def flag(name: str) -> bool:
        return parse_bool(name, environ.get(name, ""))

    return Defaults(
        http_host=environ.get("HOST") or host,
        http_port=env_int(environ, "PORT", 8080),
        debug_host=environ.get("DEBUG_HOST") or host,
        debug_port=env_int(environ, "DEBUG_PORT", 6070),
        grpc_address=grpc_address(environ, grpc_host.strip("[]"), int(grpc_port)),
        metrics_address=(prometheus_address(environ) or metrics)[0],
        metrics_port=(prometheus_address(environ) or metrics)[1],
        config=runtime_config(environ),
        log_level=log_level("LOG_LEVEL", level) if level else level_default,
        near_ratio=env_float(environ, "NEAR_LIMIT_RATIO", near_ratio),
        dynamic_metadata=flag("RESPONSE_DYNAMIC_METADATA"),
        healthy_with_config=flag("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED"),
        grpc_tls=grpc_tls(environ),
        use_prometheus=prometheus_address(environ) is not None,
        prometheus_mapper=(
            Path(environ["PROMETHEUS_MAPPER_YAML"])
            if prometheus_address(environ) is not None and environ.get("PROMETHEUS_MAPPER_YAML")
            else None
        ),
        response_time_ms=prometheus_address(environ) is not None
        and flag("PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS"),
        shadow_mode=flag("SHADOW_MODE"),
        quota_mode=flag("QUOTA_MODE"),
        response_headers=flag("LIMIT_RESPONSE_HEADERS_ENABLED"),
        merge_domains=flag("MERGE_DOMAIN_CONFIG"),
        max_connection_age_s=duration(environ, "GRPC_MAX_CONNECTION_AGE", 24 * 3600.0),
        max_connection_age_grace_s=duration(environ, "GRPC_MAX_CONNECTION_AGE_GRACE", 3600.0),
    )


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_UNIT_S["h"] = 3600.0


def duration_arg(text: str) -> float:
    """A flag's duration, for argparse: a Go duration (`3s`, `500ms`, `1m30s`), as upstream's
    settings read them, or a bare number of seconds, as a flag's convenience."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return go_duration("a duration", text)
    except EnvError as err:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (e.g. 3s, 500ms, 1m30s)"
        ) from err


def duration(environ: Mapping[str, str], name: str, default: float) -> float:
    """A Go duration variable in seconds (unset or empty: `default`, upstream's)."""
    value = environ.get(name, "")
    return go_duration(name, value) if value else default


def go_duration(name: str, value: str) -> float:
    """Go's time.ParseDuration ("10s", "1m30s", "250ms") in seconds; "0" is zero."""
    if value == "0":
        return 0.0
    text, total = value, 0.0
    while text:
        found = _DURATION.match(text)
        if found is None:
            raise EnvError(f"{name}={value!r} is not a duration (e.g. 500ms, 10s, 1m)")
        total += float(found.group(1)) * _UNIT_S[found.group(2)]
        text = text[found.end() :]
    if not value:
        raise EnvError(f"{name} is empty")
    return total
