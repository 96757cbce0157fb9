"""The three configurations measured against one simulated engine, and the CPU they burn.

- plain: Envoy with only the router (no Python on the path: the physical limit);
- floor: the same plus ext_proc to a do-nothing Python server (`floor_extproc`);
- floor-usage: the floor plus the usage channel: the gateway's batched gRPC access log to the
  same do-nothing server, which also answers with metadata of the gateway's shape;
- gateway: the full local stack (`launcher.stack.LocalStack`) without simulators.

Each is a running Envoy on a loopback port plus the processes whose CPU we count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from arks.api import token_digest
from arks.envoy_config import (
    EXTPROC_CLUSTER,
    EnvoySettings,
    endpoint_cluster,
    extproc_cluster,
    usage_access_log,
)
from arks.envoy_config import bootstrap as gateway_bootstrap
from arks.envoy_config import http_filters as gateway_http_filters
from arks.envoy_config import listener as gateway_listener
from arks.envoy_config import routes as gateway_routes
from arks.policy import build_policy
from launcher.procs import Supervisor, free_port, wait_http, wait_port
from launcher.stack import LocalStack, StackSettings, envoy_binary
from tests.support.cpu import cpu_seconds
from tests.support.paths import REPO

MODEL = "bench-model"
FLOOR_USAGE = "floor-usage"  # the floor plus the usage channel (the second floor)
PYTHON_SERVICES = ("extproc", "controller")  # the local stack's Python children (simulate=False)
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


@dataclass(frozen=True)
class Target:
    """A configuration ready to take load: where to send it and whose CPU to count."""

    name: str
    url: str
    python_pids: tuple[int, ...]  # the Python services of this configuration (not the engine)
    envoy_pid: int
    metrics_url: str | None = None  # extproc's own metrics (the gateway's), for the tail bench


# --------------------------------------------------------------------------- CPU


@dataclass(frozen=True)
class CpuSample:
    python: float
    envoy: float

    @classmethod
    def take(cls, target: Target) -> CpuSample:
        return cls(
            sum(cpu_seconds(pid) for pid in target.python_pids), cpu_seconds(target.envoy_pid)
        )

    def __sub__(self, other: CpuSample) -> CpuSample:
        return CpuSample(self.python - other.python, self.envoy - other.envoy)

    def __add__(self, other: CpuSample) -> CpuSample:
        return CpuSample(self.python + other.python, self.envoy + other.envoy)


# --------------------------------------------------------------------------- Envoy configs


def _static_cluster(name: str, port: int) -> dict[str, Any]:
    endpoint = {
        "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}
    }
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }


def floor_ext_proc_filter() -> dict[str, Any]:
    """ext_proc as the gateway configures it, minus metadata: request headers only."""
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}, "timeout": "2s"},
            "message_timeout": "2s",
            "failure_mode_allow": False,
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SKIP",
                "request_body_mode": "NONE",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
        },
    }


def baseline_bootstrap(
    listen_port: int,
    admin_port: int,
    engine_port: int,
    extproc_port: int | None,
    usage_channel: bool = False,
    http_filters: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """plain Envoy (router only) → engine; with `extproc_port`, ext_proc to the floor first;
    with `usage_channel`, the gateway's access log (same filter, same batching) to it too;
    `http_filters`: these before the router instead (the Envoy filter ladder)."""
    if http_filters is not None:
        filters = [*http_filters, _ROUTER]
    else:
        filters = [_ROUTER] if extproc_port is None else [floor_ext_proc_filter(), _ROUTER]
    clusters = [_static_cluster("engine", engine_port)]
    settings = None
    if extproc_port is not None:
        settings = EnvoySettings(listen_port, admin_port, extproc_port)
        clusters.append(extproc_cluster(settings))
    route = {"match": {"prefix": "/"}, "route": {"cluster": "engine", "timeout": "0s"}}
    hcm: dict[str, Any] = {
        "@type": _HCM,
        "stat_prefix": "bench",
        "codec_type": "AUTO",
        "route_config": {
            "name": "bench",
            "virtual_hosts": [{"name": "bench", "domains": ["*"], "routes": [route]}],
        },
        "http_filters": filters,
    }
    if usage_channel:
        assert settings is not None, "the usage channel goes to the floor's server"
        hcm["access_log"] = [usage_access_log(settings)]
    return {
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


def envoy_argv(bootstrap: Path, concurrency: int) -> list[str]:
    """The flags every configuration's Envoy runs with (LocalStack passes the same)."""
    return [
        envoy_binary(),
        "-c",
        str(bootstrap),
        "--disable-hot-restart",
        "--concurrency",
        str(concurrency),
        "--log-level",
        "warning",
    ]


