"""Polling until a condition holds, for tests that watch a running system settle."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(get: Callable, ok: Callable, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    value = get()
    while not ok(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {value!r}")
        time.sleep(interval)
        value = get()
    return value
