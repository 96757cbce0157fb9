"""The controller's own metrics and health, on one small HTTP server.

`/metrics` (Prometheus): reconciles by controller and result, their duration, queue depth and
the time a key waited in the queue, whether this replica leads, and the engine load it scraped
(`controller.load.metrics`; the standalone controller exports the same `ControllerMetrics`). `/healthz` answers 200 while the process runs; `/readyz` 200
once every informer has listed its objects (a replica that cannot reach the API server is not
ready).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from controller.load.metrics import EngineMetrics

RESULTS = ("success", "retry", "permanent_error", "error")
# A key's wait is near zero while the workers keep up and grows to the reconcile duration times
# the backlog when they do not, so the buckets span the reconcile buckets and beyond.
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter(
            "arks_controller_reconcile_total",
            "Reconciles by controller and result (success, retry, permanent_error, error).",
            ["controller", "result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "arks_controller_reconcile_duration_seconds",
            "Time one reconcile took.",
            ["controller"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "arks_controller_queue_depth",
            "Keys waiting in the controller's work queue.",
            ["controller"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "arks_controller_queue_wait_seconds",
            "Time a key waited in the work queue, from its first add until a worker took it.",
            ["controller"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.leader = Gauge(
            "arks_controller_leader",
            "1 while this replica holds the leader Lease.",
            registry=self.registry,
        )
        self.engines = EngineMetrics(self.registry)

    def known(self, controller: str) -> None:
        """A controller's reconcile counters exist at 0 for every result from the start, and its
        queue wait histogram empty (so `rate()` sees the first wait)."""
        for result in RESULTS:
            self.reconciles.labels(controller, result)
        self.queue_wait.labels(controller)


def serve(
    address: str,
    port: int,
    metrics: ControllerMetrics,
    ready: Callable[[], bool],
) -> ThreadingHTTPServer:
    """Start serving /metrics, /healthz and /readyz in a daemon thread; returns the server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._answer(200, b"ok\n")
            elif path == "/readyz":
                ok = ready()
                self._answer(200 if ok else 503, b"ok\n" if ok else b"informers not synced\n")
            else:
                self._answer(404, b"not found\n")

        def _answer(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would drown the log

    server = ThreadingHTTPServer((address, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
