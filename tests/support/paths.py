"""Where things are in the repository, for tests wherever they sit in the tree."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_POLICY = REPO / "launcher" / "demo" / "policy.yaml"
