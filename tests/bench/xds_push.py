"""One engine's weight changes among many models: what the xDS push costs, state of the world
against delta (part of the traffic figures, `tests/bench/traffic.py`).

The controller's xDS server (in this process, on its own event loop thread) serves a real
Envoy `models` EDS clusters of three engines each. Per trial one engine of the last cluster gets
a new weight; the clock runs from the snapshot swap until Envoy answers the push (it ACKs once it
has applied it: the server's `arks_xds_answer_seconds` count, read in process, so the clock does
not load Envoy), and the config dump then shows the weight. Also per push: the resources and
bytes sent (from the server's counters and the snapshot) and Envoy's CPU (from its process
clock).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from arks import envoy_config
from arks.envoy_config import EnvoySettings
from controller.xds.cache import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    Snapshot,
    SnapshotCache,
    snapshot_from_json,
)
from controller.xds.server import XdsServer
from launcher.procs import Supervisor, free_port, wait_http
from launcher.stack import envoy_binary
from tests.bench import report
from tests.support.cpu import cpu_seconds

ADS = dict(envoy_config.ADS_SOURCE)


def _snapshot(models: int, listen_port: int, weight: int) -> Snapshot:
    """`models` clusters `m000`…; engine 0 of the last one weighs `weight`."""
    names = [f"m{i:03d}" for i in range(models)]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "rds": {"route_config_name": "bench", "config_source": ADS},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    listener = {
        "name": "bench",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }
    routes = [{"match": {"prefix": f"/{n}"}, "route": {"cluster": n}} for n in names]
    clusters = [
        {
            "name": n,
            "type": "EDS",
            "eds_cluster_config": {"eds_config": ADS},
            "connect_timeout": "1s",
            "lb_policy": "LEAST_REQUEST",
        }
        for n in names
    ]

    def assignment(i: int, name: str) -> dict[str, Any]:
        hosts = [
            {
                "endpoint": {
                    "address": {
                        "socket_address": {
                            "address": f"10.{i // 250}.{i % 250}.{e + 1}",
                            "port_value": 8000,
                        }
                    }
                },
                "load_balancing_weight": weight if (i == models - 1 and e == 0) else 50,
            }
            for e in range(3)
        ]
        return {
            "cluster_name": name,
            "endpoints": [{"locality": {"sub_zone": "pool"}, "lb_endpoints": hosts}],
        }

    return snapshot_from_json(
        f"w{weight}",
        {
            LISTENER: [listener],
            ROUTE: [
                {
                    "name": "bench",
                    "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
                }
            ],
            CLUSTER: clusters,
            ENDPOINT: [assignment(i, n) for i, n in enumerate(names)],
        },
    )


@dataclass
class Push:
    protocol: str
    models: int
    seconds: list[float] = field(default_factory=list)
    resources: float = 0.0  # EDS resources sent per push
    bytes: int = 0  # of those resources, per push
    envoy_cpu_s: float = 0.0  # per push


@contextmanager
def _server(cache: SnapshotCache, port: int, registry: CollectorRegistry) -> Iterator[None]:
    loop = asyncio.new_event_loop()
    server = XdsServer(cache, f"127.0.0.1:{port}", registry)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def _envoy_weight(admin: str, cluster: str) -> int | None:
    answer = httpx.get(
        f"{admin}/config_dump",
        params={
            "resource": "dynamic_endpoint_configs",
            "name_regex": f"^{cluster}$",
            "include_eds": "",
        },
        timeout=5,
    )
    if answer.status_code == 404:  # no endpoints yet
        return None
    dump = answer.json()
    for config in dump.get("configs", []):
        assignment = config.get("endpoint_config", {})
        for locality in assignment.get("endpoints", []):
            return int(locality["lb_endpoints"][0].get("load_balancing_weight", 1))
    return None


def _answers(registry: CollectorRegistry) -> float:
    """Envoy's ACKs and NACKs of endpoint pushes so far (the server's histogram count)."""
    return registry.get_sample_value("arks_xds_answer_seconds_count", {"type": "eds"}) or 0.0


def push(work: Path, delta: bool, models: int, trials: int) -> Push:
    out = Push("delta" if delta else "state of the world", models)
    xds_port, admin_port, listen_port = free_port(), free_port(), free_port()
    registry = CollectorRegistry()
    cache = SnapshotCache(_snapshot(models, listen_port, 50))
    last = f"m{models - 1:03d}"
    admin = f"http://127.0.0.1:{admin_port}"
    settings = EnvoySettings(
        listen_port=listen_port,
        admin_port=admin_port,
        extproc_port=free_port(),
        xds_port=xds_port,
        xds_delta=delta,
    )
    bootstrap = work / f"bootstrap-{out.protocol[0]}.json"
    bootstrap.write_text(json.dumps(envoy_config.bootstrap(settings, node_id="bench")))
    with _server(cache, xds_port, registry), Supervisor(log_dir=work / "logs") as sup:
        envoy = sup.start(
            "envoy",
            [
                envoy_binary(),
                "-c",
                str(bootstrap),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warning",
            ],
        )
        wait_http(envoy, f"{admin}/ready", timeout=60)
        while _envoy_weight(admin, last) != 50:
            time.sleep(0.05)
        sent_before = (
            registry.get_sample_value("arks_xds_resources_sent_total", {"type": "eds"}) or 0.0
        )
        cpu_s = 0.0
        for trial in range(trials):
            weight = 10 + trial % 2 * 80  # 10, 90, 10, …: always a change
            snapshot = _snapshot(models, listen_port, weight)
            answers = _answers(registry)
            cpu_before = cpu_seconds(envoy.popen.pid)
            started = time.monotonic()
            cache.set(snapshot)
            while _answers(registry) == answers:  # Envoy answers once it has applied the push
                time.sleep(0.0005)
            out.seconds.append(time.monotonic() - started)
            time.sleep(0.2)  # whatever Envoy does after answering counts too
            cpu_s += cpu_seconds(envoy.popen.pid) - cpu_before
            if _envoy_weight(admin, last) != weight:
                raise RuntimeError(
                    f"{out.protocol}: Envoy acknowledged, but does not run weight {weight}"
                )
            if trial == 0:
                packed = snapshot.packed(ENDPOINT)
                out.bytes = len(packed[-1].value) if delta else sum(len(p.value) for p in packed)
        out.envoy_cpu_s = cpu_s / trials
        sent = (
            registry.get_sample_value("arks_xds_resources_sent_total", {"type": "eds"}) or 0.0
        ) - sent_before
        out.resources = sent / trials
    return out


def run(models: int = 300, trials: int = 10) -> list[Push]:
    with tempfile.TemporaryDirectory(prefix="arks-bench-xds-") as tmp:
        return [push(Path(tmp), delta, models, trials) for delta in (False, True)]


def lines(results: list[Push]) -> list[str]:
    rows = [
        [
            p.protocol,
            f"{p.resources:.0f}",
            f"{p.bytes / 1024:.1f} KiB",
            f"{1000 * statistics.median(p.seconds):.1f} ms",
            f"{1000 * max(p.seconds):.1f} ms",
            f"{1000 * p.envoy_cpu_s:.1f} ms",
            str(len(p.seconds)),
        ]
        for p in results
    ]
    models = results[0].models if results else 0
    return [
        "### One weight change among many models: the xDS push",
        "",
        f"{models} models (EDS clusters of three engines each) on one Envoy; one engine of the last",
        "model gets a new weight. Time from the controller's snapshot swap until Envoy acknowledges",
        "the push (having applied it); Envoy's CPU per push from its process clock",
        "(`tests/bench/xds_push.py`).",
        "",
        report.markdown_table(
            [
                "protocol",
                "endpoint assignments sent",
                "bytes",
                "to Envoy, median",
                "max",
                "Envoy CPU / push",
                "pushes",
            ],
            rows,
        ),
        "",
    ]


if __name__ == "__main__":
    for result in run():
        print(
            result.protocol,
            f"{result.resources:.0f} resources",
            f"{result.bytes} B",
            f"median {1000 * statistics.median(result.seconds):.1f} ms",
            f"envoy cpu {1000 * result.envoy_cpu_s:.1f} ms",
        )