# --------------------------------------------------------------------------- starting them


def _python_env() -> dict[str, str]:
    # `python -m tests.bench...` must import from the repository wherever the bench was started.
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    }


def start_engine(sup: Supervisor, output_tokens: int) -> int:
    port = free_port()
    child = sup.python(
        "engine",
        "launcher.sim",
        "--port",
        str(port),
        "--model",
        MODEL,
        "--output-tokens",
        str(output_tokens),
        "--name",
        "bench-engine",
    )
    wait_http(child, f"http://127.0.0.1:{port}/health")
    return port


def start_baseline(
    sup: Supervisor,
    work: Path,
    engine_port: int,
    concurrency: int,
    *,
    floor: bool,
    usage_channel: bool = False,
) -> Target:
    name = (FLOOR_USAGE if usage_channel else "floor") if floor else "plain"
    listen_port, admin_port = free_port(), free_port()
    python_pids: tuple[int, ...] = ()
    extproc_port = None
    if floor:
        extproc_port, pid = start_server(
            sup, f"{name}-extproc", *(["--usage-channel"] if usage_channel else [])
        )
        python_pids = (pid,)
    bootstrap = work / f"envoy-{name}.json"
    bootstrap.write_text(
        json.dumps(
            baseline_bootstrap(listen_port, admin_port, engine_port, extproc_port, usage_channel),
            indent=1,
        )
    )
    envoy = sup.start(f"envoy-{name}", envoy_argv(bootstrap, concurrency))
    wait_http(envoy, f"http://127.0.0.1:{admin_port}/ready")
    return Target(name, f"http://127.0.0.1:{listen_port}", python_pids, envoy.popen.pid)


def start_server(sup: Supervisor, name: str, *flags: str) -> tuple[int, int]:
    """A floor server (`floor_extproc`) on a free port, with `flags`: its port and pid."""
    port = free_port()
    child = sup.python(
        name,
        "tests.bench.floor_extproc",
        "--grpc-address",
        f"127.0.0.1:{port}",
        *flags,
        env=_python_env(),
    )
    wait_port(child, port)
    return port, child.popen.pid


def start_ladder_step(
    sup: Supervisor,
    work: Path,
    name: str,
    engine_port: int,
    server: tuple[int, int],
    filters: Sequence[str],
    access_log: bool,
    concurrency: int,
    *,
    gateway_routes: bool = False,
    gateway_hcm: bool = False,
) -> Target:
    """An Envoy with the gateway's HTTP filters named in `filters` (its own config of each, in
    its order) and, with `access_log`, its usage access log, in front of the engine, calling the
    floor server `server` (port, pid). With `gateway_routes`, the gateway's route table and
    engine cluster instead of one route; with `gateway_hcm`, its connection manager's settings
    and its stats tags too."""
    listen_port, admin_port = free_port(), free_port()
    settings = EnvoySettings(listen_port, admin_port, server[0])
    chosen = [f for f in gateway_http_filters(settings) if f["name"] in filters]
    missing = set(filters) - {f["name"] for f in chosen}
    if missing:
        raise RuntimeError(f"the gateway's filter chain has no {sorted(missing)}")
    config = baseline_bootstrap(listen_port, admin_port, engine_port, server[0], access_log, chosen)
    if gateway_routes:
        _with_gateway_routes(config, settings, engine_port)
    if gateway_hcm:
        _with_gateway_hcm(config, settings)
    bootstrap = work / f"envoy-{name}.json"
    bootstrap.write_text(json.dumps(config, indent=1))
    envoy = sup.start(f"envoy-{name}", envoy_argv(bootstrap, concurrency))
    wait_http(envoy, f"http://127.0.0.1:{admin_port}/ready")
    return Target(name, f"http://127.0.0.1:{listen_port}", (server[1],), envoy.popen.pid)


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][
        0
    ]["typed_config"]
    return hcm


def _with_gateway_routes(config: dict[str, Any], settings: EnvoySettings, engine_port: int) -> None:
    """The gateway's route table for the bench's endpoint (header matches, the upload route,
    retries) and its engine cluster (override_host, outlier detection, circuit breakers), the
    cluster's engine given statically rather than by EDS."""
    docs = yaml.safe_load_all(bench_policy(engine_port, "sk-arks-unused"))
    policy = build_policy((f"bench {i}", doc) for i, doc in enumerate(docs))
    (endpoint,) = policy.endpoints.values()
    cluster = endpoint_cluster(endpoint)
    del cluster["eds_cluster_config"]
    engine = _static_cluster(cluster["name"], engine_port)
    cluster |= {"type": "STATIC", "load_assignment": engine["load_assignment"]}
    _hcm(config)["route_config"]["virtual_hosts"][0]["routes"] = gateway_routes(policy, settings)
    config["static_resources"]["clusters"].append(cluster)


