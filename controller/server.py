"""`python -m controller` (also `arks controller`): reconcile the arks.ai/v1 resources of a cluster.

Several replicas are safe: they elect a leader on a Lease, and only the leader reconciles.

ArksEndpoints not on `weighting: static` weigh their applications by live engine load: every
replica scrapes the serving engine pods' `/metrics` every `--scrape-interval-s`
(`controller.load.cluster`), the leader writes the weights into the HTTPRoutes.

With `--policy FILE` it runs standalone instead (what `arks up` starts): no cluster, the same
objects from a file, Envoy programmed over xDS with weights from the engines' live load.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from arks.adapters.kube import rest
from arks.adapters.kube.client import IN_CLUSTER, api_client
from arks.adapters.kube.leader import LeaderElector
from arks.envoy_config import EnvoySettings
from arks.lifecycle import export_process_metrics, setup_process
from arks.metric_rules import enforce
from arks.policy import FilePolicySource
from arks.resources import LEADERWORKERSETS
from controller.load.cluster import ClusterLoad
from controller.metrics import ControllerMetrics, serve
from controller.reconcilers.application import application_controller
from controller.reconcilers.disaggregated import disaggregated_controller
from controller.reconcilers.endpoint import endpoint_controller
from controller.reconcilers.model import model_controller
from controller.reconcilers.token import token_controller
from controller.render.model import DEFAULT_CACHE_ROOT, ModelDefaults, nested_cache_roots
from controller.render.workload import RenderDefaults
from controller.standalone import Standalone, serve_http

log = logging.getLogger("controller")


USER_AGENT = "arks-controller"  # how the API server's audit log names our requests


def gateway_ref(value: str) -> dict[str, str]:
    namespace, _, name = value.rpartition("/")
    return {"name": name, "namespace": namespace} if namespace else {"name": name}


# Envoy's limits on slow and idle clients (EnvoySettings), settable standalone: tests shorten them.
_CLIENT_TIMEOUTS = (
    ("request_timeout_s", "Envoy's limit on receiving a whole request, body included"),
    ("request_headers_timeout_s", "Envoy's limit on receiving a request's headers"),
    ("idle_timeout_s", "Envoy closes a client connection with nothing in flight after this long"),
)


# The images of the model Jobs and the cache pods (ModelDefaults), each holding its CLI already.
_IMAGES = (
    ("huggingface", "image of Hugging Face download Jobs: has the `hf` CLI"),
    ("modelscope", "image of ModelScope download Jobs: has the `modelscope` CLI"),
    ("s3", "image of S3 download Jobs: has the `aws` CLI"),
    ("url", "image of URL download Jobs: has curl, tar and unzip"),
    ("cache", "image of the node-cache pods: has sh, cp, df and du"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m controller", description=__doc__)
    p.add_argument("--kube-host", default="in-cluster", metavar="URL|in-cluster|kubeconfig")
    standalone = p.add_argument_group("standalone (no cluster)")
    standalone.add_argument(
        "--policy", type=Path, help="run standalone with this policy file (reloaded on change)"
    )
    standalone.add_argument(
        "--xds-address", default="127.0.0.1:18000", help="where Envoy's ADS connects"
    )
    standalone.add_argument(
        "--listen-address", default="127.0.0.1", help="Envoy's listener address"
    )
    standalone.add_argument("--listen-port", type=int, default=8080, help="Envoy's listener port")
    standalone.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        metavar="ORIGIN",
        help="a browser origin allowed to call the API, e.g. https://app.example.com (repeatable; "
        "`*`: any); default: none, no CORS headers",
    )
    standalone.add_argument(
        "--trust-client-request-id",
        action="store_true",
        help="keep a client's x-request-id (only behind a trusted front proxy that sets it)",
    )
    for field, help_text in _CLIENT_TIMEOUTS:
        standalone.add_argument(
            "--" + field.replace("_", "-"),
            type=int,
            default=getattr(EnvoySettings, field),
            help=help_text,
        )
    p.add_argument(
        "--scrape-interval-s",
        type=float,
        default=1.0,
        help="engine /metrics scrape period, for load-based weights (both modes)",
    )
    p.add_argument("--namespace", help="only this namespace (default: all)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "arks-system"))
    p.add_argument("--lease-name", default="arks-controller")
    p.add_argument("--identity", default=f"{socket.gethostname()}-{os.getpid()}")
    p.add_argument(
        "--watch-leaderworkersets",
        choices=("auto", "yes", "no"),
        default="auto",
        help="watch LeaderWorkerSets (multi-node engines); auto: when the LWS CRD is installed",
    )
    p.add_argument(
        "--default-gateway",
        default="arks-system/arks-gateway",
        metavar="NAMESPACE/NAME",
        help="the Gateway HTTPRoutes of ArksEndpoints without a gatewayRef attach to",
    )
    p.add_argument(
        "--prometheus-url",
        default=RenderDefaults.prometheus_url,
        metavar="URL",
        help="the Prometheus KEDA's triggers query (ArksApplication autoscaling.provider: keda)",
    )
    workloads = p.add_argument_group("what the controller renders")
    workloads.add_argument(
        "--dynamo-etcd-endpoints",
        default="",
        help="etcd of the Dynamo platform (ETCD_ENDPOINTS of Dynamo pods), e.g. "
        "http://dynamo-platform-etcd.dynamo-system:2379; unset: Dynamo applications are refused",
    )
    workloads.add_argument(
        "--dynamo-nats-server",
        default="",
        help="NATS of the Dynamo platform (NATS_SERVER), e.g. "
        "nats://dynamo-platform-nats.dynamo-system:4222; unset: NATS_SERVER is not set",
    )
    workloads.add_argument(
        "--cache-namespace",
        default=ModelDefaults.cache_namespace,
        help="namespace of the node-cache DaemonSets (hostPath: Pod Security privileged)",
    )
    workloads.add_argument(
        "--cache-root",
        dest="cache_roots",
        action="append",
        metavar="DIR",
        help="a host directory node caches may use (nodeCache.path equal to it; repeatable, "
        f"none inside another; default {DEFAULT_CACHE_ROOT})",
    )
    workloads.add_argument(
        "--cache-reserve-bytes",
        type=int,
        default=ModelDefaults.cache_reserve_bytes,
        help="free disk a node-cache copy must leave on the node",
    )
    for source, help_text in _IMAGES:
        workloads.add_argument(
            f"--{source}-image",
            default=getattr(ModelDefaults, f"{source.replace('-', '_')}_image"),
            help=help_text,
        )
    p.add_argument("--metrics-port", type=int, default=9103, help="/metrics, /healthz, /readyz")
    p.add_argument("--metrics-address", default="0.0.0.0")
    p.add_argument("--log-level", default="INFO")
    return p


@dataclass(frozen=True)
class Settings:
    """The controller's options, read once in `main` (see `build_parser` for their help)."""

    kube_host: str = IN_CLUSTER
    policy: Path | None = None  # standalone: no cluster
    xds_address: str = "127.0.0.1:18000"
    listen_address: str = "127.0.0.1"
    listen_port: int = 8080
    cors_origins: list[str] | None = None  # None: no CORS
    trust_client_request_id: bool = False
    request_timeout_s: int = EnvoySettings.request_timeout_s
    request_headers_timeout_s: int = EnvoySettings.request_headers_timeout_s
    idle_timeout_s: int = EnvoySettings.idle_timeout_s
    scrape_interval_s: float = 1.0
    namespace: str | None = None  # None: every namespace
    workers: int = 2
    lease_namespace: str = "arks-system"
    lease_name: str = "arks-controller"
    identity: str = ""
    watch_leaderworkersets: str = "auto"  # auto, yes or no
    default_gateway: str = "arks-system/arks-gateway"
    prometheus_url: str = RenderDefaults.prometheus_url
    metrics_port: int = 9103
    metrics_address: str = "0.0.0.0"
    log_level: str = "INFO"
    dynamo_etcd_endpoints: str = ""
    dynamo_nats_server: str = ""
    huggingface_image: str = ModelDefaults.huggingface_image
    modelscope_image: str = ModelDefaults.modelscope_image
    s3_image: str = ModelDefaults.s3_image
    url_image: str = ModelDefaults.url_image
    cache_image: str = ModelDefaults.cache_image
    cache_namespace: str = ModelDefaults.cache_namespace
    cache_reserve_bytes: int = ModelDefaults.cache_reserve_bytes
    cache_roots: list[str] | None = None  # None: ModelDefaults' (DEFAULT_CACHE_ROOT)

    def _cache_roots(self) -> tuple[str, ...]:
        return tuple(self.cache_roots) if self.cache_roots else ModelDefaults.cache_roots

    def render_defaults(self) -> RenderDefaults:
        return RenderDefaults(
            dynamo_etcd_endpoints=self.dynamo_etcd_endpoints,
            dynamo_nats_server=self.dynamo_nats_server,
            cache_roots=self._cache_roots(),
            prometheus_url=self.prometheus_url,
        )

    def model_defaults(self) -> ModelDefaults:
        return ModelDefaults(
            huggingface_image=self.huggingface_image,
            modelscope_image=self.modelscope_image,
            s3_image=self.s3_image,
            url_image=self.url_image,
            cache_image=self.cache_image,
            cache_namespace=self.cache_namespace,
            cache_reserve_bytes=self.cache_reserve_bytes,
            cache_roots=self._cache_roots(),
        )

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> Settings:
        parser = build_parser()
        settings = cls(**vars(parser.parse_args(argv)))
        nested = nested_cache_roots(settings.cache_roots or [])
        if nested:
            parser.error(f"--cache-root {nested[1]} lies inside --cache-root {nested[0]}")
        return settings


