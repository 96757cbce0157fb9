"""`python -m arks.chart [--check]`: copy the kustomize manifests into the Helm chart.

charts/arks renders the objects of `manifests/` from copies of its files (charts/arks/files/:
base/, gateway/, cache/, monitoring/, autoscaling/, each the files its kustomization.yaml lists, and
`EXTRAS`), changing only what its values set: image, replicas, Redis, the monitoring namespace,
the controller's Prometheus, the engine PodMonitor's labels and namespaces. One source, so the
chart and `kubectl apply -k manifests/` cannot drift apart (tests/unit/manifests/test_helm_chart.py
renders both). The CRDs go to charts/arks/crds/ by `python -m arks.crds`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from arks import generated

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
OUTPUT = ROOT / "charts" / "arks" / "files"
PARTS = ("base", "gateway", "cache", "monitoring", "autoscaling")
# Copied although no kustomization lists them: prometheus-adapter's Helm values, for a chart
# user's `helm install prometheus-adapter ... -f` (not an object the chart renders), and the CORS
# SecurityPolicy, rendered with the values' origins when there are some (templates/cors.yaml).
EXTRAS = ("autoscaling/prometheus-adapter-values.yaml", "gateway/cors.yaml")


def files(manifests: Path = MANIFESTS) -> dict[str, str]:
    """Chart-relative path (under files/) -> text, for every file a part's kustomization lists."""
    out: dict[str, str] = {}
    for part in PARTS:
        kustomization = yaml.safe_load((manifests / part / "kustomization.yaml").read_text())
        for resource in kustomization["resources"]:
            path = manifests / part / resource
            if path.is_file():
                out[f"{part}/{path.name}"] = path.read_text()
    for extra in EXTRAS:
        out[extra] = (manifests / extra).read_text()
    return out


def drift(out: Path, wanted: dict[str, str]) -> list[str]:
    return generated.drift(out, wanted, "manifests/", owned="*/*.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arks.chart", description=__doc__)
    parser.add_argument("--out", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if the copies are stale")
    args = parser.parse_args(argv)
    wanted = files()
    if args.check:
        return generated.report(drift(args.out, wanted), "python -m arks.chart")
    generated.write(args.out, wanted, owned="*/*.yaml")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
