"""Reverts one of extproc's tail-latency measures in the processes of one bench configuration
(`tests/bench/tail.py`), so that the bench shows what each is worth. Python imports this file at
start-up when its directory is on PYTHONPATH; `ARKS_BENCH_REVERT` names what to revert:

- `gc-freeze`: start-up's objects are not frozen (`gc.freeze()` does nothing);
- `housekeeping`: extproc's periodic work (every 0.5 s: policy reloads, settlement of missing
  entries, lease renewals, quota snapshots, the level gauges) never runs.

Each says so on stderr (the process's log), where the bench checks that it took effect. Never on
PYTHONPATH outside the bench.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from pathlib import Path

REVERT = os.environ.get("ARKS_BENCH_REVERT", "")


def _say(what: str) -> None:
    print(f"arks-bench-revert: {what}", file=sys.stderr, flush=True)


if REVERT == "gc-freeze":

    def _no_freeze() -> None:
        _say("gc.freeze skipped")

    gc.freeze = _no_freeze

elif REVERT == "housekeeping":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository
    from typing import Any

    import arks.lifecycle

    _every = arks.lifecycle.every

    async def _every_but_housekeeping(
        interval_s: float, fn: Any, *args: Any, **kwargs: Any
    ) -> None:
        if getattr(fn, "__name__", "") == "housekeeping":
            _say("housekeeping skipped")
            await asyncio.Event().wait()
        await _every(interval_s, fn, *args, **kwargs)

    arks.lifecycle.every = _every_but_housekeeping  # type: ignore[assignment]
    sys.path.pop(0)
