"""A clock that only moves when the test says so, for code that takes a `clock`/`monotonic`."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock in seconds: call it for the time; move it with `advance` or `now +=`."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
