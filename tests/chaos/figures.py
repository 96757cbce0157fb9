"""What each attack of the suite tried and what held, recorded as JSON lines for the report.

A test records one `Figure` per attack before it asserts, so a failed attack still shows in
docs/reliability.md. Recording is on when `ARKS_CHAOS_FIGURES` names a file (`make chaos`);
otherwise figures go nowhere (`make test`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FIGURES_ENV = "ARKS_CHAOS_FIGURES"


@dataclass(frozen=True)
class Figure:
    """One attack: requests (or cases) tried, how many were answered or refused as documented,
    and, where the engine's own counters are the truth, the tokens it did vs the tokens charged."""

    group: str
    attack: str
    parameters: dict[str, Any]
    tried: int
    held: int
    engine_tokens: int | None = None
    charged_tokens: int | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lost_tokens(self) -> int | None:
        """Engine truth minus charged (negative: charged more than the engine did)."""
        if self.engine_tokens is None or self.charged_tokens is None:
            return None
        return self.engine_tokens - self.charged_tokens

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Figure:
        return cls(**json.loads(line))


class Recorder:
    """Appends figures to a JSON-lines file, or drops them when there is none."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    @classmethod
    def from_env(cls) -> Recorder:
        name = os.environ.get(FIGURES_ENV)
        return cls(Path(name) if name else None)

    def record(self, figure: Figure) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(figure.to_json() + "\n")


def read_figures(path: Path) -> list[Figure]:
    if not path.exists():
        return []
    return [Figure.from_json(line) for line in path.read_text().splitlines() if line.strip()]
