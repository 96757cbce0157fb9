"""The rate-limit configuration in envoyproxy/ratelimit's YAML format, as an immutable snapshot.

One file per domain; a domain is a tree of descriptors. A request descriptor (a list of
(key, value) entries) walks the tree one level per entry and gets the limit of the node it
reaches. `parse_config` is the pure core; `load_config` only reads files around it.

Wildcards as upstream reads them: each `*` of a value matches any run of characters (zero or
more), `bar*b`, `foo*bar*baz` and a trailing `foo*` alike; an exact value wins, then the first
matching wildcard in the file's order, then a descriptor without a value. `share_threshold` on a
wildcard makes every value it matches share one counter (keyed by the pattern). Several files of
one domain are merged when asked (`merge_domains`, upstream's MERGE_DOMAIN_CONFIG); otherwise a
domain in two files is an error, as upstream's default.

Differences from envoyproxy/ratelimit, all on the strict side: unknown or misplaced keys are
errors (upstream ignores a key valid elsewhere), keys and values must be YAML strings (so
`value: 0123` cannot silently become "83"), limit names are unique per domain and `replaces`
must name one of them. `value_to_metric` names a limit's metrics by the request's values as
upstream does; a descriptor's `metadata` is kept with its limit (upstream returns it in the
response's dynamic metadata only when asked to); `quota_mode` as upstream: such a limit over its
count refuses the request only when every quota-mode descriptor of it is over. Our extension:
`rate_limit.algorithm` (`fixed_window`, the default, or `gcra`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

from arks.limits.model import Algorithm, RateLimit, Unit

MAX_REQUESTS_PER_UNIT = 2**32 - 1  # a uint32 in envoyproxy/ratelimit and in Envoy's proto

_T = TypeVar("_T")

_ROOT_FIELDS = ("domain", "descriptors")
_DESCRIPTOR_FIELDS = (
    "key",
    "value",
    "rate_limit",
    "shadow_mode",
    "quota_mode",
    "detailed_metric",
    "share_threshold",
    "value_to_metric",
    "metadata",
    "descriptors",
)
_RATE_LIMIT_FIELDS = ("unit", "requests_per_unit", "name", "unlimited", "replaces", "algorithm")
_REPLACES_FIELDS = ("name",)
# Where a key found in the wrong mapping belongs, for a hint in the error.
_HOME = {
    **{name: "the file's top level" for name in _ROOT_FIELDS},
    **{name: "a descriptor" for name in _DESCRIPTOR_FIELDS},
    **{name: "a rate_limit" for name in _RATE_LIMIT_FIELDS},
}
_KIND_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    bool: "true or false",
    list: "a list",
    dict: "a mapping",
}


class ConfigError(ValueError):
    """One configuration file is wrong: which file, where in it (dotted path), and what."""

    def __init__(self, file: str, path: str, problem: str) -> None:
        super().__init__(f"{file}: {path}: {problem}")
        self.file = file
        self.path = path
        self.problem = problem


def wildcard_match(parts: Sequence[str], value: str) -> bool:
    """Whether `value` matches a wildcard value split on its `*`s (each matches zero or more
    characters): it starts with the first part, ends with the last, holds the others in order."""
    first, *middle, last = parts
    if len(value) < sum(map(len, parts)) or not value.startswith(first):
        return False
    if not value.endswith(last):
        return False
    at, end = len(first), len(value) - len(last)
    for part in middle:
        found = value.find(part, at, end)
        if found < 0:
            return False
        at = found + len(part)
    return True


@dataclass(frozen=True)
class Wildcard:
    """A child descriptor whose value holds a `*`."""

    key: str
    value: str  # as configured, e.g. `files/*`
    node: DescriptorNode
    share_threshold: bool  # every value it matches shares one counter, keyed by `value`
    parts: tuple[str, ...] = field(init=False)  # `value` split on its `*`s, once

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.value.split("*")))


@dataclass(frozen=True)
class DescriptorNode:
    """One node of a domain's descriptor tree: its limit, if any, and its children by match kind."""

    limit: RateLimit | None
    exact: Mapping[tuple[str, str], DescriptorNode]  # (key, value) → node
    wildcards: Mapping[str, tuple[Wildcard, ...]]  # key → its wildcards, in the file's order
    any_value: Mapping[str, DescriptorNode]  # key → node of a descriptor without a value
    value_to_metric: bool = False  # metrics name the request's value at this level

    def child(self, key: str, value: str) -> tuple[DescriptorNode, Wildcard | None, bool] | None:
        """The child matching one entry, as upstream picks it: the exact value, else the first
        matching wildcard (and which), else the key without a value (the last: whether the
        value was matched exactly)."""
        node = self.exact.get((key, value))
        if node is not None:
            return node, None, True
        for wildcard in self.wildcards.get(key, ()):
            if wildcard_match(wildcard.parts, value):
                return wildcard.node, wildcard, False
        node = self.any_value.get(key)
        return None if node is None else (node, None, False)

    def children(self) -> list[DescriptorNode]:
        return [
            *self.exact.values(),
            *(w.node for found in self.wildcards.values() for w in found),
            *self.any_value.values(),
        ]

    def metric_value(self, value: str, wildcard: Wildcard | None, exact: bool) -> str:
        """What upstream's value_to_metric names this level by, reached by `value` (after the
        key and "_"; "" for the key alone)."""
        if wildcard is not None:
            if wildcard.share_threshold or not self.value_to_metric:
                return wildcard.value
            return value
        return value if exact or self.value_to_metric else ""


