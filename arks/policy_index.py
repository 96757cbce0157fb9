"""The cluster's policy kept up to date one object at a time: each change costs O(that change).

`build_policy` turns a whole list of objects into a snapshot; in a cluster, where objects change
one by one (and 100,000 tokens take seconds to parse), `PolicyIndex` applies one parsed object
at a time instead — a token, endpoint, quota or Backend added, changed or removed — and updates
only the indexes it touches: the token's digest (and the tokens sharing it), the reverse
references that decide the warnings (tokens naming an endpoint or quota, endpoints naming a
Backend). `snapshot()` then gives the same `Policy` that `build_policy(all objects,
drop_duplicate_tokens=True)` would (its warnings kept apart, see `warnings()`), copying only the
maps that changed.

The rules are build_policy's (tests/unit/arks/test_policy_index.py holds them equal after any
sequence of changes): a token held in a Secret counts by the digest the controller published in
its status (the gateway reads no Secrets); two or more tokens with one digest are all left out,
with a warning on each but the first by namespace/name, until one changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from arks.api import ArksEndpoint, ArksQuota, ArksToken, Backend, ObjectKey
from arks.policy import Policy, secret_warning

TOKEN, ENDPOINT, QUOTA, BACKEND = "ArksToken", "ArksEndpoint", "ArksQuota", "Backend"
KINDS = (TOKEN, ENDPOINT, QUOTA, BACKEND)


def where(kind: str, key: ObjectKey) -> str:
    """How an object is named in warnings (and the `where` given to build_policy alike)."""
    return f"{kind} {key}"


def _order(key: ObjectKey) -> tuple[str, str]:
    return (key.namespace, key.name)


class PolicyIndex:
    """Mutable, single-writer: one thread applies changes and takes snapshots."""

    def __init__(self) -> None:
        self.tokens: dict[ObjectKey, ArksToken] = {}
        self.endpoints: dict[ObjectKey, ArksEndpoint] = {}
        self.quotas: dict[ObjectKey, ArksQuota] = {}
        self.backends: dict[ObjectKey, Backend] = {}
        self.tokens_by_digest: dict[str, ArksToken] = {}
        self._digest_of: dict[ObjectKey, str] = {}
        self._holders: dict[str, set[ObjectKey]] = {}
        # reverse references: who names an endpoint / quota / Backend (for the warnings)
        self._granting: dict[ObjectKey, set[ObjectKey]] = {}
        self._charging: dict[ObjectKey, set[ObjectKey]] = {}
        self._routing: dict[ObjectKey, set[ObjectKey]] = {}
        self._warnings: dict[tuple[str, ObjectKey], tuple[str, ...]] = {}
        self._stale: set[tuple[str, ObjectKey]] = set()  # whose warnings to recompute
        self._changed: set[str] = set()  # the maps changed since the last snapshot
        self._last = Policy()

    # --- changes ----------------------------------------------------------------------------

    def apply(self, kind: str, key: ObjectKey, parsed: Any | None) -> bool:
        """Put `parsed` (None: remove) as the object `kind` `key`; whether anything changed."""
        tables: dict[str, dict[ObjectKey, Any]] = {
            TOKEN: self.tokens,
            ENDPOINT: self.endpoints,
            QUOTA: self.quotas,
            BACKEND: self.backends,
        }
        old = tables[kind].get(key)
        if old == parsed:
            return False
        if kind == TOKEN:
            self._token(key, old, parsed)
        elif kind == ENDPOINT:
            self._endpoint(key, old, parsed)
        elif kind == QUOTA:
            self._set(self.quotas, "quotas", key, parsed)
            self._stale.update((TOKEN, t) for t in self._charging.get(key, ()))
        else:
            self._set(self.backends, "backends", key, parsed)
            self._stale.update((ENDPOINT, e) for e in self._routing.get(key, ()))
        return True

    def _set(self, table: dict[ObjectKey, Any], name: str, key: ObjectKey, value: Any) -> None:
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
        self._changed.add(name)

    def _token(self, key: ObjectKey, old: ArksToken | None, new: ArksToken | None) -> None:
        touched: set[str] = set()
        if old is not None:
            for qos in old.qos:
                _unlink(self._granting, ObjectKey(key.namespace, qos.endpoint), key)
                if qos.quota:
                    _unlink(self._charging, ObjectKey(key.namespace, qos.quota), key)
            digest = self._digest_of.pop(key, None)
            if digest is not None:
                _unlink(self._holders, digest, key)
                touched.add(digest)
        self._set(self.tokens, "tokens", key, new)
        if new is not None:
            for qos in new.qos:
                self._granting.setdefault(ObjectKey(key.namespace, qos.endpoint), set()).add(key)
                if qos.quota:
                    self._charging.setdefault(ObjectKey(key.namespace, qos.quota), set()).add(key)
            digest = new.published_hash if new.secret_ref is not None else new.token_hash
            if digest is not None:
                self._digest_of[key] = digest
                self._holders.setdefault(digest, set()).add(key)
                touched.add(digest)
        self._stale.add((TOKEN, key))
        for digest in touched:
            holders = self._holders.get(digest, set())
            if len(holders) == 1:
                (only,) = holders
                self.tokens_by_digest[digest] = self.tokens[only]
            else:
                self.tokens_by_digest.pop(digest, None)
            self._stale.update((TOKEN, k) for k in holders)
        self._changed.add("tokens_by_digest")

    def _endpoint(self, key: ObjectKey, old: ArksEndpoint | None, new: ArksEndpoint | None) -> None:
        for ref in old.route_configs if old is not None else ():
            if ref.kind == "Backend":
                _unlink(self._routing, ref.key, key)
        for ref in new.route_configs if new is not None else ():
            if ref.kind == "Backend":
                self._routing.setdefault(ref.key, set()).add(key)
        self._set(self.endpoints, "endpoints", key, new)
        self._stale.add((ENDPOINT, key))
        self._stale.update((TOKEN, t) for t in self._granting.get(key, ()))

    # --- reading ----------------------------------------------------------------------------

    def snapshot(self, version: str) -> Policy:
        """The policy now; maps that did not change since the last snapshot are shared with it.
        Its `warnings` are left empty: `warnings()` has them (a cluster's can be many)."""
        last = self._last
        self._last = Policy(
            backends=dict(self.backends) if "backends" in self._changed else last.backends,
            endpoints=dict(self.endpoints) if "endpoints" in self._changed else last.endpoints,
            tokens_by_digest=(
                dict(self.tokens_by_digest)
                if "tokens_by_digest" in self._changed
                else last.tokens_by_digest
            ),
            quotas=dict(self.quotas) if "quotas" in self._changed else last.quotas,
            version=version,
        )
        self._changed.clear()
        return self._last

    def refresh_warnings(self) -> list[str]:
        """Recompute the warnings of the objects a change touched; the ones that are new."""
        fresh: list[str] = []
        for kind, key in self._stale:
            before = self._warnings.pop((kind, key), ())
            now = tuple(
                self._token_warnings(key) if kind == TOKEN else self._endpoint_warnings(key)
            )
            if now:
                self._warnings[(kind, key)] = now
            fresh.extend(w for w in now if w not in before)
        self._stale.clear()
        return fresh

    def warnings(self) -> list[str]:
        """Every warning build_policy would give for these objects, sorted."""
        self.refresh_warnings()
        return sorted(w for ws in self._warnings.values() for w in ws)

    def _token_warnings(self, key: ObjectKey) -> Iterable[str]:
        token = self.tokens.get(key)
        if token is None:
            return
        digest = self._digest_of.get(key)
        if digest is None:  # a tokenSecretRef token with no digest published (yet)
            yield secret_warning(token)
            return
        if token.plain_token_given:
            yield f"ArksToken {key}: spec.token holds a plain token; use tokenHash or tokenSecretRef"
        holders = self._holders[digest]
        if len(holders) > 1:
            first = min(holders, key=_order)
            if key != first:
                yield (
                    f"{where(TOKEN, key)} (ArksToken {key}): same token as ArksToken {first}; "
                    "neither is accepted until one changes"
                )
            return
        for qos in token.qos:
            if ObjectKey(key.namespace, qos.endpoint) not in self.endpoints:
                yield f"ArksToken {key}: grants unknown ArksEndpoint {qos.endpoint!r}"
            if qos.quota and ObjectKey(key.namespace, qos.quota) not in self.quotas:
                yield f"ArksToken {key}: references unknown ArksQuota {qos.quota!r}"

    def _endpoint_warnings(self, key: ObjectKey) -> Iterable[str]:
        endpoint = self.endpoints.get(key)
        for ref in endpoint.route_configs if endpoint is not None else ():
            if ref.kind == "Backend" and ref.key not in self.backends:
                yield f"ArksEndpoint {key}: references unknown Backend {ref.key}"


def _unlink(index: dict[Any, set[ObjectKey]], at: Any, key: ObjectKey) -> None:
    found = index.get(at)
    if found is not None:
        found.discard(key)
        if not found:
            del index[at]