# The gateway's connection manager settings not measured by another rung (the filters, the
# access log) nor the bench's own (its name, its routes).
_HCM_KEPT = frozenset({"@type", "stat_prefix", "codec_type", "rds", "http_filters", "access_log"})


def _with_gateway_hcm(config: dict[str, Any], settings: EnvoySettings) -> None:
    """The gateway's connection manager settings (local replies, request ids, timeouts, HTTP/2
    options), its listener's buffer limit and its stats tags."""
    gateway = gateway_listener(settings)
    hcm = _hcm(config)
    gateway_hcm = gateway["filter_chains"][0]["filters"][0]["typed_config"]
    hcm |= {k: v for k, v in gateway_hcm.items() if k not in _HCM_KEPT}
    listener = config["static_resources"]["listeners"][0]
    listener["per_connection_buffer_limit_bytes"] = gateway["per_connection_buffer_limit_bytes"]
    config["stats_config"] = gateway_bootstrap(settings)["stats_config"]


def bench_policy(engine_port: int, token: str) -> str:
    docs = [
        {
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "Backend",
            "metadata": {"name": "bench-engine", "namespace": "default"},
            "spec": {"endpoints": [{"ip": {"address": "127.0.0.1", "port": engine_port}}]},
        },
        {
            "apiVersion": "arks.ai/v1",
            "kind": "ArksEndpoint",
            "metadata": {"name": MODEL, "namespace": "default"},
            "spec": {
                "routeConfigs": [
                    {
                        "group": "gateway.envoyproxy.io",
                        "kind": "Backend",
                        "name": "bench-engine",
                        "weight": 1,
                    }
                ]
            },
        },
        # The full path (DESIGN §6): every kind of limit and a quota configured, none ever reached.
        {
            "apiVersion": "arks.ai/v1",
            "kind": "ArksQuota",
            "metadata": {"name": "bench", "namespace": "default"},
            "spec": {"quotas": [{"type": "total", "value": 10**15, "period": "month"}]},
        },
        {
            "apiVersion": "arks.ai/v1",
            "kind": "ArksToken",
            "metadata": {"name": "bench", "namespace": "default"},
            "spec": {
                "tokenHash": token_digest(token),
                "qos": [
                    {
                        "arksEndpoint": {"name": MODEL},
                        "rateLimits": [
                            {"type": "rpm", "value": 10**9},
                            {"type": "tpm", "value": 10**12},
                            {"type": "concurrency", "value": 10**6},
                        ],
                        "quota": {"name": "bench"},
                    }
                ],
            },
        },
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@contextmanager
def gateway(
    work: Path,
    engine_port: int,
    token: str,
    concurrency: int,
    ledger: str | None = None,
    name: str = "gateway",
    redis: str | None = None,
    extproc_workers: int = 1,
) -> Iterator[Target]:
    """The full local stack; `ledger`: extproc's --ledger (None: off, the budgets' baseline);
    `redis`: its counters' store (None: memory); `extproc_workers`: its processes (their CPU
    counted, the parent's too)."""
    policy = work / f"policy-{name}.yaml"
    policy.write_text(bench_policy(engine_port, token))
    settings = StackSettings(
        policy=policy,
        state_dir=work / name,
        ledger=ledger,
        port=free_port(),
        admin_port=free_port(),
        metrics_port=free_port(),
        controller_metrics_port=free_port(),
        simulate=False,
        envoy_concurrency=concurrency,
        redis=redis,
        extproc_workers=extproc_workers,
    )
    with LocalStack(settings) as stack:
        children = stack.supervisor.children
        # By name: every child runs through launcher.launch (argv[0] is Python for Envoy too).
        python = tuple(c.popen.pid for c in children if c.name in PYTHON_SERVICES)
        python += tuple(pid for parent in python for pid in _children(parent))  # workers
        envoy = [c.popen.pid for c in children if c.name == "envoy"]
        if not python or len(envoy) != 1:
            raise RuntimeError(f"unexpected gateway processes: {[c.name for c in children]}")
        yield Target(name, stack.url, python, envoy[0], stack.metrics_url)
