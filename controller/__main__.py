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
from pathlib import Path
from typing import Any

import kubernetes

from arks.adapters.kube import rest
from arks.adapters.kube.leader import LeaderElector
from arks.envoy_config import EnvoySettings
from arks.lifecycle import setup_process
from arks.policy import FilePolicySource
from arks.resources import LEADERWORKERSETS
from controller.load.cluster import ClusterLoad
from controller.metrics import ControllerMetrics, serve
from controller.reconcilers.application import application_controller
from controller.reconcilers.disaggregated import disaggregated_controller
from controller.reconcilers.endpoint import endpoint_controller
from controller.reconcilers.model import model_controller
from controller.reconcilers.token import token_controller
from controller.standalone import Standalone, serve_http

log = logging.getLogger("controller")


USER_AGENT = "arks-controller"  # how the API server's audit log names our requests


def api_client(kube_host: str) -> Any:
    if kube_host == "in-cluster":
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
        client = kubernetes.client.ApiClient()
    elif kube_host == "kubeconfig":
        client = kubernetes.config.new_client_from_config()  # type: ignore[no-untyped-call]
    else:
        client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=kube_host))
    client.user_agent = USER_AGENT
    return client


def gateway_ref(value: str) -> dict[str, str]:
    namespace, _, name = value.rpartition("/")
    return {"name": name, "namespace": namespace} if namespace else {"name": name}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m controller", description=__doc__)
    p.add_argument("--kube-host", default="in-cluster", metavar="URL|in-cluster|kubeconfig")
    standalone = p.add_argument_group("standalone (no cluster)")
    standalone.add_argument("--policy", type=Path, help="run standalone with this policy file (reloaded on change)")
    standalone.add_argument("--xds-address", default="127.0.0.1:18000", help="where Envoy's ADS connects")
    standalone.add_argument("--listen-address", default="127.0.0.1", help="Envoy's listener address")
    standalone.add_argument("--listen-port", type=int, default=8080, help="Envoy's listener port")
    p.add_argument(
        "--scrape-interval-s", type=float, default=1.0,
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
    p.add_argument("--metrics-port", type=int, default=9103, help="/metrics, /healthz, /readyz")
    p.add_argument("--metrics-address", default="0.0.0.0")
    p.add_argument("--log-level", default="INFO")
    return p


def run_standalone(args: argparse.Namespace) -> int:
    settings = EnvoySettings(
        listen_port=args.listen_port, admin_port=0, extproc_port=0, listen_address=args.listen_address
    )
    state = Standalone(
        FilePolicySource(args.policy), settings, args.xds_address, interval_s=args.scrape_interval_s
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        http = await serve_http(state, args.metrics_address, args.metrics_port)
        try:
            await state.run(stop)
        finally:
            await http.cleanup()

    asyncio.run(main())
    return 0


def run(args: argparse.Namespace) -> int:
    setup_process(args.log_level)
    if args.policy is not None:
        return run_standalone(args)
    client = api_client(args.kube_host)
    watch_lws = args.watch_leaderworkersets == "yes" or (
        args.watch_leaderworkersets == "auto" and rest.serves(client, LEADERWORKERSETS)
    )
    log.info("LeaderWorkerSets %s", "watched" if watch_lws else "not watched (CRD not installed)")
    elector = LeaderElector(client, args.lease_namespace, args.lease_name, args.identity)
    load = ClusterLoad(client, args.namespace, interval_s=args.scrape_interval_s)
    controllers = [
        application_controller(
            client, args.namespace, workers=args.workers, leader=elector,
            watch_leaderworkersets=watch_lws,
        ),
        disaggregated_controller(
            client, args.namespace, workers=args.workers, leader=elector,
            watch_leaderworkersets=watch_lws,
        ),
        model_controller(client, args.namespace, workers=args.workers, leader=elector),
        endpoint_controller(
            client, args.namespace, workers=args.workers, leader=elector,
            default_gateway=gateway_ref(args.default_gateway), load=load,
        ),
        token_controller(client, args.namespace, workers=args.workers, leader=elector),
    ]
    metrics = ControllerMetrics()
    metrics.leader.set_function(lambda: 1.0 if elector.is_leader() else 0.0)
    for c in controllers:
        c.instrument(metrics)
    http = serve(
        args.metrics_address, args.metrics_port, metrics,
        lambda: load.synced() and all(c.synced() for c in controllers),
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    elector.start()
    load.start()
    for c in controllers:
        c.start()
    log.info("controller %s running (namespace %s)", args.identity, args.namespace or "all")
    stop.wait()
    for c in controllers:
        c.stop()
    load.stop()
    elector.stop()
    http.shutdown()
    return 0


def main(argv: list[str] | None = None) -> None:
    raise SystemExit(run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
