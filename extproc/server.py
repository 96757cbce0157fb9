"""`python -m extproc`: the ext_proc + access-log gRPC server and its metrics endpoint."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import uvloop
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from prometheus_client import start_http_server

from arks import workers
from arks.adapters.grpc_server import start_grpc
from arks.adapters.kube.client import api_client
from arks.adapters.ledger import open_ledger
from arks.adapters.redis.backend import RedisBackend
from arks.adapters.redis.budgets import RedisBudgets
from arks.adapters.redis.client import (
    RedisAuthFailed,
    check_auth,
    read_password,
    startup_failure,
)
from arks.lifecycle import every, export_process_metrics, run_until_signalled, setup_process
from arks.limits.backends import BackendUnavailable, MemoryBackend
from arks.limits.budgets import MemoryBudgets
from arks.limits.config import RateLimitConfig
from arks.limits.limiter import Enforcement, Limiter
from arks.limits.metrics import RateLimitMetrics
from arks.metric_rules import enforce
from arks.policy import FilePolicySource
from extproc import qos, settlement
from extproc.admission import AdmissionControl
from extproc.cluster_policy import ClusterPolicySource
from extproc.context import Context
from extproc.durability import DurableCopy, QuotaSnapshots, QuotaStatus, StateFile
from extproc.inflight import InFlight
from extproc.ledger import LedgerWriter, WriterSettings, with_password
from extproc.levels import LevelGauges, Levels
from extproc.metrics import GatewayMetrics, LedgerMetrics
from extproc.model_info import endpoint_engines, fetch_forever
from extproc.picking.discovery import ClusterEngines
from extproc.picking.scraping import EngineSets, picking_endpoints, scrape_forever
from extproc.picking.service import Picking, PickSettings
from extproc.reported import RedisReported, SingleReplica
from extproc.response_homes import MemoryHomes, RedisHomes
from extproc.servicer import AccessLogReceiver, EarlyAuth, ExternalProcessor

USER_AGENT = "arks-extproc"  # how the API server's audit log names our requests

log = logging.getLogger("extproc")


@dataclass(frozen=True)
class Settings:
    policy: Path | None = None
    kube_host: str | None = (
        None  # an API server URL (plain HTTP: tests); "in-cluster" or "kubeconfig"
    )
    kube_namespace: str | None = None  # None: every namespace
    grpc_address: str = "127.0.0.1:50051"
    metrics_port: int = 9101
    metrics_address: str = "127.0.0.1"
    log_level: str = "INFO"
    redis: str | None = None  # counters for rate limits; None keeps them in this process
    redis_password_file: Path | None = None  # Redis AUTH (a mounted Secret key)
    fail_closed: bool = False  # refuse rate-limited requests while Redis is unreachable
    quota_default_max_tokens: int = 1024  # reserved when a request sets no max_tokens
    state_file: Path | None = None  # quota usage snapshots (local mode's durable copy)
    snapshot_interval_s: float = 5.0
    # Longer than the longest answer (Envoy's route timeout) plus the access log's flush delay.
    usage_settle_timeout_s: float = 630.0
    # Leases (quota, tpm/tpd, concurrency) live this long unless renewed while their request runs:
    # those of a gateway process that died are free again within it.
    lease_ttl_s: float = 60.0
    picker_fail_closed: bool = (
        False  # 503 when a least-load/prefix-cache endpoint has no engine to pick
    )
    picker_interval_s: float = 0.5  # how often those endpoints' engines are scraped
    ledger: str | None = None  # the usage ledger's database URL; None: no ledger
    ledger_password_file: Path | None = None  # the database's password (a mounted Secret key)
    ledger_spill: Path | None = None  # where records go when the writer's queue is full
    ledger_queue_size: int = WriterSettings.queue_size
    ledger_batch_size: int = WriterSettings.batch_size
    workers: int = 1  # processes on one port (`arks.workers`); above 1 needs Redis
    worker_index: int | None = None  # set in a worker: its metrics port is metrics_port + this

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> Settings:
        parser = argparse.ArgumentParser(prog="python -m extproc", description=__doc__)
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--policy", type=Path, help="policy YAML file (reloaded on change)")
        source.add_argument(
            "--kube-host",
            metavar="URL|in-cluster|kubeconfig",
            help="read the policy from the cluster's API server (watches)",
        )
        parser.add_argument("--kube-namespace", help="only this namespace (default: all)")
        parser.add_argument("--grpc-address", default=cls.grpc_address)
        parser.add_argument("--metrics-port", type=int, default=cls.metrics_port)
        parser.add_argument("--metrics-address", default=cls.metrics_address)
        parser.add_argument("--log-level", default=cls.log_level)
        parser.add_argument(
            "--redis",
            metavar="URL",
            help="Redis for counters and budgets: redis://host:port/db, "
            "redis+cluster://host:port,..., redis+sentinel://host:port,.../master "
            "(default: in memory)",
        )
        parser.add_argument(
            "--redis-password-file",
            type=Path,
            help="file holding Redis's password (a mounted Secret key; default: no AUTH)",
        )
        parser.add_argument(
            "--fail-closed", action="store_true", help="refuse limited requests while Redis is down"
        )
        parser.add_argument(
            "--quota-default-max-tokens",
            type=int,
            default=cls.quota_default_max_tokens,
            help="completion tokens reserved against a quota when the request sets no max_tokens",
        )
        parser.add_argument(
            "--state-file", type=Path, help="where quota usage is snapshotted and restored from"
        )
        parser.add_argument("--snapshot-interval-s", type=float, default=cls.snapshot_interval_s)
        parser.add_argument(
            "--usage-settle-timeout-s",
            type=float,
            default=cls.usage_settle_timeout_s,
            help="charge an admitted request's estimate when its usage has not arrived after this long",
        )
        parser.add_argument(
            "--lease-ttl-s",
            type=float,
            default=cls.lease_ttl_s,
            help="leases of requests in flight are renewed every quarter of this; a dead "
            "gateway's leases (concurrency slots, reservations) are free again within it",
        )
        parser.add_argument(
            "--picker-fail-closed",
            action="store_true",
            help="answer 503 when a least-load or prefix-cache endpoint has no engine to pick "
            "(default: let Envoy balance over its engines)",
        )
        parser.add_argument(
            "--picker-interval-s",
            type=float,
            default=cls.picker_interval_s,
            help="how often the engines of picking endpoints are scraped",
        )
        parser.add_argument(
            "--ledger",
            metavar="URL",
            help="record every finished request's usage in this database: sqlite:///PATH or "
            "postgresql://USER@HOST/DB (default: no ledger)",
        )
        parser.add_argument(
            "--ledger-password-file",
            type=Path,
            help="file holding the ledger database's password (a mounted Secret key; default: "
            "the URL's, or libpq's PGPASSWORD or ~/.pgpass)",
        )
        parser.add_argument(
            "--ledger-spill",
            type=Path,
            help="append-only file for usage records that find the writer's queue full, "
            "replayed into the database once it takes writes again (default: such records "
            "are dropped and counted)",
        )
        parser.add_argument(
            "--ledger-queue-size",
            type=int,
            default=cls.ledger_queue_size,
            help="usage records kept in memory while the database is slow or away",
        )
        parser.add_argument(
            "--ledger-batch-size",
            type=int,
            default=cls.ledger_batch_size,
            help="usage records per database transaction",
        )
        workers.add_arguments(parser)
        return cls(**vars(parser.parse_args(argv)))

    @property
    def own_metrics_port(self) -> int:
        """This process's metrics port: a worker's is the base port plus its index."""
        return self.metrics_port + (self.worker_index or 0)


@dataclass(frozen=True)
class ServiceMetrics:
    """Everything the gateway's /metrics serves, on one registry."""

    gateway: GatewayMetrics
    limits: RateLimitMetrics
    levels: LevelGauges
    ledger: LedgerMetrics


