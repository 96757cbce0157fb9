"""`python -m ratelimit`: Envoy's global rate-limit service, on Redis or in memory."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import grpc
import uvloop
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from prometheus_client import start_http_server

from arks import workers
from arks.adapters.grpc_server import start_grpc
from arks.adapters.grpc_tls import CertificateFiles, ServerTls, TlsFilesError
from arks.adapters.redis.backend import RedisBackend
from arks.adapters.redis.client import (
    RedisAuthFailed,
    check_auth,
    read_password,
    startup_failure,
    target,
)
from arks.lifecycle import every, export_process_metrics, run_until_signalled, setup_process
from arks.limits.backends import BackendUnavailable, CounterBackend, MemoryBackend
from arks.limits.backends.local_cache import BYTES_PER_ENTRY, LocalOverLimitCache, entries_for
from arks.limits.backends.per_second import PerSecondSplit
from arks.limits.config import ConfigError, RateLimitConfig, load_config
from arks.limits.limiter import Enforcement, Limiter
from arks.limits.metrics import RateLimitMetrics
from arks.metric_rules import enforce
from ratelimit import environment, statsd_mapping, xds_config
from ratelimit.codec import HeaderNames
from ratelimit.health import CONFIG, REDIS, SIGTERM, Health
from ratelimit.http import debug_app, service_app, start_http
from ratelimit.metrics import CallMetrics
from ratelimit.redis_env import RedisEnv, redis_env
from ratelimit.servicer import RateLimitService
from ratelimit.statsd_mapping import Rule
from ratelimit.upstream_stats import RuleFile, UpstreamStats
from ratelimit.xds_config import XdsConfigSource, XdsSettings

log = logging.getLogger("ratelimit")


@dataclass(frozen=True)
class Settings:
    config: tuple[Path, ...] = ()
    grpc_address: str = "127.0.0.1:8081"
    grpc_tls: ServerTls | None = None  # TLS on the gRPC port (upstream's GRPC_SERVER_USE_TLS)
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9102
    redis: str | None = None  # None: counters in this process's memory
    redis_password_file: Path | None = None  # Redis AUTH (a mounted Secret key)
    redis_timeout_s: float = 0.5
    redis_pool_size: int = 64
    # the counters of per-second limits in this Redis instead (upstream's REDIS_PERSECOND)
    redis_per_second: str | None = None
    # upstream's REDIS_AUTH, REDIS_SENTINEL_AUTH, REDIS_TLS_* (the URL's scheme says TLS)
    redis_env: RedisEnv = field(default_factory=RedisEnv)
    key_prefix: str = "arks:rl:"  # before every counter's key (upstream's CACHE_KEY_PREFIX)
    # a refused request charges nothing (upstream's STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT)
    stop_increment_when_over: bool = False
    local_cache_bytes: int = 0  # upstream's LOCAL_CACHE_SIZE_IN_BYTES (0: none)
    expiry_jitter_s: int = 0  # upstream's EXPIRATION_JITTER_MAX_SECONDS
    fail_open: bool = True
    shadow_mode: bool = False
    quota_mode: bool = False
    near_ratio: float = 0.8
    reload_interval_s: float = 1.0
    log_level: str = "INFO"
    merge_domains: bool = False  # a domain's files merged (upstream's MERGE_DOMAIN_CONFIG)
    # upstream's rate-limit response headers (off by default, as upstream), under these names
    response_headers: HeaderNames | None = None
    openai_body: bool = False  # an over-limit answer's OpenAI-shaped body and Retry-After
    # envoyproxy/ratelimit's HTTP port (/healthcheck, /json) and debug port (/rlconfig, /stats)
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    debug_host: str = "127.0.0.1"
    debug_port: int = 6070
    dynamic_metadata: bool = False  # upstream's RESPONSE_DYNAMIC_METADATA
    healthy_with_config: bool = False  # upstream's HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED
    workers: int = 1  # processes on one port (`arks.workers`); above 1 needs Redis
    worker_index: int | None = None  # set in a worker: its metrics port is metrics_port + this
    xds: XdsSettings | None = None  # limits from an xDS server instead of files (CONFIG_TYPE)
    upstream_stat_names: bool = False  # envoyproxy/ratelimit's Prometheus series served too
    upstream_stat_mapping: Path | None = None  # their statsd_exporter rules (None: upstream's)
    upstream_response_time_ms: bool = False  # their response time in milliseconds
    # GOAWAY after this long, closed the grace later (upstream's GRPC_MAX_CONNECTION_AGE(_GRACE))
    max_connection_age_s: float = 24 * 3600.0
    max_connection_age_grace_s: float = 3600.0

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> Settings:
        try:  # envoyproxy/ratelimit's environment variables, as the flags' defaults
            from_env = redis_env(os.environ)
            upstream = environment.defaults(
                os.environ,
                host="127.0.0.1",
                grpc_default=cls.grpc_address,
                metrics=(cls.metrics_address, cls.metrics_port),
                level_default=cls.log_level,
                near_ratio=cls.near_ratio,
            )
        except environment.EnvError as err:
            raise SystemExit(f"ratelimit: {err}") from None
        p = argparse.ArgumentParser(prog="python -m ratelimit", description=__doc__)
        p.add_argument(
            "--config",
            type=Path,
            action="append",
            default=[],
            help="envoyproxy/ratelimit YAML file or directory (repeatable; reloaded on change; "
            "default: upstream's RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY)",
        )
        p.add_argument(
            "--grpc-address",
            default=upstream.grpc_address,
            help="host:port, or unix:PATH (default from upstream's GRPC_HOST, GRPC_PORT, GRPC_UDS)",
        )
        tls = upstream.grpc_tls  # upstream's variables, read only with GRPC_SERVER_USE_TLS=true
        for option, variable, path, what in (
            ("--grpc-tls-cert", "GRPC_SERVER_TLS_CERT", tls.cert, "TLS on the gRPC port: its "
             "certificate (PEM; reloaded on change)"),
            ("--grpc-tls-key", "GRPC_SERVER_TLS_KEY", tls.key, "its private key (PEM)"),
            ("--grpc-client-ca", "GRPC_CLIENT_TLS_CACERT", tls.client_ca, "client certificates "
             "required, verified against this CA (PEM)"),
        ):  # fmt: skip
            p.add_argument(option, type=Path, default=path, help=f"{what} (upstream's {variable})")
        p.add_argument(
            "--grpc-client-san",
            default=tls.client_san,
            help="a name (DNS or IP SAN) the client certificate must hold, checked per call: "
            "UNAUTHENTICATED without it (upstream's GRPC_CLIENT_TLS_SAN; upstream checks it in "
            "the handshake)",
        )
        p.add_argument(
            "--grpc-max-connection-age",
            type=environment.duration_arg,
            default=upstream.max_connection_age_s,
            help="a gRPC connection is sent GOAWAY after this long, +/-10 %% (Go duration; "
            "upstream's GRPC_MAX_CONNECTION_AGE, default 24h): clients spread over new replicas",
        )
        p.add_argument(
            "--grpc-max-connection-age-grace",
            type=environment.duration_arg,
            default=upstream.max_connection_age_grace_s,
            help="then closed after this long (upstream's GRPC_MAX_CONNECTION_AGE_GRACE, 1h)",
        )
        p.add_argument(
            "--host", default=upstream.http_host, help="/healthcheck and /json (upstream's HOST)"
        )
        p.add_argument("--port", type=int, default=upstream.http_port, help="(upstream's PORT)")
        p.add_argument(
            "--debug-host",
            default=upstream.debug_host,
            help="/rlconfig and /stats (upstream's DEBUG_HOST)",
        )
        p.add_argument(
            "--debug-port", type=int, default=upstream.debug_port, help="(upstream's DEBUG_PORT)"
        )
        p.add_argument(
            "--metrics-address",
            default=upstream.metrics_address,
            help="Prometheus (with upstream's USE_PROMETHEUS=true: from PROMETHEUS_ADDR)",
        )
        p.add_argument("--metrics-port", type=int, default=upstream.metrics_port)
        p.add_argument(
            "--upstream-stat-names",
            action=argparse.BooleanOptionalAction,
            default=upstream.use_prometheus,
            help="serve envoyproxy/ratelimit's Prometheus series too (ratelimit_service_rate_limit"
            "_over_limit{domain,key1,key2}, ...: what its alerts and dashboards query), computed "
            "from ours at scrape time (default: on with upstream's USE_PROMETHEUS=true)",
        )
        p.add_argument(
            "--upstream-stat-mapping",
            type=Path,
            default=upstream.prometheus_mapper,
            metavar="FILE",
            help="statsd_exporter mapping rules naming those series (upstream's "
            "PROMETHEUS_MAPPER_YAML, which Envoy Gateway writes; default: upstream's own rules)",
        )
        p.add_argument(
            "--upstream-response-time-ms",
            action="store_true",
            default=upstream.response_time_ms,
            help="their response time in milliseconds (upstream's "
            "PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS)",
        )
        p.add_argument(
            "--response-dynamic-metadata",
            action="store_true",
            default=upstream.dynamic_metadata,
            help="echo the request and the passing limits' metadata in the answer's dynamic "
            "metadata (upstream's RESPONSE_DYNAMIC_METADATA, also read from there)",
        )
        p.add_argument(
            "--healthy-with-at-least-one-config-loaded",
            action="store_true",
            default=upstream.healthy_with_config,
            help="unhealthy while the configuration has no domain (upstream's "
            "HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED, also read from there)",
        )
        p.add_argument(
            "--redis",
            metavar="URL",
            default=from_env.url,
            help="redis://host:port/db, redis+cluster://host:port,..., redis+sentinel://host:port,"
            ".../master (default: upstream's REDIS_URL under REDIS_TYPE, REDIS_SOCKET_TYPE and "
            "REDIS_TLS; without it counters in memory)",
        )
        p.add_argument(
            "--redis-per-second",
            metavar="URL",
            default=from_env.per_second.url if from_env.per_second else None,
            help="keep the counters of per-second limits in this Redis, the others in --redis's "
            "(upstream's REDIS_PERSECOND=true with REDIS_PERSECOND_URL, _TYPE, _AUTH, ...)",
        )
        p.add_argument(
            "--redis-pool-size",
            type=int,
            default=from_env.pool_size or cls.redis_pool_size,
            help="connections per Redis server (upstream's REDIS_POOL_SIZE)",
        )
        p.add_argument(
            "--key-prefix",
            default=cls.key_prefix if from_env.key_prefix is None else from_env.key_prefix,
            help="before every counter's key, so deployments can share one Redis (upstream's "
            f"CACHE_KEY_PREFIX; default {cls.key_prefix})",
        )
        p.add_argument(
            "--stop-increment-when-over-limit",
            action="store_true",
            default=from_env.stop_increment_when_over,
            help="a request over any of its limits charges none of them (upstream's "
            "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT, also read from there)",
        )
        p.add_argument(
            "--local-cache-size-in-bytes",
            type=int,
            default=from_env.local_cache_bytes,
            help="remember counters found over their limit in this process until their window "
            "ends, answering them without Redis (upstream's LOCAL_CACHE_SIZE_IN_BYTES, also read "
            f"from there; ~{BYTES_PER_ENTRY} bytes a counter; 0: off)",
        )
        p.add_argument(
            "--expiration-jitter-max-seconds",
            type=int,
            default=from_env.expiry_jitter_s,
            help="a fixed window's Redis key lives a random 0 to this many seconds past its "
            "window, so keys made together do not expire together (upstream's "
            "EXPIRATION_JITTER_MAX_SECONDS, also read from there; upstream's default 300, ours 0)",
        )
        p.add_argument(
            "--redis-password-file",
            type=Path,
            help="file holding Redis's password (a mounted Secret key; default: no AUTH)",
        )
        p.add_argument(
            "--redis-timeout-s",
            type=float,
            default=cls.redis_timeout_s if from_env.timeout_s is None else from_env.timeout_s,
            help="a decision's wait for Redis (upstream's REDIS_TIMEOUT)",
        )
        p.add_argument(
            "--fail-closed", action="store_true", help="refuse limited requests while Redis is down"
        )
        p.add_argument(
            "--shadow-mode",
            action="store_true",
            default=upstream.shadow_mode,
            help="report over-limit in metrics, never enforce (upstream's SHADOW_MODE, also "
            "read from there)",
        )
        p.add_argument(
            "--quota-mode",
            action="store_true",
            default=upstream.quota_mode,
            help="every descriptor in quota mode: a request is over the limit only when all of "
            "its descriptors are (upstream's QUOTA_MODE, also read from there)",
        )
        p.add_argument(
            "--near-ratio",
            type=float,
            default=upstream.near_ratio,
            help="(upstream's NEAR_LIMIT_RATIO)",
        )
        p.add_argument(
            "--response-headers",
            action="store_true",
            default=upstream.response_headers,
            help="add envoyproxy/ratelimit's rate-limit headers to answers (its "
            "LIMIT_RESPONSE_HEADERS_ENABLED, also read from there; off by default, as upstream)",
        )
        names = HeaderNames()
        for flag, env, default in (
            ("--limit-header", "LIMIT_LIMIT_HEADER", names.limit),
            ("--remaining-header", "LIMIT_REMAINING_HEADER", names.remaining),
            ("--reset-header", "LIMIT_RESET_HEADER", names.reset),
        ):
            p.add_argument(
                flag,
                default=os.environ.get(env) or default,
                help=f"its name (upstream's {env}; default {default})",
            )
        p.add_argument(
            "--openai-body",
            action="store_true",
            help="an over-limit answer carries an OpenAI-shaped error body and Retry-After "
            "(Envoy's 429 then reads as the OpenAI API's); not in envoyproxy/ratelimit",
        )
        p.add_argument(
            "--merge-domain-config",
            action="store_true",
            default=upstream.merge_domains,
            help="merge the descriptors of every file of a domain, as envoyproxy/ratelimit's "
            "MERGE_DOMAIN_CONFIG (also read from that environment variable); without it a domain "
            "in two files is an error",
        )
        p.add_argument("--log-level", default=upstream.log_level, help="(upstream's LOG_LEVEL)")
        workers.add_arguments(p)
        xds_config.add_arguments(p)
        a = p.parse_args(argv)
        if a.expiration_jitter_max_seconds < 0:
            p.error("--expiration-jitter-max-seconds: not negative")
        for flag, url in (("--redis", a.redis), ("--redis-per-second", a.redis_per_second)):
            try:
                if url:
                    target(url)
            except ValueError as err:
                p.error(f"{flag}: {err}")
        if a.redis_per_second and not a.redis:
            p.error("--redis-per-second (REDIS_PERSECOND) needs --redis (REDIS_URL) for the rest")
        return cls(
            config=tuple(a.config) or upstream.config,
            grpc_address=a.grpc_address,
            grpc_tls=_grpc_tls(a, tls.use_tls),
            http_host=a.host,
            http_port=a.port,
            debug_host=a.debug_host,
            debug_port=a.debug_port,
            dynamic_metadata=a.response_dynamic_metadata,
            healthy_with_config=a.healthy_with_at_least_one_config_loaded,
            metrics_address=a.metrics_address,
            metrics_port=a.metrics_port,
            redis=a.redis,
            redis_password_file=a.redis_password_file,
            redis_timeout_s=a.redis_timeout_s,
            redis_pool_size=a.redis_pool_size,
            redis_per_second=a.redis_per_second,
            redis_env=from_env,
            key_prefix=a.key_prefix,
            stop_increment_when_over=a.stop_increment_when_over_limit,
            local_cache_bytes=a.local_cache_size_in_bytes,
            expiry_jitter_s=a.expiration_jitter_max_seconds,
            fail_open=not a.fail_closed,
            shadow_mode=a.shadow_mode,
            quota_mode=a.quota_mode,
            near_ratio=a.near_ratio,
            log_level=_log_level(a.log_level),
            merge_domains=a.merge_domain_config,
            response_headers=(
                HeaderNames(a.limit_header, a.remaining_header, a.reset_header)
                if a.response_headers
                else None
            ),
            openai_body=a.openai_body,
            workers=a.workers,
            worker_index=a.worker_index,
            xds=xds_config.from_args(a),
            upstream_stat_names=a.upstream_stat_names,
            upstream_stat_mapping=a.upstream_stat_mapping,
            upstream_response_time_ms=a.upstream_response_time_ms,
            max_connection_age_s=a.grpc_max_connection_age,
            max_connection_age_grace_s=a.grpc_max_connection_age_grace,
        )

    @property
    def own_metrics_port(self) -> int:
        """This process's metrics port: a worker's is the base port plus its index."""
        return self.metrics_port + (self.worker_index or 0)


def _grpc_tls(a: argparse.Namespace, use_tls_env: bool) -> ServerTls | None:
    """TLS on the gRPC port when it has a certificate and its key; SystemExit, naming what is
    missing, for a TLS setting without them (upstream: a fatal error at start-up too)."""
    cert, key = a.grpc_tls_cert, a.grpc_tls_key
    if cert is not None and key is not None:
        return ServerTls(cert, key, a.grpc_client_ca, a.grpc_client_san)
    if use_tls_env:
        missing = " and ".join(
            f"{env} (or {flag})"
            for env, flag, value in (
                ("GRPC_SERVER_TLS_CERT", "--grpc-tls-cert", cert),
                ("GRPC_SERVER_TLS_KEY", "--grpc-tls-key", key),
            )
            if value is None
        )
        raise SystemExit(f"ratelimit: GRPC_SERVER_USE_TLS=true needs {missing}")
    if cert is not None or key is not None:
        flag = "--grpc-tls-key" if key is None else "--grpc-tls-cert"
        raise SystemExit(f"ratelimit: TLS on the gRPC port needs {flag} too")
    for flag, value in (
        ("--grpc-client-ca", a.grpc_client_ca),
        ("--grpc-client-san", a.grpc_client_san),
    ):
        if value:
            raise SystemExit(f"ratelimit: {flag} needs --grpc-tls-cert and --grpc-tls-key")
    return None


# What a TlsFilesError's role names: the flag and upstream's variable.
_TLS_FILES = {
    "cert": "--grpc-tls-cert (GRPC_SERVER_TLS_CERT)",
    "key": "--grpc-tls-key (GRPC_SERVER_TLS_KEY)",
    "pair": "--grpc-tls-cert and --grpc-tls-key (GRPC_SERVER_TLS_CERT, GRPC_SERVER_TLS_KEY)",
    "client_ca": "--grpc-client-ca (GRPC_CLIENT_TLS_CACERT)",
}


def check_tls_files(tls: ServerTls | None) -> None:
    """Read the gRPC port's TLS files once before anything starts: SystemExit, one line naming
    the flag and the variable, when they cannot serve."""
    if tls is None:
        return
    try:
        CertificateFiles(tls)
    except TlsFilesError as err:
        raise SystemExit(
            f"ratelimit: TLS on the gRPC port: {_TLS_FILES[err.role]}: {err}"
        ) from None


def _log_level(value: str) -> str:
    try:
        return environment.log_level("--log-level", value)
    except environment.EnvError as err:
        raise SystemExit(f"ratelimit: {err}") from None


class ConfigSource:
    """The configuration files, reloaded when any of them changes; a bad change keeps the last good."""

    def __init__(
        self, paths: tuple[Path, ...], metrics: RateLimitMetrics, *, merge_domains: bool = False
    ) -> None:
        self.paths = paths
        self.metrics = metrics
        self.merge_domains = merge_domains
        self._config = load_config(paths, merge_domains=merge_domains)
        self._stamp = self._files_stamp()

    def current(self) -> RateLimitConfig:
        return self._config

    def _files_stamp(self) -> tuple[tuple[str, int, int], ...]:
        files: list[Path] = []
        for path in self.paths:
            files.extend(
                sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
            )
        stamp = []
        for file in files:
            try:
                st = file.stat()
            except OSError:
                continue
            stamp.append((str(file), st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def reload_if_changed(self) -> bool:
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self._config = load_config(self.paths, merge_domains=self.merge_domains)
        except (ConfigError, OSError) as err:
            self.metrics.config_errors.inc()
            log.error("rate-limit config not reloaded, keeping the last good one: %s", err)
            return False
        self.metrics.config_reloads.inc()
        log.info("rate-limit config reloaded (%d domains)", len(self._config.domains))
        return True


HEALTH_NAMES = ("ratelimit", "envoy.service.ratelimit.v3.RateLimitService")


def create_metrics(
    upstream_names: bool = False, rules: tuple[Rule, ...] | RuleFile | None = None
) -> tuple[RateLimitMetrics, CallMetrics]:
    """The service's registry, checked against the cardinality rules (a violation stops the
    start-up: `arks.metric_rules`); with `upstream_names`, envoyproxy/ratelimit's series too,
    named by statsd_exporter's `rules` (None: upstream's default ones)."""
    metrics = RateLimitMetrics.create()
    export_process_metrics(metrics.registry, "ratelimit")
    calls = CallMetrics.create(metrics.registry)
    if upstream_names:
        m = metrics
        per_limit = (m.hits, m.over_limit, m.near_limit, m.within_limit, m.shadow_mode)
        source = (
            *per_limit,
            m.over_limit_with_local_cache,
            m.config_reloads,
            m.config_errors,
            m.global_shadow_mode,
            calls.errors,
            calls.seconds,
        )
        metrics.registry.register(UpstreamStats(source, rules))
    enforce(metrics.registry, "ratelimit")
    return metrics, calls


def upstream_rules(settings: Settings) -> tuple[Rule, ...] | RuleFile:
    """The rules naming upstream's series: the mapping file's (`RuleFile`: read again when it
    changes), or upstream's default ones."""
    path = settings.upstream_stat_mapping
    ms = settings.upstream_response_time_ms
    if path is None:
        return statsd_mapping.parse(statsd_mapping.DEFAULT, response_time_ms=ms)
    return RuleFile(path, response_time_ms=ms)


