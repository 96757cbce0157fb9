"""The usage ledger's stores: SQLite (embedded, the default) and PostgreSQL (clusters).

`open_ledger(url)` picks one from a URL: `sqlite:///relative/usage.db`,
`sqlite:////absolute/usage.db` (SQLAlchemy's spelling) or a bare path for SQLite;
`postgresql://user@host:port/db` (or `postgres://`) for PostgreSQL, in libpq's URL syntax.
The store is not migrated yet: call `migrate()` once at start-up.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from arks.adapters.ledger.postgres import PostgresLedger
from arks.adapters.ledger.sqlite import SqliteLedger
from arks.ledger import LedgerStore

__all__ = ["PostgresLedger", "SqliteLedger", "open_ledger", "where"]


def sqlite_path(url: str) -> str | None:
    """The SQLite file a URL names, or None when it names no SQLite file."""
    if url.startswith("sqlite:///"):
        return url.removeprefix("sqlite:///")
    if url.startswith("sqlite:"):
        raise ValueError(f"a SQLite ledger URL is sqlite:///path (got {url!r})")
    if "://" in url:
        return None
    return url


def open_ledger(url: str) -> LedgerStore:
    """The store `url` names (see the module's docstring)."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresLedger(url)
    path = sqlite_path(url)
    if not path:
        raise ValueError(
            f"a ledger URL is sqlite:///path, a path or postgresql://... (got {url!r})"
        )
    return SqliteLedger(path)


def where(url: str) -> str:
    """The ledger's location for messages and logs, without a password the URL may carry."""
    if url.startswith(("postgresql://", "postgres://")):
        parsed = urlsplit(url)
        return f"postgresql://{parsed.hostname or ''}:{parsed.port or 5432}{parsed.path}"
    return url