@dataclass(frozen=True)
class RateLimitConfig:
    """Every domain's descriptor tree. Never changed after loading: a reload builds a new one."""

    domains: Mapping[str, DescriptorNode] = field(default_factory=lambda: MappingProxyType({}))
    # The domains with a `value_to_metric` descriptor: only their lookups build metric names.
    value_to_metric: frozenset[str] = frozenset()

    def lookup(self, domain: str, entries: Sequence[tuple[str, str]]) -> RateLimit | None:
        """The limit for one request descriptor, as envoyproxy/ratelimit finds it: one tree level
        per entry, no backtracking; the limit of the node reached after the last entry, if any."""
        node = self.domains.get(domain)
        if node is None or not entries:
            return None
        shared: list[str | None] | None = None
        named = [domain] if domain in self.value_to_metric else None
        for index, (key, value) in enumerate(entries):
            found = node.child(key, value)
            if found is None:
                return None
            node, wildcard, exact = found
            if wildcard is not None and wildcard.share_threshold:
                shared = shared or [None] * len(entries)
                shared[index] = wildcard.value
            if named is not None:
                shown = node.metric_value(value, wildcard, exact)
                named.append(f"{key}_{shown}" if shown else key)
        limit = node.limit
        if limit is None:
            return None
        if shared is not None:
            limit = replace(limit, shared_values=tuple(shared))
        if named is not None and not limit.detailed_metric:
            stats_key = ".".join(named)
            if stats_key != limit.stats_key:
                limit = replace(limit, stats_key=stats_key)
        return limit


def load_config(paths: Sequence[Path], *, merge_domains: bool = False) -> RateLimitConfig:
    """Read each file, or every `*.yaml` / `*.yml` of each directory (sorted, not recursive)."""
    return parse_config(
        [(str(file), _read_yaml(file)) for file in _config_files(paths)],
        merge_domains=merge_domains,
    )


def parse_config(
    documents: Sequence[tuple[str, Any]], *, merge_domains: bool = False
) -> RateLimitConfig:
    """(source name, parsed YAML) pairs → the configuration; one domain per document, or, with
    `merge_domains`, every document of a domain merged into one tree (a descriptor in two of
    them is an error)."""
    roots: dict[str, list[_Reader]] = {}
    for source, document in documents:
        root = _Reader(source, document, "", _ROOT_FIELDS, "a domain file")
        name = root.text("domain", required=True)
        if name in roots and not merge_domains:
            raise ConfigError(
                source,
                "domain",
                f"duplicate domain {name!r}, already in {roots[name][0].source} (merging a "
                "domain's files is an option: --merge-domain-config, MERGE_DOMAIN_CONFIG)",
            )
        roots.setdefault(name, []).append(root)
    trees = {name: _domain_tree(name, files) for name, files in roots.items()}
    return RateLimitConfig(
        MappingProxyType(trees),
        frozenset(name for name, tree in trees.items() if _names_by_value(tree)),
    )


def _names_by_value(node: DescriptorNode) -> bool:
    """Whether a descriptor under `node` has value_to_metric."""
    return any(child.value_to_metric or _names_by_value(child) for child in node.children())


# --- files ---------------------------------------------------------------------------------


def _config_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                sorted(
                    child
                    for child in path.iterdir()
                    # Dotfiles are editor leftovers; `..data` of a mounted ConfigMap is a directory.
                    if child.suffix in (".yaml", ".yml")
                    and not child.name.startswith(".")
                    and child.is_file()
                )
            )
        else:
            files.append(path)
    return files


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that rejects a key repeated in one mapping (plain YAML keeps the last silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if (
            key_node.tag == "tag:yaml.org,2002:merge"
        ):  # `<<:` keys may be overridden: that is their use
            continue
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable: SafeLoader reports it below
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"duplicate key {key!r}",
                key_node.start_mark,
            )
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(file: Path) -> Any:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(str(file), ".", f"cannot read: {err}") from err
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "."
        raise ConfigError(str(file), where, f"invalid YAML: {err.problem}") from err
    except yaml.YAMLError as err:
        raise ConfigError(str(file), ".", f"invalid YAML: {err}") from err


