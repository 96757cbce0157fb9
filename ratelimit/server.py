"""`python -m ratelimit`: Envoy's global rate-limit service, on Redis or in memory."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvloop
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from prometheus_client import start_http_server

from arks import workers
from arks.adapters.grpc_server import start_grpc
from arks.adapters.redis.backend import RedisBackend
from arks.adapters.redis.client import (
    RedisAuthFailed,
    check_auth,
    read_password,
    startup_failure,
)
from arks.lifecycle import every, export_process_metrics, run_until_signalled, setup_process
from arks.limits.backends import BackendUnavailable, CounterBackend, MemoryBackend
from arks.limits.config import ConfigError, RateLimitConfig, load_config
from arks.limits.limiter import Enforcement, Limiter
from arks.limits.metrics import RateLimitMetrics
from arks.metric_rules import enforce
from ratelimit.codec import HeaderNames
from ratelimit.metrics import CallMetrics
from ratelimit.servicer import RateLimitService

log = logging.getLogger("ratelimit")


@dataclass(frozen=True)
class Settings:
    config: tuple[Path, ...] = ()
    grpc_address: str = "127.0.0.1:8081"
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9102
    redis: str | None = None  # None: counters in this process's memory
    redis_password_file: Path | None = None  # Redis AUTH (a mounted Secret key)
    redis_timeout_s: float = 0.5
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
    workers: int = 1  # processes on one port (`arks.workers`); above 1 needs Redis
    worker_index: int | None = None  # set in a worker: its metrics port is metrics_port + this

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> Settings:
        p = argparse.ArgumentParser(prog="python -m ratelimit", description=__doc__)
        p.add_argument(
            "--config",
            type=Path,
            action="append",
            default=[],
            help="envoyproxy/ratelimit YAML file or directory (repeatable; reloaded on change)",
        )
        p.add_argument("--grpc-address", default=cls.grpc_address)
        p.add_argument("--metrics-address", default=cls.metrics_address)
        p.add_argument("--metrics-port", type=int, default=cls.metrics_port)
        p.add_argument(
            "--redis", metavar="URL", help="redis://host:port/db (default: counters in memory)"
        )
        p.add_argument(
            "--redis-password-file",
            type=Path,
            help="file holding Redis's password (a mounted Secret key; default: no AUTH)",
        )
        p.add_argument("--redis-timeout-s", type=float, default=cls.redis_timeout_s)
        p.add_argument(
            "--fail-closed", action="store_true", help="refuse limited requests while Redis is down"
        )
        p.add_argument(
            "--shadow-mode",
            action="store_true",
            default=env_bool("SHADOW_MODE"),
            help="report over-limit in metrics, never enforce (upstream's SHADOW_MODE, also "
            "read from there)",
        )
        p.add_argument(
            "--quota-mode",
            action="store_true",
            default=env_bool("QUOTA_MODE"),
            help="every descriptor in quota mode: a request is over the limit only when all of "
            "its descriptors are (upstream's QUOTA_MODE, also read from there)",
        )
        p.add_argument("--near-ratio", type=float, default=cls.near_ratio)
        p.add_argument(
            "--response-headers",
            action="store_true",
            default=env_bool("LIMIT_RESPONSE_HEADERS_ENABLED"),
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
            default=env_bool("MERGE_DOMAIN_CONFIG"),
            help="merge the descriptors of every file of a domain, as envoyproxy/ratelimit's "
            "MERGE_DOMAIN_CONFIG (also read from that environment variable); without it a domain "
            "in two files is an error",
        )
        p.add_argument("--log-level", default=cls.log_level)
        workers.add_arguments(p)
        a = p.parse_args(argv)
        return cls(
            config=tuple(a.config),
            grpc_address=a.grpc_address,
            metrics_address=a.metrics_address,
            metrics_port=a.metrics_port,
            redis=a.redis,
            redis_password_file=a.redis_password_file,
            redis_timeout_s=a.redis_timeout_s,
            fail_open=not a.fail_closed,
            shadow_mode=a.shadow_mode,
            quota_mode=a.quota_mode,
            near_ratio=a.near_ratio,
            log_level=a.log_level,
            merge_domains=a.merge_domain_config,
            response_headers=(
                HeaderNames(a.limit_header, a.remaining_header, a.reset_header)
                if a.response_headers
                else None
            ),
            openai_body=a.openai_body,
            workers=a.workers,
            worker_index=a.worker_index,
        )

    @property
    def own_metrics_port(self) -> int:
        """This process's metrics port: a worker's is the base port plus its index."""
        return self.metrics_port + (self.worker_index or 0)


# envoyproxy/ratelimit reads its booleans with Go's strconv.ParseBool.
_TRUE, _FALSE = ("1", "t", "T", "TRUE", "true", "True"), ("0", "f", "F", "FALSE", "false", "False")


def env_bool(name: str) -> bool:
    """An upstream-style boolean environment variable (unset or empty: false)."""
    value = os.environ.get(name, "")
    if value in _TRUE:
        return True
    if value in ("", *_FALSE):
        return False
    raise SystemExit(f"ratelimit: {name}={value!r} is not a boolean (true or false)")


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


def create_metrics() -> tuple[RateLimitMetrics, CallMetrics]:
    """The service's registry, checked against the cardinality rules (a violation stops the
    start-up: `arks.metric_rules`)."""
    metrics = RateLimitMetrics.create()
    export_process_metrics(metrics.registry, "ratelimit")
    calls = CallMetrics.create(metrics.registry)
    enforce(metrics.registry, "ratelimit")
    return metrics, calls


def make_backend(settings: Settings, password: str | None) -> CounterBackend:
    if settings.redis:
        return RedisBackend(settings.redis, timeout_s=settings.redis_timeout_s, password=password)
    return MemoryBackend()


async def serve(settings: Settings) -> None:
    password = read_password(settings.redis_password_file) if settings.redis_password_file else None
    if settings.redis:
        await check_auth(settings.redis, password, timeout_s=2.0)
    metrics, calls = create_metrics()
    source = ConfigSource(settings.config, metrics, merge_domains=settings.merge_domains)
    backend = make_backend(settings, password)
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
        ),
    )

    def register(server: grpc.aio.Server) -> None:
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(
            RateLimitService(
                limiter,
                calls,
                headers=settings.response_headers,
                openai_body=settings.openai_body,
            ),
            server,
        )

    grpc_server = await start_grpc(
        settings.grpc_address,
        register,
        reuse_port=settings.workers > 1,
        # envoyproxy/ratelimit's name for its health, and the service's own.
        health_names=HEALTH_NAMES,
    )
    start_http_server(
        settings.own_metrics_port, settings.metrics_address, registry=metrics.registry
    )
    log.info(
        "ratelimit%s serving gRPC on %s (%s, %s), metrics on %s:%d",
        "" if settings.worker_index is None else f" worker {settings.worker_index}",
        settings.grpc_address,
        "redis" if settings.redis else "memory",
        "fail-open" if settings.fail_open else "fail-closed",
        settings.metrics_address,
        settings.own_metrics_port,
    )

    serving = True

    async def reload() -> None:
        nonlocal serving
        source.reload_if_changed()
        # As upstream: NOT_SERVING while Redis does not answer, SERVING again when it does.
        try:
            await backend.ping()
            healthy = True
        except BackendUnavailable:
            healthy = False
        if healthy != serving:
            serving = healthy
            await grpc_server.set_serving(healthy)
            log.warning(
                "health: %s",
                "SERVING (Redis answers)" if healthy else "NOT_SERVING (Redis does not answer)",
            )

    async def shutdown() -> None:
        await grpc_server.stop()
        await backend.close()

    await run_until_signalled(every(settings.reload_interval_s, reload, log), shutdown=shutdown)


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_args(argv)
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
