"""A throwaway real Prometheus (Debian's `prometheus` package) scraping static targets."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from launcher.procs import Supervisor, free_port, wait_http


@dataclass(frozen=True)
class Target:
    address: str  # host:port serving /metrics
    labels: Mapping[str, str]  # what service discovery and relabelling would attach


class Prometheus:
    """Started by `start` under a Supervisor; queried over its HTTP API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10.0)

    @classmethod
    def start(
        cls, sup: Supervisor, workdir: Path, targets: Sequence[Target], interval_s: int = 1
    ) -> Prometheus:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is needed (apt-get install prometheus; .ci/run installs it)"
        config = {
            "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "engines",
                    "static_configs": [
                        {"targets": [t.address], "labels": dict(t.labels)} for t in targets
                    ],
                }
            ],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        child = sup.start(
            "prometheus",
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(child, f"{url}/-/ready", timeout=30.0)
        return cls(url)

    def _data(self, path: str, params: Mapping[str, str]) -> Any:
        resp = self.http.get(path, params=params)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", (params, body)
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query's vector: (labels, value) per series."""
        data = self._data("/api/v1/query", {"query": expr})
        assert data["resultType"] == "vector", (expr, data)
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def series(self, match: str) -> list[dict[str, str]]:
        return list(self._data("/api/v1/series", {"match[]": match}))

    def wait_scrapes(self, count: int, timeout: float = 30.0) -> None:
        """Until every target has been scraped `count` more times from now."""
        expr = "count_over_time(up[1h])"
        before = {r[0]["instance"]: r[1] for r in self.query(expr)}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = {r[0]["instance"]: r[1] for r in self.query(expr)}
            if before and all(now.get(i, 0) >= n + count for i, n in before.items()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"targets not scraped {count} more times in {timeout}s")

    def wait_up(self, instances: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            up = self.query("up == 1")
            if len(up) == instances:
                return
            time.sleep(0.2)
        raise TimeoutError(f"not all {instances} targets up in {timeout}s: {self.query('up')}")
