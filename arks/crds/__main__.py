"""`python -m arks.crds [--check] [--out DIR]`: write the CRD manifests, or check them for drift."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arks.crds import files

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "manifests" / "crds"


def drift(out: Path) -> list[str]:
    """Names of files in `out` that differ from, lack or are not among the generated ones."""
    wanted = files()
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
        "--out", type=Path, default=DEFAULT_OUT, help="directory of the CRD manifests"
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    if args.check:
        problems = drift(out)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `python -m arks.crds` to regenerate", file=sys.stderr)
        return 1 if problems else 0
    out.mkdir(parents=True, exist_ok=True)
    for file_name, text in files().items():
        (out / file_name).write_text(text)
    print(f"wrote {len(files())} files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