@dataclass(frozen=True)
class RedisTarget:
    """One Redis the counters live in, as reached: the main one, or the per-second one."""

    url: str
    env: RedisEnv  # its user, Sentinel credentials, TLS
    password: str | None
    timeout_s: float
    pool_size: int

    def credentials(self) -> dict[str, Any]:
        e = self.env
        return {
            "password": self.password,
            "username": e.username,
            "sentinel_username": e.sentinel_username,
            "sentinel_password": e.sentinel_password,
            "tls": e.tls,
        }


def redis_targets(settings: Settings, password: str | None) -> list[RedisTarget]:
    """The main Redis (`password`: its password file's, else REDIS_AUTH's), then the per-second
    one: REDIS_PERSECOND_*'s settings, or, named by the flag alone, the main one's."""
    if not settings.redis:
        return []
    main = settings.redis_env
    targets = [
        RedisTarget(
            settings.redis,
            main,
            password or main.password,
            settings.redis_timeout_s,
            settings.redis_pool_size,
        )
    ]
    if settings.redis_per_second:
        own = main.per_second
        env = own or main
        targets.append(
            RedisTarget(
                settings.redis_per_second,
                env,
                env.password if own else targets[0].password,
                own.timeout_s if own and own.timeout_s is not None else settings.redis_timeout_s,
                (own.pool_size if own else None) or settings.redis_pool_size,
            )
        )
    return targets


