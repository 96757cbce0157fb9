"""`python -m launcher.launch PARENT_PID (-m MODULE | PROGRAM) ARGS...`: run a child that dies with
its parent.

It asks Linux for SIGTERM when the thread that started it goes away (PR_SET_PDEATHSIG; also
when that process is SIGKILLed), checks that the parent is still the one that started it (it
may have died before the ask), then becomes the child: `runpy` runs a Python module in this
same interpreter, `execvp` any other program (the death signal survives exec).

`Supervisor` starts every child through this rather than with `preexec_fn`, which runs Python
between fork and exec: not safe in a process with threads (Python's documentation says so), and
gRPC's are such threads. A simulated engine once aborted inside gRPC's poller that way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    if len(argv) < 2 or (argv[1] == "-m" and len(argv) < 3):
        sys.exit("usage: python -m launcher.launch PARENT_PID (-m MODULE | PROGRAM) ARGS...")
    parent, rest = int(argv[0]), argv[1:]
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no death signal
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the ask: nobody wants this child
        sys.exit(1)
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        os.execvp(rest[0], rest)


if __name__ == "__main__":
    main(sys.argv[1:])
