"""The load generator: `wrk` (C, so it leaves the CPU to what we measure), driven by a Lua script.

The script sets method, body and headers, and its `done()` hook prints the totals, the error
counts and 1,000 evenly spaced latency quantiles, so segments of one measurement taken at
different times merge as a mixture of their distributions instead of averaging percentiles.
(Debian's wrk 4.1.0 cannot index its histogram from Lua, so quantiles it is.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SUMMARY_TAG = "ARKS-BENCH-SUMMARY"
QUANTILES_TAG = "ARKS-BENCH-QUANTILES"
QUANTILES = 1000

_DONE_HOOK = f"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("{SUMMARY_TAG} %d %d %d %d %d %d %d\\n", summary.duration, summary.requests,
    e.connect, e.read, e.write, e.status, e.timeout))
  local parts = {{}}
  if summary.requests > 0 then
    for i = 1, {QUANTILES} - 1 do
      parts[i] = string.format("%d", latency:percentile(i * 100 / {QUANTILES}))
    end
    parts[{QUANTILES}] = string.format("%d", latency.max)
  end
  io.write("{QUANTILES_TAG} " .. table.concat(parts, ",") .. "\\n")
end
"""


class WrkError(RuntimeError):
    """wrk is missing, failed, or printed something we cannot read."""


def ensure_wrk() -> str:
    """The wrk binary; installed from Debian when missing (the bench machine is a Debian box)."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise WrkError(
            "wrk is not installed and there is no apt-get here: install wrk (https://github.com/wg/wrk)"
        )
    print(
        "wrk is not installed; installing it with `apt-get install -y wrk` ...",
        file=sys.stderr,
        flush=True,
    )
    install = [apt, "install", "-y", "-q", "wrk"]
    if subprocess.run(install, stdout=subprocess.DEVNULL, check=False).returncode != 0:
        subprocess.run([apt, "update", "-q"], stdout=subprocess.DEVNULL, check=False)
        if subprocess.run(install, stdout=subprocess.DEVNULL, check=False).returncode != 0:
            raise WrkError(
                "could not install wrk with apt-get (not root?): run `apt-get install -y wrk` and retry"
            )
    found = shutil.which("wrk")
    if found is None:
        raise WrkError("apt-get installed wrk but it is not on PATH")
    return found


def lua_script(method: str, body: bytes, headers: Mapping[str, str]) -> str:
    lines = [f"wrk.method = {_lua_string(method)}", f"wrk.body = {_lua_string(body.decode())}"]
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    return "\n".join(lines) + "\n" + _DONE_HOOK


def _lua_string(text: str) -> str:
    # A JSON string literal is a valid Lua string literal for the ASCII text we send.
    return json.dumps(text, ensure_ascii=True)


@dataclass
class Result:
    """One or more wrk runs of the same load, merged."""

    duration_s: float = 0.0
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    # (latency µs, weight): each run's quantiles, weighted by its requests ÷ QUANTILES
    quantiles: list[tuple[int, float]] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def percentile_ms(self, p: float) -> float:
        """The p-th percentile of the merged runs (of one run: wrk's own, to 0.1 %)."""
        total = sum(w for _, w in self.quantiles)
        if total == 0:
            return float("nan")
        seen = 0.0
        ordered = sorted(self.quantiles)
        for us, weight in ordered:
            seen += weight
            if seen >= p / 100.0 * total - 1e-9:
                return us / 1000.0
        return ordered[-1][0] / 1000.0

    def merge(self, other: Result) -> None:
        self.duration_s += other.duration_s
        self.requests += other.requests
        self.errors.update(other.errors)
        self.quantiles.extend(other.quantiles)


def parse_output(text: str) -> Result:
    summary = quantiles = None
    for line in text.splitlines():
        if line.startswith(SUMMARY_TAG):
            summary = line.split()[1:]
        elif line.startswith(QUANTILES_TAG):
            quantiles = line[len(QUANTILES_TAG) :].strip()
    if summary is None or quantiles is None:
        raise WrkError(f"no summary in wrk's output:\n{text}")
    duration_us, requests, *errors = (int(x) for x in summary)
    names = ("connect", "read", "write", "status", "timeout")
    result = Result(
        duration_us / 1e6,
        requests,
        Counter({k: v for k, v in zip(names, errors, strict=True) if v}),
    )
    values = [int(us) for us in filter(None, quantiles.split(","))]
    result.quantiles = [(us, requests / len(values)) for us in values]
    return result


def run(
    wrk: str, url: str, script: Path, connections: int, seconds: float, timeout_s: float = 30.0
) -> Result:
    argv = [
        wrk,
        "--threads",
        "1",
        "--connections",
        str(connections),
        "--duration",
        f"{max(1, round(seconds))}s",
        "--timeout",
        f"{timeout_s:g}s",
        "--latency",
        "--script",
        str(script),
        url,
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=seconds + timeout_s + 30
    )
    if done.returncode != 0:
        raise WrkError(f"wrk exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return parse_output(done.stdout)


def merged(results: Iterable[Result]) -> Result:
    total = Result()
    for r in results:
        total.merge(r)
    return total
