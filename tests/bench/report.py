"""Turn measurements into the figures of DESIGN §6: per-workload tables and the budget table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.bench.targets import FLOOR_USAGE, CpuSample
from tests.bench.workloads import Workload, chat, stream
from tests.bench.wrk import Result

FLOOR_MATCHED = "floor-matched"
CONFIGS = ("plain", "floor", FLOOR_USAGE, "gateway", FLOOR_MATCHED)
# The floors the gateway is held against: DESIGN §6's, and the same with the usage channel (the
# gateway's access log into a do-nothing receiver): what of the gateway's cost is structural.
FLOORS = (("floor", "floor"), (FLOOR_USAGE, "floor + usage channel"))


@dataclass(frozen=True)
class Measurement:
    load: Result
    cpu: CpuSample
    delay_ms: float = 0.0  # added by the engine to every answer (the rate-matched floor)

    @property
    def p50(self) -> float:
        return self.load.percentile_ms(50)

    @property
    def p99(self) -> float:
        return self.load.percentile_ms(99)

    @property
    def p999(self) -> float:
        return self.load.percentile_ms(99.9)

    def _per_request_us(self, seconds: float) -> float:
        return seconds / self.load.requests * 1e6 if self.load.requests else math.nan

    @property
    def python_us(self) -> float:
        return self._per_request_us(self.cpu.python)

    @property
    def envoy_us(self) -> float:
        return self._per_request_us(self.cpu.envoy)


Results = dict[tuple[str, str], Measurement]  # (workload key, config) -> measurement


@dataclass(frozen=True)
class Budget:
    figure: str
    value: float
    unit: str  # "x" (a ratio) or "ms"
    limit: float
    at_most: bool  # True: value must be <= limit; False: >= limit

    @property
    def met(self) -> bool | None:
        if math.isnan(self.value):
            return None
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def cells(self) -> list[str]:
        verdict = {True: "met", False: "**NOT met**", None: "n/a"}[self.met]
        sign = "≤" if self.at_most else "≥"
        fmt = "{:.2f} ms" if self.unit == "ms" else "{:.2f}x"
        return [self.figure, _fmt(self.value, fmt), f"{sign} {fmt.format(self.limit)}", verdict]


def _fmt(value: float, fmt: str) -> str:
    return "n/a" if math.isnan(value) else fmt.format(value)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) else math.nan


def budgets(results: Results) -> list[Budget]:
    def get(workload: Workload, config: str) -> Measurement | None:
        return results.get((workload.key, config))

    out: list[Budget] = []
    cpu_rows = [
        chat(1),
        chat(32),
        stream(1, client_asks_usage=True),
        stream(1, client_asks_usage=False),
        stream(32, client_asks_usage=True),
        stream(32, client_asks_usage=False),
    ]
    for w in cpu_rows:
        gw = get(w, "gateway")
        for config, name in FLOORS:
            floor = get(w, config)
            if gw and floor:
                out.append(
                    Budget(
                        f"Python CPU/request, gateway ÷ {name} — {w.short}",
                        _ratio(gw.python_us, floor.python_us),
                        "x",
                        1.5,
                        True,
                    )
                )
        matched = get(w, FLOOR_MATCHED)
        if gw and matched:
            out.append(
                Budget(
                    f"Python CPU/request, gateway ÷ rate-matched floor — {w.short}",
                    _ratio(gw.python_us, matched.python_us),
                    "x",
                    1.5,
                    True,
                )
            )
    for w in (chat(1), stream(1, client_asks_usage=True), stream(1, client_asks_usage=False)):
        gw, plain = get(w, "gateway"), get(w, "plain")
        for config, name in FLOORS:
            floor = get(w, config)
            if gw and floor and plain:
                out.append(
                    Budget(
                        f"added p50 over plain, gateway ÷ {name} — {w.short}",
                        _ratio(gw.p50 - plain.p50, floor.p50 - plain.p50),
                        "x",
                        1.5,
                        True,
                    )
                )
        if gw and plain:
            out.append(
                Budget(
                    f"added p99 over plain, gateway — {w.short}",
                    gw.p99 - plain.p99,
                    "ms",
                    2.0,
                    True,
                )
            )
    for w in (chat(32), stream(32, client_asks_usage=True), stream(32, client_asks_usage=False)):
        gw = get(w, "gateway")
        for config, name in FLOORS:
            floor = get(w, config)
            if gw and floor:
                out.append(
                    Budget(
                        f"throughput, gateway ÷ {name} — {w.short}",
                        _ratio(gw.load.rps, floor.load.rps),
                        "x",
                        0.8,
                        False,
                    )
                )
    return out


def flatness(results: Results) -> list[tuple[str, float]]:
    """Python CPU of a 1,000-chunk streamed answer ÷ a 16-token non-streamed one, per config (c=1)."""
    out = []
    for config in ("floor", FLOOR_USAGE, "gateway"):
        short = results.get((chat(1).key, config))
        for asks in (True, False):
            long = results.get((stream(1, client_asks_usage=asks).key, config))
            if short and long:
                label = "client sends include_usage" if asks else "gateway adds include_usage"
                out.append((f"{config}, {label}", _ratio(long.python_us, short.python_us)))
    return out


def rate_matched(results: Results) -> list[list[str]]:
    """Streamed answers at c=1: gateway vs the floor as measured and vs the floor at equal rate."""
    rows = []
    for w in (stream(1, client_asks_usage=True), stream(1, client_asks_usage=False)):
        gw, floor, matched = (results.get((w.key, c)) for c in ("gateway", "floor", FLOOR_MATCHED))
        if gw and floor and matched:
            rows.append(
                [
                    w.short,
                    f"{gw.load.rps:.0f} / {floor.load.rps:.0f} / {matched.load.rps:.0f}",
                    _fmt(_ratio(gw.python_us, floor.python_us), "{:.2f}x"),
                    _fmt(_ratio(gw.python_us, matched.python_us), "{:.2f}x"),
                ]
            )
    return rows


RATE_MATCHED_HEADER = [
    "workload",
    "req/s gateway / floor / rate-matched floor",
    "Python CPU gateway ÷ floor",
    "gateway ÷ rate-matched floor",
]

HEADER = [
    "config",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "+p50 vs plain",
    "+p99 vs plain",
    "req/s",
    "Python CPU µs/req",
    "Envoy CPU µs/req",
    "requests",
]


def workload_rows(workload: Workload, results: Results) -> list[list[str]]:
    plain = results.get((workload.key, "plain"))
    rows = []
    for config in CONFIGS:
        m = results.get((workload.key, config))
        if m is None:
            continue
        added = (
            [f"{m.p50 - plain.p50:+.3f} ms", f"{m.p99 - plain.p99:+.3f} ms"]
            if plain and config != "plain"
            else ["—", "—"]
        )
        label = (
            f"floor, rate-matched (+{m.delay_ms:g} ms engine delay)"
            if config == FLOOR_MATCHED
            else config
        )
        rows.append(
            [
                label,
                f"{m.p50:.3f}",
                f"{m.p99:.3f}",
                f"{m.p999:.3f}",
                *added,
                f"{m.load.rps:.0f}",
                "—" if config == "plain" else f"{m.python_us:.0f}",
                f"{m.envoy_us:.0f}",
                str(m.load.requests),
            ]
        )
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join("{:<%d}" % w for w in widths)  # noqa: UP031 (a template of widths)
    return "\n".join(line.format(*r) for r in [list(header), ["-" * w for w in widths], *rows])


BUDGET_HEADER = ["figure (DESIGN §6)", "measured", "budget", "verdict"]


def replace_section(path: Path, begin: str, end: str, section: str) -> None:
    """Put `section` (which starts with `begin` and ends with `end`) in `path`: replace the
    previous one if present, else append; keep the rest of the file."""
    text = path.read_text() if path.exists() else ""
    start = text.find(begin)
    if start >= 0:
        stop = text.find(end, start)
        if stop < 0:
            raise RuntimeError(f"{path}: a section has no end marker {end!r}; fix the file")
        text = text[:start] + section + text[stop + len(end) :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def existing_section(path: Path, begin: str, end: str) -> str | None:
    """The section between the markers in `path`, to carry over when the rest is rewritten."""
    text = path.read_text() if path.exists() else ""
    start = text.find(begin)
    stop = text.find(end, start)
    return text[start : stop + len(end)] if start >= 0 and stop >= 0 else None
