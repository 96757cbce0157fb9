"""The stores' versioned schema migrations: `migrations/<dialect>/NNNN_<name>.sql`, applied in
version order, each once (the store records the versions it applied in `schema_migrations`).

A migration is never edited once released: a change is a new file with the next number, so a
database at any version reaches the newest by applying what it lacks.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Dialect = Literal["sqlite", "postgresql"]
ROOT = Path(__file__).parent / "migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load(dialect: Dialect, root: Path = ROOT) -> list[Migration]:
    """The dialect's migrations in version order; a misnamed file or a gap in the numbers is an
    error here rather than a schema that silently skips a step."""
    found = []
    for path in sorted((root / dialect).iterdir()):
        if path.suffix != ".sql":
            continue
        match = _NAME.match(path.name)
        if match is None:
            raise ValueError(f"{path}: a migration is named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ValueError(f"{root / dialect}: migration versions {versions} are not 1, 2, 3, ...")
    return found


def pending(migrations: Sequence[Migration], applied: Iterable[int]) -> list[Migration]:
    """The migrations not applied yet, in order."""
    done = set(applied)
    return [m for m in migrations if m.version not in done]


def statements(script: str) -> list[str]:
    """A SQLite script split into complete statements (`sqlite3.Connection.executescript` would
    commit the transaction the migration runs in; one statement at a time keeps it whole)."""
    found, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            found.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in buffer.splitlines()
    ):
        raise ValueError(f"an incomplete SQL statement at the end: {buffer.strip()[:80]!r}")
    return found