def run_standalone(settings: Settings, policy: Path) -> int:
    envoy = EnvoySettings(
        listen_port=settings.listen_port,
        admin_port=0,
        extproc_port=0,
        listen_address=settings.listen_address,
        cors_origins=tuple(settings.cors_origins or ()),
        trust_client_request_id=settings.trust_client_request_id,
        request_timeout_s=settings.request_timeout_s,
        request_headers_timeout_s=settings.request_headers_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
    )
    state = Standalone(
        FilePolicySource(policy), envoy, settings.xds_address, interval_s=settings.scrape_interval_s
    )
    export_process_metrics(state.metrics.registry, "controller")
    enforce(state.metrics.registry, "controller")  # the cardinality rules: fail fast

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        http = await serve_http(state, settings.metrics_address, settings.metrics_port)
        try:
            await state.run(stop)
        finally:
            await http.cleanup()

    asyncio.run(main())
    return 0


def run(settings: Settings) -> int:
    setup_process(settings.log_level)
    if settings.policy is not None:
        return run_standalone(settings, settings.policy)
    client = api_client(settings.kube_host, USER_AGENT)
    watch_lws = settings.watch_leaderworkersets == "yes" or (
        settings.watch_leaderworkersets == "auto" and rest.serves(client, LEADERWORKERSETS)
    )
    log.info("LeaderWorkerSets %s", "watched" if watch_lws else "not watched (CRD not installed)")
    elector = LeaderElector(
        client, settings.lease_namespace, settings.lease_name, settings.identity
    )
    metrics = ControllerMetrics()
    load = ClusterLoad(
        client,
        settings.namespace,
        interval_s=settings.scrape_interval_s,
        metrics=metrics.engines,
    )
    controllers = [
        application_controller(
            client,
            settings.namespace,
            workers=settings.workers,
            leader=elector,
            watch_leaderworkersets=watch_lws,
            defaults=settings.render_defaults(),
        ),
        disaggregated_controller(
            client,
            settings.namespace,
            workers=settings.workers,
            leader=elector,
            watch_leaderworkersets=watch_lws,
            defaults=settings.render_defaults(),
        ),
        model_controller(
            client,
            settings.namespace,
            workers=settings.workers,
            leader=elector,
            defaults=settings.model_defaults(),
        ),
        endpoint_controller(
            client,
            settings.namespace,
            workers=settings.workers,
            leader=elector,
            default_gateway=gateway_ref(settings.default_gateway),
            load=load,
        ),
        token_controller(client, settings.namespace, workers=settings.workers, leader=elector),
    ]
    export_process_metrics(metrics.registry, "controller")
    enforce(metrics.registry, "controller")  # the cardinality rules: fail fast
    metrics.leader.set_function(lambda: 1.0 if elector.is_leader() else 0.0)
    for c in controllers:
        c.instrument(metrics)
        metrics.known(c.name)
    http = serve(
        settings.metrics_address,
        settings.metrics_port,
        metrics,
        lambda: load.synced() and all(c.synced() for c in controllers),
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    elector.start()
    load.start()
    for c in controllers:
        c.start()
    log.info("controller %s running (namespace %s)", settings.identity, settings.namespace or "all")
    stop.wait()
    for c in controllers:
        c.stop()
    load.stop()
    elector.stop()
    http.shutdown()
    return 0


def main(argv: list[str] | None = None) -> None:
    raise SystemExit(run(Settings.from_args(argv)))