def create_metrics() -> ServiceMetrics:
    """The gateway's registry, checked against the cardinality rules (a violation stops the
    start-up: `arks.metric_rules`)."""
    gateway = GatewayMetrics.create()
    export_process_metrics(gateway.registry, "extproc")
    created = ServiceMetrics(
        gateway,
        RateLimitMetrics.create(gateway.registry),
        LevelGauges(gateway.registry),
        LedgerMetrics.create(gateway.registry),
    )
    enforce(gateway.registry, "extproc")
    return created


def policy_source(settings: Settings) -> FilePolicySource | ClusterPolicySource:
    if settings.policy is not None:
        return FilePolicySource(settings.policy)
    assert settings.kube_host is not None  # the flags ask for one of the two
    cluster = ClusterPolicySource(
        api_client(settings.kube_host, USER_AGENT), settings.kube_namespace
    )
    cluster.start()
    return cluster


def ledger_writer(settings: Settings, metrics: LedgerMetrics) -> LedgerWriter | None:
    """The usage ledger's writer, when `--ledger` names a database (opened lazily: an absent
    database delays the records, never the gateway's start)."""
    if settings.ledger is None:
        return None
    url = settings.ledger
    if settings.ledger_password_file is not None:
        url = with_password(url, read_password(settings.ledger_password_file))
    return LedgerWriter(
        open_ledger(url),
        metrics,
        settings.ledger_spill,
        WriterSettings(
            queue_size=settings.ledger_queue_size, batch_size=settings.ledger_batch_size
        ),
    )


