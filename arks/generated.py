"""Files generated from Python and committed (CRDs, the chart's copies, dashboards, rules):
writing them, and the `--check` that fails when the committed copy drifted. Pure but for the
files it reads and writes."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path


def drift(out: Path, wanted: Mapping[str, str], source: str, owned: str | None = None) -> list[str]:
    """What under `out` differs from or lacks one of the `wanted` files (relative path -> text),
    and, when `owned` (a glob under `out`) is given, the files it matches that are no longer
    generated."""
    problems = []
    for name, text in wanted.items():
        path = out / name
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.read_text() != text:
            problems.append(f"{path}: differs from {source}")
    for path in sorted(out.glob(owned)) if owned else ():
        if str(path.relative_to(out)) not in wanted:
            problems.append(f"{path}: not generated (stale?)")
    return problems


def write(out: Path, wanted: Mapping[str, str], owned: str | None = None) -> None:
    """Write the `wanted` files under `out`, removing what `owned` matches that is not wanted."""
    for path in out.glob(owned) if owned else ():
        if str(path.relative_to(out)) not in wanted:
            path.unlink()
    for name, text in wanted.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    print(f"wrote {len(wanted)} files to {out}")


def report(problems: list[str], command: str) -> int:
    """The `--check` verdict: each problem on stderr and how to regenerate; exit status."""
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"run `{command}` to regenerate", file=sys.stderr)
    return 1 if problems else 0
