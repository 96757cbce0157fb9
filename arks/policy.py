"""The policy snapshot: every token, endpoint, backend and quota the gateway knows, immutable.

A snapshot is built whole from a list of Kubernetes-style objects and swapped atomically, so a
request always sees one consistent policy. Sources (a YAML file here, the API server later)
only produce object lists; `build_policy` is the one place that turns them into a snapshot.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from arks import api
from arks.api import ArksEndpoint, ArksQuota, ArksToken, Backend, ObjectError, ObjectKey, Secret

log = logging.getLogger(__name__)

_PARSERS: Mapping[tuple[str, str], Callable[[Mapping[str, Any]], Any]] = {
    ("gateway.envoyproxy.io", "Backend"): api.parse_backend,
    ("arks.ai", "ArksEndpoint"): api.parse_endpoint,
    ("arks.ai", "ArksToken"): api.parse_token,
    ("arks.ai", "ArksQuota"): api.parse_quota,
    ("", "Secret"): api.parse_secret,
}
# Kinds a policy file may hold that the gateway itself does not read (the controller does).
_IGNORED = {
    ("arks.ai", "ArksModel"),
    ("arks.ai", "ArksApplication"),
    ("arks.ai", "ArksDisaggregatedApplication"),
}


class PolicyError(ValueError):
    """A policy document is wrong; the message names the source, the document and the field."""


@dataclass(frozen=True)
class Policy:
    backends: Mapping[ObjectKey, Backend] = field(default_factory=dict)
    endpoints: Mapping[ObjectKey, ArksEndpoint] = field(default_factory=dict)
    tokens_by_digest: Mapping[str, ArksToken] = field(default_factory=dict)
    quotas: Mapping[ObjectKey, ArksQuota] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    version: str = "0"

    def token(self, digest: str) -> ArksToken | None:
        return self.tokens_by_digest.get(digest)

    def endpoint(self, namespace: str, model: str) -> ArksEndpoint | None:
        return self.endpoints.get(ObjectKey(namespace, model))

    def models_for(self, token: ArksToken) -> list[str]:
        """The public model names this token may use and that exist, in grant order."""
        namespace = token.key.namespace
        return [q.endpoint for q in token.qos if ObjectKey(namespace, q.endpoint) in self.endpoints]


def _group_kind(obj: Mapping[str, Any]) -> tuple[str, str]:
    api_version = obj.get("apiVersion")
    kind = obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        raise ObjectError("apiVersion", "apiVersion and kind are required")
    group = api_version.rpartition("/")[0]
    return group, kind


def _describe(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
    assert isinstance(meta, Mapping)
    return f"{obj.get('kind', '?')} {meta.get('namespace', 'default')}/{meta.get('name', '?')}"


def build_policy(
    objects: Iterable[tuple[str, Mapping[str, Any]]],
    version: str = "0",
    *,
    drop_duplicate_tokens: bool = False,
) -> Policy:
    """Build a snapshot from `(where, object)` pairs; `where` names the object in errors.

    Two tokens with the same value are an error: whose user a request belongs to would be
    ambiguous. A file is fixed by its one author, so the file source refuses the snapshot.
    In a cluster many tenants write tokens, and one clash must not freeze everyone's
    changes: with `drop_duplicate_tokens` both tokens are left out, with a warning.
    """
    backends: dict[ObjectKey, Backend] = {}
    endpoints: dict[ObjectKey, ArksEndpoint] = {}
    tokens: list[tuple[str, ArksToken]] = []
    quotas: dict[ObjectKey, ArksQuota] = {}
    secrets: dict[ObjectKey, Secret] = {}
    seen: dict[tuple[str, str, ObjectKey], str] = {}
    for where, obj in objects:
        if not isinstance(obj, Mapping):
            raise PolicyError(f"{where}: expected a Kubernetes object (a mapping)")
        try:
            group_kind = _group_kind(obj)
            if group_kind in _IGNORED:
                continue
            parser = _PARSERS.get(group_kind)
            if parser is None:
                raise ObjectError("kind", f"unsupported kind {obj['apiVersion']}/{obj['kind']}")
            parsed = parser(obj)
        except ObjectError as err:
            raise PolicyError(f"{where} ({_describe(obj)}): {err}") from err
        ident = (*group_kind, parsed.key)
        if ident in seen:
            raise PolicyError(f"{where} ({_describe(obj)}): duplicate of {seen[ident]}")
        seen[ident] = where
        match parsed:
            case Backend():
                backends[parsed.key] = parsed
            case ArksEndpoint():
                endpoints[parsed.key] = parsed
            case ArksToken():
                tokens.append((where, parsed))
            case ArksQuota():
                quotas[parsed.key] = parsed
            case Secret():
                secrets[parsed.key] = parsed

    warnings: list[str] = []
    by_digest: dict[str, ArksToken] = {}
    clashing: dict[str, ArksToken] = {}  # digest -> the first token that had it
    for where, token in tokens:
        digest = token.token_hash
        if token.secret_ref is not None:
            digest = secret_digest(token, secrets)
            if digest is None:
                warnings.append(secret_warning(token))
                continue
        if token.plain_token_given:
            warnings.append(
                f"ArksToken {token.key}: spec.token holds a plain token; use tokenHash or tokenSecretRef"
            )
        assert digest is not None
        if digest in by_digest or digest in clashing:
            first = by_digest.pop(digest, None) or clashing[digest]
            message = f"{where} (ArksToken {token.key}): same token as ArksToken {first.key}"
            if not drop_duplicate_tokens:
                raise PolicyError(message)
            warnings.append(f"{message}; neither is accepted until one changes")
            clashing[digest] = first
            continue
        by_digest[digest] = token
    for token in by_digest.values():  # what an accepted token names that does not exist
        for qos in token.qos:
            if ObjectKey(token.key.namespace, qos.endpoint) not in endpoints:
                warnings.append(
                    f"ArksToken {token.key}: grants unknown ArksEndpoint {qos.endpoint!r}"
                )
            if qos.quota and ObjectKey(token.key.namespace, qos.quota) not in quotas:
                warnings.append(
                    f"ArksToken {token.key}: references unknown ArksQuota {qos.quota!r}"
                )
    for endpoint in endpoints.values():
        for ref in endpoint.route_configs:
            if ref.kind == "Backend" and ref.key not in backends:
                warnings.append(
                    f"ArksEndpoint {endpoint.key}: references unknown Backend {ref.key}"
                )
    return Policy(backends, endpoints, by_digest, quotas, tuple(warnings), version)


def secret_digest(token: ArksToken, secrets: Mapping[ObjectKey, Secret]) -> str | None:
    """The digest of a tokenSecretRef token: from its Secret when the objects hold it (a policy
    file), else the one the controller published in the token's status (a cluster, where the
    gateway reads no Secrets); None when neither gives one."""
    assert token.secret_ref is not None
    secret = secrets.get(ObjectKey(token.key.namespace, token.secret_ref.name))
    if secret is None:
        return token.published_hash
    plain = secret.data.get(token.secret_ref.key)
    plain = plain.strip() if plain else None  # `kubectl create secret --from-file` keeps a newline
    return api.token_digest(plain) if plain else None


def secret_warning(token: ArksToken) -> str:
    assert token.secret_ref is not None
    return (
        f"ArksToken {token.key}: secret {token.secret_ref.name!r} key {token.secret_ref.key!r} "
        "not found (nor its digest in status.tokenHash); the token is not usable"
    )


# libyaml's loader when PyYAML was built with it (its wheels are): a policy file of thousands of
# tokens parses ~7x faster (3,000 tokens: 1.28 s -> 0.17 s), the same documents.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_policy_file(path: Path) -> list[tuple[str, Mapping[str, Any]]]:
    """The documents of a multi-document YAML file, each named `FILE: document N`."""
    try:
        text = path.read_text()
    except OSError as err:
        raise PolicyError(f"{path}: cannot read: {err.strerror}") from err
    try:
        documents = list(yaml.load_all(text, Loader=_YAML_LOADER))
    except yaml.YAMLError as err:
        raise PolicyError(f"{path}: not valid YAML: {err}") from err
    out: list[tuple[str, Mapping[str, Any]]] = []
    for index, doc in enumerate(documents, start=1):
        if doc is None:
            continue
        if isinstance(doc, Mapping) and doc.get("kind") == "List":
            if not isinstance(doc.get("items") or [], list):
                raise PolicyError(f"{path}: document {index} (List): items: expected a list")
            out.extend(
                (f"{path}: document {index} item {i}", item)
                for i, item in enumerate(doc.get("items") or [])
            )
        else:
            out.append((f"{path}: document {index}", doc))
    return out


def load_policy_file(path: Path) -> Policy:
    """The policy a file holds. A file with no object at all (empty, only comments, or cut
    before its first document ended) is refused: it is never what anyone meant to serve."""
    stat = path.stat() if path.exists() else None
    version = f"{stat.st_mtime_ns}-{stat.st_size}" if stat else "0"
    objects = read_policy_file(path)
    if not objects:
        raise PolicyError(f"{path}: no objects (an empty or comment-only file is not a policy)")
    return build_policy(objects, version=version)


def removes_everything(old: Policy, new: Policy) -> str | None:
    """Why `new` must not replace `old`: it would drop every token or every endpoint at once,
    which is what a truncated or half-written file looks like; None when it may."""
    for what, before, after in (
        ("token", len(old.tokens_by_digest), len(new.tokens_by_digest)),
        ("endpoint", len(old.endpoints), len(new.endpoints)),
    ):
        if before and not after:
            return f"it would remove every {what} ({before} -> 0)"
    return None


class PolicySource(Protocol):
    """Where a service gets its policy: `current()` is always a complete snapshot."""

    def current(self) -> Policy: ...


class FilePolicySource:
    """A policy YAML file, reloaded when it changes; a bad file keeps the last good snapshot.

    A file is read only once it has not changed for `settle_s` (so a write in progress is never
    read half done), and a reload that would remove every token or endpoint is refused.
    """

    def __init__(
        self,
        path: Path,
        interval: float = 0.5,
        settle_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.interval = interval
        self.settle_s = settle_s
        self._clock = clock
        self._policy = load_policy_file(path)
        self._stamp = self._file_stamp()
        self.reloads = 0
        self.errors = 0
        self._log_warnings(self._policy)

    def current(self) -> Policy:
        return self._policy

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _settling(self, stamp: tuple[int, int, int] | None) -> bool:
        """Whether the file changed less than `settle_s` ago (a writer may not be done)."""
        return stamp is not None and self._clock() - stamp[0] / 1e9 < self.settle_s

    @staticmethod
    def _log_warnings(policy: Policy) -> None:
        for warning in policy.warnings:
            log.warning("policy: %s", warning)

    def reload_if_changed(self) -> bool:
        stamp = self._file_stamp()
        if stamp == self._stamp or self._settling(stamp):
            return False
        self._stamp = stamp
        try:
            policy = load_policy_file(self.path)
            refused = removes_everything(self._policy, policy)
            if refused:
                raise PolicyError(
                    f"{self.path}: not applied: {refused}, as a truncated or half-written file "
                    "would; if that is meant, restart with this file"
                )
        except PolicyError as err:
            self.errors += 1
            log.error("policy reload failed, keeping the last good policy: %s", err)
            return False
        self._policy = policy
        self.reloads += 1
        log.info(
            "policy reloaded from %s: %d tokens, %d endpoints, %d backends, %d quotas",
            self.path,
            len(policy.tokens_by_digest),
            len(policy.endpoints),
            len(policy.backends),
            len(policy.quotas),
        )
        self._log_warnings(policy)
        return True
