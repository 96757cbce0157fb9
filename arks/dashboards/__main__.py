"""`python -m arks.dashboards [--check] [--out DIR]`: write the Grafana dashboards and their
ConfigMaps into manifests/monitoring, or check them for drift (exit 1)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from arks import generated
from arks.dashboards import CONFIGMAPS, DIRECTORY, files

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "manifests" / "monitoring"


def drift(out: Path, wanted: dict[str, str] | None = None) -> list[str]:
    """What in `out` differs from, lacks or is not among the generated files; and whether its
    kustomization.yaml installs the ConfigMaps."""
    wanted = files() if wanted is None else wanted
    problems = generated.drift(out, wanted, "arks/dashboards", owned=f"{DIRECTORY}/*.json")
    kustomization = out / "kustomization.yaml"
    if kustomization.exists():
        resources = yaml.safe_load(kustomization.read_text()).get("resources") or []
        if CONFIGMAPS not in resources:
            problems.append(f"{kustomization}: resources do not list {CONFIGMAPS}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arks.dashboards", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the files are stale")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="manifests/monitoring")
    args = parser.parse_args(argv)
    wanted = files()
    if args.check:
        return generated.report(drift(args.out, wanted), "python -m arks.dashboards")
    generated.write(args.out, wanted, owned=f"{DIRECTORY}/*.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
