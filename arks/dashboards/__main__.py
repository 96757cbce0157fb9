"""`python -m arks.dashboards [--check] [--out DIR]`: write the Grafana dashboards and their
ConfigMaps into manifests/monitoring, or check them for drift (exit 1)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from arks.dashboards import CONFIGMAPS, DIRECTORY, files

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "manifests" / "monitoring"


def drift(out: Path, wanted: dict[str, str] | None = None) -> list[str]:
    """What in `out` differs from, lacks or is not among the generated files; and whether its
    kustomization.yaml installs the ConfigMaps."""
    wanted = files() if wanted is None else wanted
    problems = []
    for name, text in wanted.items():
        path = out / name
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.read_text() != text:
            problems.append(f"{path}: differs from arks/dashboards")
    for path in sorted((out / DIRECTORY).glob("*.json")):
        if f"{DIRECTORY}/{path.name}" not in wanted:
            problems.append(f"{path}: not generated (stale?)")
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
    out: Path = args.out
    wanted = files()
    if args.check:
        problems = drift(out, wanted)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `python -m arks.dashboards` to regenerate", file=sys.stderr)
        return 1 if problems else 0
    for stale in (out / DIRECTORY).glob("*.json"):
        if f"{DIRECTORY}/{stale.name}" not in wanted:
            stale.unlink()
    for name, text in wanted.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    print(f"wrote {len(wanted)} files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
