"""`python -m arks.crds [--check] [--out DIR]`: write the CRD manifests (manifests/crds, and the
Helm chart's charts/arks/crds), or check them for drift."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arks.crds import chart_files, files

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "manifests" / "crds"
CHART_OUT = ROOT / "charts" / "arks" / "crds"


def drift(out: Path, wanted: dict[str, str] | None = None) -> list[str]:
    """Names of files in `out` that differ from, lack or are not among the generated ones."""
    wanted = files() if wanted is None else wanted
    problems = []
    for file_name, text in wanted.items():
        path = out / file_name
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.read_text() != text:
            problems.append(f"{path}: differs from the Python schema")
    for path in sorted(out.glob("*.yaml")):
        if path.name not in wanted:
            problems.append(f"{path}: not generated (stale?)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arks.crds", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the files differ from the Python"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="directory of the CRD manifests (default: manifests/crds and charts/arks/crds)",
    )
    args = parser.parse_args(argv)
    targets = (
        [(args.out, files())] if args.out else [(DEFAULT_OUT, files()), (CHART_OUT, chart_files())]
    )
    if args.check:
        problems = [p for out, wanted in targets for p in drift(out, wanted)]
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `python -m arks.crds` to regenerate", file=sys.stderr)
        return 1 if problems else 0
    for out, wanted in targets:
        out.mkdir(parents=True, exist_ok=True)
        for file_name, text in wanted.items():
            (out / file_name).write_text(text)
        print(f"wrote {len(wanted)} files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
