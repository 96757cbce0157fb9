"""`python -m arks.crds [--check] [--out DIR]`: write the CRD manifests (manifests/crds, and the
Helm chart's charts/arks/crds), or check them for drift."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arks import generated
from arks.crds import chart_files, files

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "manifests" / "crds"
CHART_OUT = ROOT / "charts" / "arks" / "crds"


def drift(out: Path, wanted: dict[str, str] | None = None) -> list[str]:
    """Names of files in `out` that differ from, lack or are not among the generated ones."""
    wanted = files() if wanted is None else wanted
    return generated.drift(out, wanted, "the Python schema", owned="*.yaml")


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
        return generated.report(problems, "python -m arks.crds")
    for out, wanted in targets:
        generated.write(out, wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
