"""A local Prometheus (Debian's `prometheus` binary) for `arks up --prometheus` and the tests.

The configuration is `arks.prometheus_config`'s, written next to the data; the rules are the
plain rule files shipped in `manifests/monitoring/rules/` (a Kubernetes PrometheusRule there is
skipped: Prometheus cannot load one). Nothing is downloaded: without the binary the caller gets
`PrometheusMissing`, whose message says how to install it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from arks.prometheus_config import plain_rule_file
from launcher.procs import Child, Supervisor, wait_http

INSTALL = "apt-get install prometheus"
# In a source checkout (`pip install -e`, `make run`); an installed wheel has no manifests.
RULES_DIR = Path(__file__).resolve().parents[1] / "manifests" / "monitoring" / "rules"


class PrometheusMissing(RuntimeError):
    def __init__(self) -> None:
        super().__init__(f"no prometheus binary on PATH; install it: {INSTALL}")


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def rule_files(directory: Path = RULES_DIR) -> list[Path]:
    """The plain Prometheus rule files in `directory` (none if it does not exist)."""
    if not directory.is_dir():
        return []
    found = []
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        if documents and all(plain_rule_file(d) for d in documents):
            found.append(path)
    return found


def start_prometheus(
    supervisor: Supervisor, workdir: Path, config: dict[str, Any], port: int
) -> tuple[Child, str]:
    """Write `config` into `workdir`, start Prometheus on 127.0.0.1:`port` with its data there,
    and wait until it is ready; returns the child and its URL."""
    binary = prometheus_binary()
    if binary is None:
        raise PrometheusMissing()
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    child = supervisor.start(
        "prometheus",
        [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(child, f"{url}/-/ready", timeout=30.0)
    return child, url
