"""A service as N worker processes on one port (SO_REUSEPORT): `--workers N`.

The parent starts N copies of the service's own command, each with `--worker-index i`. Each
binds the same gRPC address with SO_REUSEPORT (the kernel spreads connections over them: a
client's connection, and every request on it, goes to one worker) and serves its metrics on
its own port (the base port + i). The parent forwards SIGTERM and SIGINT; when a worker exits
the parent stops the others and exits with the worker's code, so whatever supervises the
service (Kubernetes, `arks up`) restarts it whole. A worker dies with its parent, even a parent
killed outright (Linux's parent-death signal).

Workers share nothing but what their stores share: a service whose counters live in its own
memory must not run several (each would enforce the whole limit), so the services refuse
`--workers` above 1 without `--redis`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

STOP_GRACE_S = 15.0  # what a worker is given to finish before it is killed
PARENT_ENV = "ARKS_WORKERS_PARENT"  # the parent's pid, in a worker's environment
PR_SET_PDEATHSIG = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes on one port (SO_REUSEPORT), metrics on consecutive ports; "
        "above 1 needs --redis (default: 1)",
    )
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)


def _check(workers: int, shared_store: bool, service: str) -> None:
    """Exit with a clear message when `workers` cannot run correctly."""
    if workers < 1:
        sys.exit(f"{service}: --workers must be at least 1, not {workers}")
    if workers > 1 and not shared_store:
        sys.exit(
            f"{service}: --workers {workers} needs --redis: limits and budgets kept in one "
            "process's memory would be enforced once per worker"
        )


def _run(workers: int, module: str, argv: Sequence[str]) -> int:
    """Run `python -m module argv --worker-index i` for i < workers until one exits or the
    parent is told to stop; the exit code to end with."""
    env = {**os.environ, PARENT_ENV: str(os.getpid())}
    children = [
        subprocess.Popen([sys.executable, "-m", module, *argv, "--worker-index", str(i)], env=env)
        for i in range(workers)
    ]
    stopping = False

    def stop(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while any(child.poll() is None for child in children):
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        ended = next((c for c in children if c.pid == pid), None)
        if ended is None:
            continue
        ended.returncode = os.waitstatus_to_exitcode(status)
        if not stopping:  # a worker died on its own: stop the rest, and say so by the exit code
            code = ended.returncode or 1
            stop(signal.SIGTERM, None)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return code


def _die_with_parent() -> None:
    """In a worker, first thing: SIGTERM when the parent goes, however it goes; and exit now if
    it went already (before the ask)."""
    parent = os.environ.get(PARENT_ENV)
    if parent is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no death signal
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):
        sys.exit(1)


def enter(
    service: str, workers: int, worker_index: int | None, shared_store: bool, argv: Sequence[str]
) -> None:
    """A service's `main`, first thing: refuse what cannot run, become the parent of `workers`
    workers (which never returns: the process exits with theirs), or go on as one of them, or
    as the only process."""
    _check(workers, shared_store, service)
    if worker_index is not None:
        _die_with_parent()
    elif workers > 1:
        raise SystemExit(_run(workers, service, argv))