async def serve(settings: Settings) -> None:
    password = read_password(settings.redis_password_file) if settings.redis_password_file else None
    if settings.redis:
        await check_auth(settings.redis, password, timeout_s=2.0)
    source = policy_source(settings)
    budgets = RedisBudgets(settings.redis, password=password) if settings.redis else MemoryBudgets()
    durable: DurableCopy | None = StateFile(settings.state_file) if settings.state_file else None
    engines: EngineSets = picking_endpoints
    model_engines: EngineSets = endpoint_engines  # whose /v1/models say max_model_len
    cluster_engines: ClusterEngines | None = None
    if isinstance(source, ClusterPolicySource):
        durable = QuotaStatus(source.api_client, source.status_of)
        # Envoy Gateway routes in a cluster: pick among the hosts of each endpoint's HTTPRoute.
        cluster_engines = ClusterEngines(source.api_client, source.namespace)
        cluster_engines.start()
        engines = cluster_engines.picking_endpoints
        model_engines = engines  # Services EG balances are not asked (their hosts are not known)
    snapshots = QuotaSnapshots(budgets, source, durable, time.time)
    service_metrics = create_metrics()
    metrics = service_metrics.gateway
    picking = Picking(
        PickSettings(
            fail_closed=settings.picker_fail_closed,
            interval_s=settings.picker_interval_s,
            scrape_timeout_s=min(0.8 * settings.picker_interval_s, 1.0),
            max_pick_age_s=settings.usage_settle_timeout_s,
        ),
        metrics,
    )
    counters = (
        RedisBackend(settings.redis, password=password) if settings.redis else MemoryBackend()
    )
    levels = Levels(service_metrics.levels, budgets, counters)
    admission = AdmissionControl(
        limiter=Limiter(
            config=RateLimitConfig,  # tokens' limits come as overrides; nothing is configured
            backend=counters,
            metrics=service_metrics.limits,
            clock=time.time,
            enforcement=Enforcement(fail_open=not settings.fail_closed),
            own_domains=frozenset({qos.DOMAIN}),
        ),
        budgets=budgets,
        policy=source,
        clock=time.time,
        lease_ttl_s=settings.lease_ttl_s,
        hold_max_s=settings.usage_settle_timeout_s,
        default_max_tokens=settings.quota_default_max_tokens,
        on_settled=snapshots.charged,
    )
    writer = ledger_writer(settings, service_metrics.ledger)
    if writer is not None:  # quota budgets a store lost are rebuilt from the ledger
        snapshots.ledger = writer.store
        snapshots.pending = writer.unwritten
        snapshots.ledger_ready = lambda: writer.ready
    ctx = Context(
        ledger=writer,
        policy=source,
        metrics=metrics,
        inflight=InFlight(max_age=settings.usage_settle_timeout_s, recheck=bool(settings.redis)),
        admission=admission,
        now=lambda: datetime.now(UTC),
        monotonic=time.monotonic,
        reported=(
            RedisReported(
                settings.redis, ttl_s=2 * settings.usage_settle_timeout_s, password=password
            )
            if settings.redis
            else SingleReplica()
        ),
        picking=picking,
        homes=RedisHomes(settings.redis, password=password) if settings.redis else MemoryHomes(),
    )

    metrics.pending.set_function(lambda: len(ctx.inflight))
    if writer is not None:
        writer.start()  # migrates the schema first, retrying while the database is away

    def register(server: grpc.aio.Server) -> None:
        ep_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(ctx), server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogReceiver(ctx), server)
        authz_grpc.add_AuthorizationServicer_to_server(EarlyAuth(ctx), server)

    grpc_server = await start_grpc(settings.grpc_address, register, reuse_port=settings.workers > 1)
    # What start-up made (modules, protobuf descriptors, the clients, the policy so far) lives as
    # long as the process: frozen, the collector's full passes no longer walk it, and they were
    # the request loop's longest stalls (chat at c=1: p99.9 17-20 ms -> 6 ms, max 36-40 ms -> 7-9
    # ms; p50 and CPU per request unchanged).
    gc.freeze()
    start_http_server(
        settings.own_metrics_port, settings.metrics_address, registry=metrics.registry
    )
    log.info(
        "extproc%s serving gRPC on %s, metrics on %s:%d",
        "" if settings.worker_index is None else f" worker {settings.worker_index}",
        settings.grpc_address,
        settings.metrics_address,
        settings.own_metrics_port,
    )

    last_snapshot = 0.0
    last_renewal = time.monotonic()

    async def housekeeping() -> None:
        nonlocal last_snapshot, last_renewal
        try:
            # In a thread: a policy file of many thousands of objects takes a second to parse,
            # and on the request loop that second stalled every request. (The thread holds the
            # interpreter in turns: requests are slower meanwhile, never stopped.)
            if await asyncio.to_thread(source.reload_if_changed):
                metrics.policy_reloads.inc()
            await settlement.release_reported_elsewhere(ctx)
            if lost := await settlement.expire_unreported(ctx):
                log.warning(
                    "%d admitted requests had no access-log entry; charged their estimate", lost
                )
            await snapshots.restore_lost()  # a Redis that came back empty: before anything else
            await admission.retry_unsettled()
            if time.monotonic() - last_renewal >= settings.lease_ttl_s / 4:
                last_renewal = time.monotonic()
                await admission.renew_leases()
            if time.monotonic() - last_snapshot >= settings.snapshot_interval_s:
                last_snapshot = time.monotonic()
                await snapshots.turn()
                # The budget and rate-limit gauges: from the timer, never per request.
                await levels.refresh(source.current(), snapshots.snapshot or {}, time.time())
        except BackendUnavailable as err:  # expected while Redis is away: no traceback
            log.warning("housekeeping: the counter store is unavailable (%s); retrying", err)

    async def shutdown() -> None:
        await grpc_server.stop()
        if writer is not None:  # after the access log stopped: its last entries are recorded
            await writer.close()
            await writer.store.close()
        if cluster_engines is not None:
            cluster_engines.stop(timeout_s=0)  # daemon threads: an open watch need not end first

    await run_until_signalled(
        every(0.5, housekeeping, log),
        scrape_forever(picking, source, engines),
        fetch_forever(ctx.model_lens, source, model_engines),
        shutdown=shutdown,
    )


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_args(argv)
    workers.enter(
        "extproc",
        settings.workers,
        settings.worker_index,
        settings.redis is not None,
        sys.argv[1:] if argv is None else argv,
    )
    setup_process(settings.log_level)
    try:
        uvloop.run(serve(settings))
    except (RedisAuthFailed, OSError) as err:
        reason = startup_failure(err, settings.redis_password_file)
        if reason is None:
            raise
        raise SystemExit(f"extproc: {reason}") from None