# --- parsing -------------------------------------------------------------------------------


class _Reader:
    """One YAML mapping with its dotted path; keys outside `fields` are rejected on sight, so a
    misspelt key is reported as such rather than as the missing key it was meant to be."""

    def __init__(
        self, source: str, value: Any, path: str, fields: tuple[str, ...], what: str
    ) -> None:
        self.source = source
        self.path = path
        if not isinstance(value, Mapping):
            got = "an empty document" if value is None and not path else _describe(value)
            raise ConfigError(source, path or ".", f"expected {what} (a mapping), got {got}")
        self.value: Mapping[Any, Any] = value
        for key in value:
            if key not in fields:
                raise self.error(str(key), _unknown(key, what))

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | None, problem: str) -> ConfigError:
        return ConfigError(
            self.source, self.at(key) if key is not None else self.path or ".", problem
        )

    def has(self, key: str) -> bool:
        return self.value.get(key) is not None

    def get(self, key: str, kind: type[_T]) -> _T | None:
        """The value, None if absent or null; bool is not accepted as an integer."""
        value = self.value.get(key)
        if value is None:
            return None
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
        hint = " (quote it: YAML reads it as a number or boolean)" if kind is str else ""
        raise self.error(key, f"expected {_KIND_NAMES[kind]}, got {_describe(value)}{hint}")

    def require(self, key: str, kind: type[_T]) -> _T:
        value = self.get(key, kind)
        if value is None:
            raise self.error(key, "required")
        return value

    def text(self, key: str, *, required: bool = False) -> str:
        """A non-empty string; "" when optional and absent."""
        value = self.require(key, str) if required else self.get(key, str)
        if value == "" and required:
            raise self.error(key, "must not be empty")
        return value or ""

    def mapping(self, key: str, fields: tuple[str, ...]) -> _Reader | None:
        return (
            _Reader(self.source, self.value[key], self.at(key), fields, key)
            if self.has(key)
            else None
        )

    def items(self, key: str, fields: tuple[str, ...], what: str) -> list[_Reader]:
        values = self.get(key, list) or []
        return [
            _Reader(self.source, v, f"{self.at(key)}[{i}]", fields, what)
            for i, v in enumerate(values)
        ]


def _describe(value: Any) -> str:
    kind = "a mapping" if isinstance(value, Mapping) else type(value).__name__
    return f"{kind} {value!r}" if not isinstance(value, Mapping | list) else kind


def _unknown(key: Any, what: str) -> str:
    home = _HOME.get(key) if isinstance(key, str) else None
    if home is not None:
        return f"unknown field in {what} (it belongs in {home})"
    return "unknown field"


@dataclass
class _DomainScan:
    """Bookkeeping while one domain is parsed: limit names and where `replaces` refers to them."""

    names: dict[str, str] = field(default_factory=dict)  # limit name → path where it is defined
    # (name, the file, the path of the reference)
    replaces: list[tuple[str, str, str]] = field(default_factory=list)


def _domain_tree(domain: str, files: Sequence[_Reader]) -> DescriptorNode:
    scan = _DomainScan()
    tree = DescriptorNode(None, *_children(files, domain, scan))
    for name, source, path in scan.replaces:
        if name not in scan.names:
            raise ConfigError(source, path, f"no limit named {name!r} in domain {domain!r}")
    return tree


_Children = tuple[
    Mapping[tuple[str, str], DescriptorNode],
    Mapping[str, tuple[Wildcard, ...]],
    Mapping[str, DescriptorNode],
]


def _children(parents: Sequence[_Reader], stats_prefix: str, scan: _DomainScan) -> _Children:
    """The descriptors under `parents` (one mapping, or a domain's files merged)."""
    exact: dict[tuple[str, str], DescriptorNode] = {}
    wildcards: dict[str, list[Wildcard]] = {}
    any_value: dict[str, DescriptorNode] = {}
    siblings: dict[tuple[str, str | None], str] = {}
    for parent in parents:
        for d in parent.items("descriptors", _DESCRIPTOR_FIELDS, "a descriptor"):
            key = d.text("key", required=True)
            value = d.text("value") or None  # upstream treats an empty value as no value
            if (key, value) in siblings:
                same = f"key {key!r}" + (
                    f", value {value!r}" if value is not None else " without a value"
                )
                raise d.error(None, f"duplicate of {siblings[key, value]} ({same})")
            siblings[key, value] = f"{d.source}: {d.path}" if len(parents) > 1 else d.path
            share = d.get("share_threshold", bool) or False
            if share and (value is None or "*" not in value):
                raise d.error(
                    "share_threshold", "only a wildcard value (holding '*') can share its counter"
                )
            stats_key = f"{stats_prefix}.{key}" + (f"_{value}" if value is not None else "")
            node = _node(d, stats_key, scan)
            if value is None:
                any_value[key] = node
            elif "*" in value:
                wildcards.setdefault(key, []).append(Wildcard(key, value, node, share))
            else:
                exact[key, value] = node
    in_order = {key: tuple(found) for key, found in wildcards.items()}
    return MappingProxyType(exact), MappingProxyType(in_order), MappingProxyType(any_value)


