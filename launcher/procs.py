"""Child processes for the local stack and the tests: free ports, start, wait until ready, stop.

Every child runs in its own process group so stopping it also stops anything it spawned, and
`Supervisor.close()` leaves nothing behind, also when start-up failed half way.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a server started a little later.

    Taken below the kernel's ephemeral range: ports the kernel hands to outgoing connections
    (of which the tests open thousands) would otherwise be able to take it in the meantime.
    Never the same port twice in one process."""
    low, _ = _ephemeral_range()
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    for port in candidates:
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError(f"no free port on {host} below {low}")


class StartupError(RuntimeError):
    """A child exited or never became ready; the message names it and quotes its log."""


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None
    argv: tuple[str, ...] = ()  # how it was started, for a restart
    env: Mapping[str, str] | None = None
    restarts: int = 0

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout)


def _launched(argv: Sequence[str]) -> list[str]:
    """`argv` run by launcher.launch; a Python module (`python -m M ...`) in the launcher's own
    interpreter, so it costs no second start-up."""
    launch = [sys.executable, "-m", "launcher.launch", str(os.getpid())]
    if len(argv) >= 3 and argv[0] == sys.executable and argv[1] == "-m":
        return [*launch, *argv[1:]]
    return [*launch, *argv]


@dataclass
class Backoff:
    """Restart delays: `first_s`, doubling per failure in a row up to `max_s`."""

    first_s: float = 0.5
    max_s: float = 30.0
    reset_s: float = 30.0  # up this long: the next failure starts over at `first_s`
    failures: dict[str, int] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)

    def delay(self, name: str) -> float:
        count = self.failures.get(name, 0)
        self.failures[name] = count + 1
        return float(min(self.max_s, self.first_s * 2**count))


@dataclass
class Supervisor:
    """Starts children and stops them all, newest first; `supervise` restarts those that exit."""

    log_dir: Path | None = None
    children: list[Child] = field(default_factory=list)
    _closing: bool = field(default=False, init=False)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        stdout: IO[bytes] | None = None,
    ) -> Child:
        log_path = None
        out: IO[bytes] | int | None = stdout
        if out is None and self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{name}.log"
            out = log_path.open("ab")
        popen = subprocess.Popen(
            # Through launcher.launch, which makes the child die with this process (see there).
            _launched(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        if log_path is not None and out is not None and not isinstance(out, int):
            out.close()  # the child holds its own descriptor
        child = Child(name, popen, log_path, tuple(argv), env)
        self.children.append(child)
        return child

    def restart(self, child: Child) -> None:
        """Start a child that exited again, the same way; its log goes on in the same file."""
        fresh = self.start(child.name, child.argv, child.env)
        self.children.remove(fresh)
        child.popen, child.restarts = fresh.popen, child.restarts + 1

    def python(
        self, name: str, module: str, *args: str, env: Mapping[str, str] | None = None
    ) -> Child:
        return self.start(name, [sys.executable, "-m", module, *args], env=env)

    def close(self) -> None:
        self._closing = True
        while self.children:
            self.children.pop().stop()

    def supervise(
        self,
        report: Callable[[str], None],
        *,
        poll_s: float = 0.5,
        backoff: Backoff | None = None,
    ) -> threading.Thread:
        """Restart every child that exits, with backoff, saying so through `report`, until
        `close()`. A child that stayed up for `backoff.reset_s` starts over at the first delay."""
        policy = backoff or Backoff()
        due: dict[str, float] = {}

        def watch() -> None:
            while not self._closing:
                now = time.monotonic()
                for child in list(self.children):
                    if self._closing:
                        return
                    if child.alive():
                        if now - policy.started.get(child.name, now) >= policy.reset_s:
                            policy.failures.pop(child.name, None)
                        continue
                    if child.name not in due:
                        delay = policy.delay(child.name)
                        due[child.name] = now + delay
                        report(
                            f"{child.name} exited with code {child.popen.returncode}; "
                            f"restarting it in {delay:g} s (log: {child.log_path})"
                        )
                    elif now >= due[child.name]:
                        del due[child.name]
                        self.restart(child)
                        policy.started[child.name] = time.monotonic()
                        report(f"{child.name} restarted (restart {child.restarts})")
                time.sleep(poll_s)

        thread = threading.Thread(target=watch, name="supervisor", daemon=True)
        thread.start()
        return thread

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_http(child: Child, url: str, timeout: float = 20.0, expect: int = 200) -> None:
    """Poll `url` until it answers `expect`; fail early if the child died."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not child.alive():
            raise StartupError(
                f"{child.name} exited with {child.popen.returncode}:\n{child.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == expect:
                    return
                last = f"status {resp.status}"
        except urllib.error.HTTPError as err:
            if err.code == expect:
                return
            last = f"status {err.code}"
        except OSError as err:
            last = str(err)
        time.sleep(0.05)
    raise StartupError(
        f"{child.name} not ready at {url} after {timeout}s ({last}):\n{child.log_tail()}"
    )


def wait_port(child: Child, port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise StartupError(
                f"{child.name} exited with {child.popen.returncode}:\n{child.log_tail()}"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise StartupError(
        f"{child.name} not listening on {host}:{port} after {timeout}s:\n{child.log_tail()}"
    )
