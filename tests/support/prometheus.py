"""A throwaway real Prometheus (Debian's `prometheus` package) scraping static targets.

Configured by `arks.prometheus_config` and started by `launcher.prometheus`, as `arks up
--prometheus` does, so what the tests query is what a user's Prometheus would hold.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from arks.prometheus_config import Job, Target, engines_job, prometheus_config
from launcher.procs import Supervisor, free_port
from launcher.prometheus import prometheus_binary, start_prometheus

__all__ = ["Prometheus", "Target"]


class Prometheus:
    """Started by `start` under a Supervisor; queried over its HTTP API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10.0)

    @classmethod
    def start(
        cls, sup: Supervisor, workdir: Path, targets: Sequence[Target], interval_s: int = 1
    ) -> Prometheus:
        """Scraping `targets` as the engines job."""
        return cls.start_jobs(sup, workdir, [engines_job(targets, name="engines")], interval_s)

    @classmethod
    def start_jobs(
        cls,
        sup: Supervisor,
        workdir: Path,
        jobs: Sequence[Job],
        interval_s: float = 1,
        rule_files: Sequence[str] = (),
    ) -> Prometheus:
        assert prometheus_binary(), (
            "prometheus is needed (apt-get install prometheus; .ci/run installs it)"
        )
        config = prometheus_config(
            jobs, rule_files, scrape_interval_s=interval_s, evaluation_interval_s=1
        )
        _, url = start_prometheus(sup, workdir, config, free_port())
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

    def targets(self) -> list[dict[str, Any]]:
        """The active targets (`/api/v1/targets`): labels, scrapeUrl, health, lastError."""
        return list(self._data("/api/v1/targets", {"state": "active"})["activeTargets"])

    def rule_groups(self) -> list[dict[str, Any]]:
        return list(self._data("/api/v1/rules", {})["groups"])
