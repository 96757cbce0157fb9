"""How the Python services start, run their periodic chores, and stop on a signal."""

from __future__ import annotations

import asyncio
import logging
import platform
import signal
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)


def setup_process(log_level: str) -> None:
    """Once per process, in `main`: logging, and no `_created` series (noise for Prometheus)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def package_version() -> str:
    """The installed `arks` distribution's version ("unknown" when run from a bare checkout)."""
    try:
        return version("arks")
    except PackageNotFoundError:
        return "unknown"


def export_process_metrics(registry: CollectorRegistry, service: str) -> None:
    """Once per service, on the registry its /metrics serves: `process_*` (CPU, memory, open
    files, start time; from /proc), `python_info`, and `arks_build_info{service,version,
    python_version}` (value 1), so a dashboard sees restarts, leaks and what runs where."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    Info("arks_build", "The running Arks service and its versions.", registry=registry).info(
        {
            "service": service,
            "version": package_version(),
            "python_version": platform.python_version(),
        }
    )


async def every(
    interval_s: float, turn: Callable[[], Awaitable[object]], log: logging.Logger
) -> None:
    """Run `turn` every `interval_s` forever; a failing turn is logged, never the end of it."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await turn()
        except Exception:
            log.exception("periodic turn failed; retrying")


async def run_until_signalled(
    *background: Awaitable[None], shutdown: Callable[[], Awaitable[None]]
) -> None:
    """Run the background tasks until SIGTERM or SIGINT, then cancel them and shut down."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.ensure_future(task) for task in background]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await shutdown()