def _node(d: _Reader, stats_key: str, scan: _DomainScan) -> DescriptorNode:
    shadow_mode = d.get("shadow_mode", bool) or False
    detailed_metric = d.get("detailed_metric", bool) or False
    section = d.mapping("rate_limit", _RATE_LIMIT_FIELDS)
    limit = None
    if section is not None:
        limit = _rate_limit(
            section, stats_key, scan, shadow_mode=shadow_mode, detailed_metric=detailed_metric
        )
        metadata = _metadata(d)
        quota_mode = d.get("quota_mode", bool) or False
        if metadata or quota_mode:
            limit = replace(limit, metadata=metadata, quota_mode=quota_mode)
    value_to_metric = d.get("value_to_metric", bool) or False
    return DescriptorNode(limit, *_children([d], stats_key, scan), value_to_metric)


def _metadata(d: _Reader) -> str:
    """A descriptor's `metadata` as JSON ("" when none): any mapping that a protobuf Struct can
    hold, as upstream requires (keys made strings, as upstream's loader does)."""
    value = d.get("metadata", dict)
    if not value:
        return ""

    def plain(item: Any) -> Any:
        if isinstance(item, Mapping):
            return {str(k): plain(v) for k, v in item.items()}
        if isinstance(item, list):
            return [plain(v) for v in item]
        if item is None or isinstance(item, str | int | float | bool):
            return item
        raise d.error("metadata", f"{_describe(item)} cannot be metadata (a protobuf Struct)")

    return json.dumps(plain(value), sort_keys=True, separators=(",", ":"))


def _rate_limit(
    r: _Reader, stats_key: str, scan: _DomainScan, *, shadow_mode: bool, detailed_metric: bool
) -> RateLimit:
    unlimited = r.get("unlimited", bool) or False
    if unlimited:
        if r.has("unit"):
            raise r.error("unit", "must not be set when unlimited is true")
        unit = Unit.SECOND  # never used: an unlimited limit is never counted
    else:
        unit = _unit(r)
    requests = r.get("requests_per_unit", int) if unlimited else r.require("requests_per_unit", int)
    if requests is not None and not 0 <= requests <= MAX_REQUESTS_PER_UNIT:
        raise r.error("requests_per_unit", f"{requests} is out of range 0..{MAX_REQUESTS_PER_UNIT}")
    name = r.text("name")
    if name:
        if name in scan.names:
            raise r.error("name", f"limit name {name!r} is already used at {scan.names[name]}")
        scan.names[name] = r.at("name")
    replaces = []
    for entry in r.items("replaces", _REPLACES_FIELDS, "a replaces entry"):
        replaced = entry.text("name", required=True)
        if replaced == name:
            raise entry.error("name", f"a limit cannot replace itself ({name!r})")
        scan.replaces.append((replaced, entry.source, entry.at("name")))
        replaces.append(replaced)
    return RateLimit(
        requests_per_unit=requests or 0,
        unit=unit,
        name=name,
        unlimited=unlimited,
        algorithm=_algorithm(r),
        replaces=tuple(replaces),
        shadow_mode=shadow_mode,
        detailed_metric=detailed_metric,
        stats_key=stats_key,
    )


def _unit(r: _Reader) -> Unit:
    text = r.require("unit", str)
    try:
        return Unit.parse(text)
    except KeyError:
        expected = ", ".join(u.name.lower() for u in Unit)
        raise r.error("unit", f"unknown unit {text!r}; expected one of {expected}") from None


def _algorithm(r: _Reader) -> Algorithm:
    text = r.get("algorithm", str)
    if text is None:
        return Algorithm.FIXED_WINDOW
    try:
        return Algorithm(text.strip().lower())
    except ValueError:
        expected = " or ".join(a.value for a in Algorithm)
        raise r.error("algorithm", f"unknown algorithm {text!r}; expected {expected}") from None
