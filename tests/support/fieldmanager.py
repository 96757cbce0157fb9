"""Server-side apply's field ownership, for the Kubernetes API emulator: pure functions.

A subset of what the API server does with `metadata.managedFields` (structured-merge-diff's
`Updater`, as the Kubernetes docs describe it:
https://kubernetes.io/docs/reference/using-api/server-side-apply/):

* every write records which fields it set under its manager: an apply under (manager, Apply),
  any other write (create, update, merge patch, status, scale) under (manager, Update,
  subresource), the manager being `?fieldManager=` or else the User-Agent up to its first `/`;
* a field whose value a write changes moves to that writer: it leaves every other manager;
* an apply that changes a field another manager owns fails with 409 Conflict unless forced;
  setting the same value shares the field;
* a field a manager applied before and leaves out now is removed from the object, unless
  another manager owns it (then it keeps its value); a removed field with a default gets it
  back (done by the emulator after this step);
* a manager left owning nothing disappears from managedFields.

Simplifications: every list is atomic (owned whole, as for a list without list-type markers),
maps and objects are granular; client-sent managedFields are ignored; no cap on the number of
Update managers; apiVersion conversion does not arise (one version per resource).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Path = tuple[str, ...]
FieldSet = frozenset[Path]

APPLY = "Apply"
UPDATE = "Update"

# Set by the server, never owned by a manager (stripped as the API server's fieldmanager does).
IGNORED: frozenset[Path] = frozenset(
    {
        ("apiVersion",),
        ("kind",),
        ("metadata", "name"),
        ("metadata", "namespace"),
        ("metadata", "uid"),
        ("metadata", "resourceVersion"),
        ("metadata", "generation"),
        ("metadata", "creationTimestamp"),
        ("metadata", "deletionTimestamp"),
        ("metadata", "deletionGracePeriodSeconds"),
        ("metadata", "managedFields"),
        ("metadata", "selfLink"),
    }
)


@dataclass(frozen=True)
class Manager:
    """One managedFields entry's identity, as the API server keys them."""

    name: str
    operation: str
    subresource: str = ""


@dataclass(frozen=True)
class Conflict:
    manager: Manager
    api_version: str
    path: Path


class ConflictError(Exception):
    """An apply would change fields other managers own (HTTP 409)."""

    def __init__(self, conflicts: list[Conflict]) -> None:
        self.conflicts = conflicts
        count = len(conflicts)
        details = "\n".join(f"- {describe(c)}: {dotted(c.path)}" for c in conflicts)
        if count == 1:
            message = f"Apply failed with 1 conflict: {describe(conflicts[0])}: {dotted(conflicts[0].path)}"
        else:
            message = f"Apply failed with {count} conflicts: \n{details}"
        super().__init__(message)
        self.message = message

    def causes(self) -> list[dict[str, str]]:
        return [
            {"reason": "FieldManagerConflict", "message": describe(c), "field": dotted(c.path)}
            for c in self.conflicts
        ]


def describe(conflict: Conflict) -> str:
    manager = conflict.manager
    text = f"conflict with {manager.name!r}".replace("'", '"')
    if manager.subresource:
        text += f' with subresource "{manager.subresource}"'
    if manager.operation == UPDATE:
        text += f" using {conflict.api_version}"
    return text


def dotted(path: Path) -> str:
    return "".join(f".{part}" for part in path)


def manager_from(field_manager: str | None, user_agent: str) -> str:
    """`?fieldManager=` if given, else the User-Agent's prefix before its first `/`
    (apiserver's `prefixFromUserAgent`)."""
    if field_manager:
        return field_manager
    return "".join(ch for ch in user_agent.split("/")[0] if ch.isprintable())[:128]


# --- field sets ---------------------------------------------------------------------------