def make_backend(settings: Settings, targets: list[RedisTarget]) -> CounterBackend:
    if not targets:
        return MemoryBackend()
    main, *per_second = (
        RedisBackend(
            t.url,
            prefix=settings.key_prefix,
            timeout_s=t.timeout_s,
            max_connections=t.pool_size,
            expiry_jitter_s=settings.expiry_jitter_s,
            **t.credentials(),
        )
        for t in targets
    )
    store: CounterBackend = PerSecondSplit(per_second[0], main) if per_second else main
    entries = entries_for(settings.local_cache_bytes)
    return LocalOverLimitCache(store, entries) if entries else store


async def serve(settings: Settings) -> None:
    password = read_password(settings.redis_password_file) if settings.redis_password_file else None
    targets = redis_targets(settings, password)
    for store in targets:
        await check_auth(store.url, timeout_s=2.0, **store.credentials())
    metrics, calls = create_metrics(settings.upstream_stat_names, upstream_rules(settings))
    source: ConfigSource | XdsConfigSource
    if settings.xds is not None:
        if settings.config:  # as upstream, whose file settings stay set beside CONFIG_TYPE
            log.info("limits from xDS (%s); the config files are not read", settings.xds.server)
        source = XdsConfigSource(settings.xds, metrics, merge_domains=settings.merge_domains)
        streaming = asyncio.ensure_future(source.run())
        if not settings.xds.force_start:  # as upstream: no port open before the first config
            log.info("waiting for the first rate-limit config from %s", settings.xds.server)
            await source.loaded.wait()
    else:
        source = ConfigSource(settings.config, metrics, merge_domains=settings.merge_domains)
    backend = make_backend(settings, targets)
    limiter = Limiter(
        config=source.current,
        backend=backend,
        metrics=metrics,
        clock=time.time,
        enforcement=Enforcement(
            fail_open=settings.fail_open,
            shadow_mode=settings.shadow_mode,
            quota_mode=settings.quota_mode,
            near_ratio=settings.near_ratio,
            all_or_nothing=settings.stop_increment_when_over,
        ),
        overrides_anywhere=False,  # as upstream: no limit in a domain it does not have
    )

    service = RateLimitService(
        limiter,
        calls,
        headers=settings.response_headers,
        openai_body=settings.openai_body,
        dynamic_metadata=settings.dynamic_metadata,
    )

    def register(server: grpc.aio.Server) -> None:
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(service, server)

    # One health for gRPC and /healthcheck, as upstream's HealthChecker.
    health = Health((REDIS, SIGTERM, CONFIG) if settings.healthy_with_config else (REDIS, SIGTERM))
    if settings.healthy_with_config:
        health.set(CONFIG, bool(limiter.config().domains))
    if settings.redis:  # as upstream, healthy only once Redis has answered
        try:
            await backend.ping()
        except BackendUnavailable:
            health.set(REDIS, False)
    # Before gRPC: a start-up stopped by a taken HTTP port leaves no server behind.
    served = [
        await _serve_http(service_app(health, service.answer), settings, debug=False),
        await _serve_http(debug_app(limiter.config, metrics.registry), settings, debug=True),
    ]
    runners = [runner for runner in served if runner is not None]
    tls = settings.grpc_tls
    if tls is not None and tls.client_san and tls.client_ca is None:  # as upstream, which then
        log.warning(  # asks for no client certificate
            "the client SAN %r is not checked: no --grpc-client-ca (GRPC_CLIENT_TLS_CACERT), so "
            "no client certificate is asked for",
            tls.client_san,
        )
    grpc_server = await start_grpc(
        settings.grpc_address,
        register,
        reuse_port=settings.workers > 1,
        # envoyproxy/ratelimit's name for its health, and the service's own.
        health_names=HEALTH_NAMES,
        tls=tls,
        max_connection_age_s=settings.max_connection_age_s,
        max_connection_age_grace_s=settings.max_connection_age_grace_s,
    )
    if not health.ok:
        await grpc_server.set_serving(False)
    start_http_server(
        settings.own_metrics_port, settings.metrics_address, registry=metrics.registry
    )

    async def set_health(component: str, ok: bool) -> None:
        if health.set(component, ok) is not None:
            await grpc_server.set_serving(health.ok)
            failing = ", ".join(health.failing())
            log.warning("health: %s", "SERVING" if health.ok else f"NOT_SERVING ({failing})")

    log.info(
        "ratelimit%s serving gRPC on %s (%s%s, %s), HTTP on %s, debug on %s, metrics on %s:%d",
        "" if settings.worker_index is None else f" worker {settings.worker_index}",
        settings.grpc_address,
        _tls_mode(settings.grpc_tls),
        ("redis + per-second redis" if settings.redis_per_second else "redis")
        if settings.redis
        else "memory",
        "fail-open" if settings.fail_open else "fail-closed",
        environment.join_host_port(settings.http_host, settings.http_port),
        environment.join_host_port(settings.debug_host, settings.debug_port),
        settings.metrics_address,
        settings.own_metrics_port,
    )

    async def reload() -> None:
        source.reload_if_changed()
        # As upstream: NOT_SERVING while Redis does not answer, SERVING again when it does.
        try:
            await backend.ping()
            healthy = True
        except BackendUnavailable:
            healthy = False
        await set_health(REDIS, healthy)
        if settings.healthy_with_config:
            await set_health(CONFIG, bool(limiter.config().domains))

    async def shutdown() -> None:
        await set_health(SIGTERM, False)  # as upstream: unhealthy from the signal on
        await grpc_server.stop()
        for runner in runners:
            await runner.cleanup()
        await backend.close()

    background: list[Awaitable[None]] = [every(settings.reload_interval_s, reload, log)]
    if isinstance(source, XdsConfigSource):
        background.append(streaming)
    await run_until_signalled(*background, shutdown=shutdown)