def leaves(obj: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Every owned-able field of `obj` with its value: scalars, lists (atomic) and empty maps."""
    out: dict[Path, Any] = {}
    for key, value in obj.items():
        path = (*prefix, str(key))
        if path in IGNORED:
            continue
        if isinstance(value, dict) and value:
            out.update(leaves(value, path))
        else:
            out[path] = value
    return out


def field_set(obj: Mapping[str, Any]) -> FieldSet:
    return frozenset(leaves(obj))


def encode(fields: Iterable[Path]) -> dict[str, Any]:
    """FieldsV1: nested `f:<name>` keys, a leaf being `{}`."""
    out: dict[str, Any] = {}
    for path in sorted(fields):
        node = out
        for part in path:
            node = node.setdefault(f"f:{part}", {})
    return out


def decode(fields_v1: Mapping[str, Any], prefix: Path = ()) -> FieldSet:
    out: set[Path] = set()
    for key, value in fields_v1.items():
        if key == ".":
            out.add(prefix)
            continue
        name = key[2:] if key.startswith("f:") else key
        path = (*prefix, name)
        if value:
            out |= decode(value, path)
        else:
            out.add(path)
    return frozenset(out)


# --- managedFields ------------------------------------------------------------------------


@dataclass(frozen=True)
class Owned:
    """One manager's fields, with the entry's bookkeeping."""

    fields: FieldSet
    api_version: str
    time: str


Managed = dict[Manager, Owned]


def managed_of(obj: Mapping[str, Any] | None) -> Managed:
    """The managers of a stored object, in managedFields order."""
    managed: Managed = {}
    for entry in ((obj or {}).get("metadata") or {}).get("managedFields") or []:
        key = Manager(entry["manager"], entry["operation"], entry.get("subresource", ""))
        managed[key] = Owned(
            decode(entry.get("fieldsV1") or {}), entry.get("apiVersion", ""), entry.get("time", "")
        )
    return managed


def entries(managed: Managed) -> list[dict[str, Any]]:
    out = []
    for key, owned in managed.items():
        entry: dict[str, Any] = {
            "manager": key.name,
            "operation": key.operation,
            "apiVersion": owned.api_version,
            "time": owned.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": encode(owned.fields),
        }
        if key.subresource:
            entry["subresource"] = key.subresource
        out.append(entry)
    return out


def _compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[set[Path], set[Path]]:
    """(modified or added, removed) fields between two versions of an object."""
    before, after = leaves(old), leaves(new)
    changed = {p for p, v in after.items() if p not in before or before[p] != v}
    return changed, set(before) - set(after)


def _overlaps(owned: FieldSet, paths: set[Path]) -> set[Path]:
    """The `paths` a manager owning `owned` has a say in: the same field, or one inside it, or
    one it is inside (a whole list or map)."""
    hits = set()
    for path in paths:
        for mine in owned:
            if mine == path or mine[: len(path)] == path or path[: len(mine)] == mine:
                hits.add(mine)
    return hits


def record_write(
    live: Mapping[str, Any],
    new: Mapping[str, Any],
    writer: Manager,
    now: str,
    *,
    applied: FieldSet | None = None,
    force: bool = True,
) -> list[dict[str, Any]]:
    """The managedFields of `new` after `writer` turned `live` into it.

    `applied` is the field set of an apply's configuration (None for any other write, whose
    writer gains the fields it changed). Raises ConflictError for an apply without `force`
    changing fields another manager owns."""
    managed = managed_of(live)
    api_version = str(new.get("apiVersion", ""))
    changed, removed = _compare(live, new)
    conflicts = []
    after: Managed = {}
    for key, owned in managed.items():
        if key == writer:
            continue
        taken = _overlaps(owned.fields, changed)
        if taken and applied is not None and not force:
            conflicts += [Conflict(key, owned.api_version, p) for p in sorted(taken)]
        kept = owned.fields - taken - _overlaps(owned.fields, removed)
        if kept:
            after[key] = owned if kept == owned.fields else Owned(kept, owned.api_version, now)
    if conflicts:
        raise ConflictError(conflicts)
    previous = managed.get(writer)
    if applied is not None:
        mine = applied
    else:
        mine = ((previous.fields if previous else frozenset()) - removed) | changed
    mine = frozenset(p for p in mine if p not in IGNORED)
    if mine:
        unchanged = previous is not None and previous.fields == mine and not changed
        after[writer] = previous if unchanged and previous else Owned(mine, api_version, now)
    # Keep the stored order; a new manager goes last.
    order = [k for k in managed if k in after] + [k for k in after if k not in managed]
    return entries({k: after[k] for k in order})


def prune_unapplied(
    merged: Mapping[str, Any], live: Mapping[str, Any] | None, writer: Manager, applied: FieldSet
) -> dict[str, Any]:
    """`merged` without the fields `writer` applied last time and leaves out now, unless
    another manager owns them (the doc: "it is either deleted from the live object or reset to
    its default value"; the default is the emulator's to put back)."""
    managed = managed_of(live)
    previous = managed.get(writer)
    result = copy.deepcopy(dict(merged))
    if previous is None:
        return result
    others = frozenset().union(*(o.fields for k, o in managed.items() if k != writer))
    for path in sorted(previous.fields - applied):
        if path in others or _overlaps(applied, {path}):
            continue
        _remove(result, path)
    return result


def _remove(obj: dict[str, Any], path: Path) -> None:
    parents = [obj]
    node: Any = obj
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return
        parents.append(node)
    node.pop(path[-1], None)
    # A map left empty by the removal goes too (but never a top-level field).
    for depth in range(len(path) - 1, 1, -1):
        parent, key = parents[depth - 1], path[depth - 1]
        if parent.get(key) == {}:
            parent.pop(key)
        else:
            break