def _tls_mode(tls: ServerTls | None) -> str:
    if tls is None:
        return ""
    if tls.client_ca is None:
        return "TLS, "
    return f"TLS, client certificates{f' with SAN {tls.client_san}' if tls.client_san else ''}, "


async def _serve_http(
    app: aiohttp.web.Application, settings: Settings, *, debug: bool
) -> aiohttp.web.AppRunner | None:
    """The HTTP port (refusing to start without it, as upstream) or the debug port (None
    without it: upstream only logs that)."""
    host, port = (
        (settings.debug_host, settings.debug_port)
        if debug
        else (settings.http_host, settings.http_port)
    )
    try:
        return await start_http(app, host, port, reuse_port=settings.workers > 1)
    except OSError as err:
        what = f"{'debug' if debug else 'HTTP'} port {environment.join_host_port(host, port)}"
        if debug:
            log.error("not serving the %s: %s", what, err)
            return None
        raise SystemExit(f"ratelimit: cannot serve the {what}: {err.strerror or err}") from None


# Upstream's binary listens on every address: settings.go defaults HOST, GRPC_HOST and DEBUG_HOST
# to 0.0.0.0 (an empty value, too, is every address to Go's net.Listen). `python -m ratelimit`
# keeps to 127.0.0.1 unless told; `ratelimit`, the image's /bin/ratelimit, is upstream's binary.
UPSTREAM_HOSTS = ("HOST", "GRPC_HOST", "DEBUG_HOST")


def upstream_environment(environ: dict[str, str]) -> None:
    """Upstream's listening defaults filled into `environ` (workers inherit them)."""
    for name in UPSTREAM_HOSTS:
        if not environ.get(name):
            environ[name] = "0.0.0.0"


def upstream_main() -> None:
    """`ratelimit`: as envoyproxy/ratelimit's binary, which Envoy Gateway runs as /bin/ratelimit
    with its settings in the environment."""
    upstream_environment(os.environ)  # type: ignore[arg-type]
    main()


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_args(argv)
    check_tls_files(settings.grpc_tls)
    workers.enter(
        "ratelimit",
        settings.workers,
        settings.worker_index,
        settings.redis is not None,
        sys.argv[1:] if argv is None else argv,
    )
    setup_process(settings.log_level)
    try:
        uvloop.run(serve(settings))
    except ConfigError as err:
        raise SystemExit(f"ratelimit: {err}") from None
    except (RedisAuthFailed, OSError) as err:
        reason = startup_failure(err, settings.redis_password_file)
        if reason is None:
            raise
        raise SystemExit(f"ratelimit: {reason}") from None
