"""The `arks.ai/v1` objects the gateway reads, as frozen dataclasses, and their parsers.

Parsers take the plain dict of a Kubernetes object (from a YAML file or the API server) and
return our types, or raise `ObjectError` naming the field. One parser serves both policy sources.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

GROUP = "arks.ai"
VERSION = "v1"
BACKEND_GROUP = "gateway.envoyproxy.io"

RATE_LIMIT_TYPES = ("rpm", "rpd", "tpm", "tpd", "concurrency")
QUOTA_TYPES = ("prompt", "response", "total", "cost")
QUOTA_PERIODS = ("none", "day", "week", "month")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class ObjectError(ValueError):
    """A field of one object is wrong. `path` is the dotted field path inside the object."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def token_digest(token: str) -> str:
    """The only form in which a token is stored or compared."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ObjectKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class SocketAddress:
    address: str
    port: int


@dataclass(frozen=True)
class Backend:
    """An Envoy Gateway `Backend`: engines outside Kubernetes, by ip and port."""

    key: ObjectKey
    endpoints: tuple[SocketAddress, ...]


@dataclass(frozen=True)
class BackendRef:
    """One entry of `ArksEndpoint.spec.routeConfigs` (a Gateway API backendRef)."""

    name: str
    namespace: str
    group: str = ""
    kind: str = "Service"
    port: int | None = None
    weight: int = 1

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.namespace, self.name)


# How an endpoint spreads requests over its engines:
#   static        the routeConfigs' weights, nothing else;
#   weighted      those weights times each engine's weight from its live load (the default);
#   least-load    the gateway picks the least-loaded engine for each request;
#   prefix-cache  the gateway keeps requests sharing a long prompt prefix on one engine.
STATIC, WEIGHTED, LEAST_LOAD, PREFIX_CACHE = "static", "weighted", "least-load", "prefix-cache"
WEIGHTINGS = (STATIC, WEIGHTED, LEAST_LOAD, PREFIX_CACHE)


@dataclass(frozen=True)
class ArksEndpoint:
    key: ObjectKey  # the name is the public model name
    route_configs: tuple[BackendRef, ...]
    default_weight: int = 5
    gateway_ref: Mapping[str, Any] | None = None
    match_configs: tuple[Mapping[str, Any], ...] = ()
    weighting: str = "weighted"  # one of WEIGHTINGS
    max_tokens: int | None = None  # the most tokens one answer may hold (context length)

    @property
    def model(self) -> str:
        return self.key.name


@dataclass(frozen=True)
class RateLimit:
    type: str
    value: int


@dataclass(frozen=True)
class Qos:
    endpoint: str
    rate_limits: tuple[RateLimit, ...] = ()
    quota: str | None = None


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str = "token"


@dataclass(frozen=True)
class ArksToken:
    key: ObjectKey  # the name is the user
    qos: tuple[Qos, ...]
    token_hash: str | None = None
    secret_ref: SecretRef | None = None
    plain_token_given: bool = False
    expires_at: datetime | None = None
    disabled: bool = False
    # The digest of the token its Secret holds, as the controller published it in the status
    # (`status.tokenHash`, for the `status.tokenHashSecret` it read): how the gateway, which
    # reads no Secrets, learns a tokenSecretRef token. None when none is published for the
    # Secret and key the spec names now.
    published_hash: str | None = None

    @property
    def user(self) -> str:
        return self.key.name

    def grants(self, model: str) -> Qos | None:
        for qos in self.qos:
            if qos.endpoint == model:
                return qos
        return None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True)
class QuotaItem:
    type: str
    value: float
    period: str = "none"


@dataclass(frozen=True)
class Price:
    """Price per million tokens, per model; and per second of audio (transcriptions and
    translations, which engines report as a duration)."""

    model: str
    input: float
    output: float
    second: float = 0.0


@dataclass(frozen=True)
class ArksQuota:
    key: ObjectKey
    quotas: tuple[QuotaItem, ...]
    prices: tuple[Price, ...] = ()


@dataclass(frozen=True)
class Secret:
    key: ObjectKey
    data: Mapping[str, str] = field(default_factory=dict)


# --- parsing -------------------------------------------------------------------------------


class _Fields:
    """Reads one mapping, remembering its path, and rejects keys nobody asked for."""

    def __init__(self, value: Any, path: str) -> None:
        if not isinstance(value, Mapping):
            raise ObjectError(path or ".", f"expected a mapping, got {type(value).__name__}")
        self.value = value
        self.path = path
        self.seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(
        self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False
    ) -> Any:
        self.seen.add(key)
        if key not in self.value or self.value[key] is None:
            if required:
                raise ObjectError(self.at(key), "required")
            return default
        value = self.value[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (int in kinds and bool not in kinds and isinstance(value, bool)) or not isinstance(
            value, kind
        ):
            names = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            raise ObjectError(
                self.at(key), f"expected {names}, got {type(value).__name__} {value!r}"
            )
        return value

    def items(self, key: str, required: bool = False) -> list[_Fields]:
        values = self.get(key, list, default=[], required=required)
        return [_Fields(v, f"{self.at(key)}[{i}]") for i, v in enumerate(values)]

    def done(self) -> None:
        unknown = sorted(set(self.value) - self.seen)
        if unknown:
            raise ObjectError(self.at(unknown[0]), "unknown field")


def _name(fields: _Fields, key: str) -> str:
    value: str = fields.get(key, str, required=True)
    if not _NAME.match(value):
        raise ObjectError(fields.at(key), f"{value!r} is not a valid Kubernetes name")
    return value


def object_key(obj: Mapping[str, Any], default_namespace: str = "default") -> ObjectKey:
    meta = _Fields(obj.get("metadata"), "metadata")
    name = _name(meta, "name")
    namespace = meta.get("namespace", str, default=default_namespace)
    return ObjectKey(namespace, name)


def _spec(obj: Mapping[str, Any]) -> _Fields:
    return _Fields(obj.get("spec", {}), "spec")


def parse_backend(obj: Mapping[str, Any]) -> Backend:
    key = object_key(obj)
    spec = _spec(obj)
    endpoints = []
    for ep in spec.items("endpoints", required=True):
        ip = _Fields(ep.get("ip", Mapping, required=True), ep.at("ip"))
        port = ip.get("port", int, required=True)
        if not 0 < port < 65536:
            raise ObjectError(ip.at("port"), f"{port} is not a port")
        endpoints.append(SocketAddress(ip.get("address", str, required=True), port))
        ip.done()
        ep.done()
    spec.done()
    return Backend(key, tuple(endpoints))


def parse_endpoint(obj: Mapping[str, Any]) -> ArksEndpoint:
    key = object_key(obj)
    spec = _spec(obj)
    refs = []
    for ref in spec.items("routeConfigs"):
        weight = ref.get("weight", int, default=1)
        if weight < 0:
            raise ObjectError(ref.at("weight"), "must be >= 0")
        port = ref.get("port", int)
        refs.append(
            BackendRef(
                name=_name(ref, "name"),
                namespace=ref.get("namespace", str, default=key.namespace),
                group=ref.get("group", str, default=""),
                kind=ref.get("kind", str, default="Service"),
                port=port,
                weight=weight,
            )
        )
        ref.done()
    weighting = spec.get("weighting", str, default=WEIGHTED)
    if weighting not in WEIGHTINGS:
        raise ObjectError(
            spec.at("weighting"), f"{weighting!r} is not one of {', '.join(WEIGHTINGS)}"
        )
    endpoint = ArksEndpoint(
        key=key,
        route_configs=tuple(refs),
        default_weight=spec.get("defaultWeight", int, default=5),
        gateway_ref=spec.get("gatewayRef", Mapping),
        match_configs=tuple(spec.get("matchConfigs", list, default=[])),
        weighting=weighting,
        max_tokens=spec.get("maxTokens", int),
    )
    if endpoint.max_tokens is not None and endpoint.max_tokens < 1:
        raise ObjectError(spec.at("maxTokens"), "must be >= 1")
    spec.done()
    return endpoint


def _timestamp(fields: _Fields, key: str) -> datetime | None:
    value = fields.get(key, (str, datetime, date))
    if value is None:
        return None
    if isinstance(value, date) and not isinstance(
        value, datetime
    ):  # YAML reads 2030-01-01 as a date
        value = datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as err:
            raise ObjectError(fields.at(key), f"not an RFC 3339 time: {value!r}") from err
    moment: datetime = value
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_token(obj: Mapping[str, Any]) -> ArksToken:
    key = object_key(obj)
    spec = _spec(obj)
    token_hash = spec.get("tokenHash", str)
    if token_hash is not None and not _DIGEST.match(token_hash):
        raise ObjectError(spec.at("tokenHash"), 'expected "sha256:" and 64 lowercase hex digits')
    plain = spec.get("token", str)
    secret_ref = None
    ref_value = spec.get("tokenSecretRef", Mapping)
    if ref_value is not None:
        ref = _Fields(ref_value, spec.at("tokenSecretRef"))
        secret_ref = SecretRef(_name(ref, "name"), ref.get("key", str, default="token"))
        ref.done()
    given = [token_hash is not None, secret_ref is not None, plain is not None]
    if sum(given) != 1:
        raise ObjectError(
            spec.path, "exactly one of tokenHash, tokenSecretRef or token is required"
        )
    if plain is not None:
        token_hash = token_digest(plain.strip())
    qos_list = []
    for qos in spec.items("qos"):
        endpoint = _Fields(qos.get("arksEndpoint", Mapping, required=True), qos.at("arksEndpoint"))
        limits = []
        for limit in qos.items("rateLimits"):
            kind = limit.get("type", str, required=True)
            if kind not in RATE_LIMIT_TYPES:
                raise ObjectError(
                    limit.at("type"), f"{kind!r} is not one of {', '.join(RATE_LIMIT_TYPES)}"
                )
            value = limit.get("value", int, required=True)
            if value < 0:
                raise ObjectError(limit.at("value"), "must be >= 0")
            limits.append(RateLimit(kind, value))
            limit.done()
        quota = None
        quota_value = qos.get("quota", Mapping)
        if quota_value is not None:
            quota_ref = _Fields(quota_value, qos.at("quota"))
            quota = _name(quota_ref, "name")
            quota_ref.done()
        qos_list.append(Qos(_name(endpoint, "name"), tuple(limits), quota))
        endpoint.done()
        qos.done()
    token = ArksToken(
        key=key,
        qos=tuple(qos_list),
        token_hash=token_hash,
        secret_ref=secret_ref,
        plain_token_given=plain is not None,
        expires_at=_timestamp(spec, "expiresAt"),
        disabled=spec.get("disabled", bool, default=False),
        published_hash=published_digest(obj, secret_ref),
    )
    spec.done()
    return token


def published_digest(obj: Mapping[str, Any], ref: SecretRef | None) -> str | None:
    """The digest the controller published in an ArksToken's status for the Secret key the spec
    names now (pure; a status for another Secret or key, or not a digest, is ignored)."""
    status = obj.get("status")
    if ref is None or not isinstance(status, Mapping):
        return None
    digest, source = status.get("tokenHash"), status.get("tokenHashSecret")
    if not isinstance(digest, str) or not _DIGEST.match(digest) or not isinstance(source, Mapping):
        return None
    if source.get("name") != ref.name or source.get("key", "token") != ref.key:
        return None
    return digest


def parse_quota(obj: Mapping[str, Any]) -> ArksQuota:
    key = object_key(obj)
    spec = _spec(obj)
    items = []
    for item in spec.items("quotas", required=True):
        kind = item.get("type", str, required=True)
        if kind not in QUOTA_TYPES:
            raise ObjectError(item.at("type"), f"{kind!r} is not one of {', '.join(QUOTA_TYPES)}")
        value = item.get("value", (int, float), required=True)
        if value < 0:
            raise ObjectError(item.at("value"), "must be >= 0")
        period = item.get("period", str, default="none")
        if period not in QUOTA_PERIODS:
            raise ObjectError(
                item.at("period"), f"{period!r} is not one of {', '.join(QUOTA_PERIODS)}"
            )
        items.append(QuotaItem(kind, float(value), period))
        item.done()
    prices = []
    for price in spec.items("prices"):
        prices.append(
            Price(
                price.get("model", str, required=True),
                float(price.get("input", (int, float), default=0)),
                float(price.get("output", (int, float), default=0)),
                float(price.get("perSecond", (int, float), default=0)),
            )
        )
        price.done()
    spec.done()
    return ArksQuota(key, tuple(items), tuple(prices))


def parse_secret(obj: Mapping[str, Any]) -> Secret:
    key = object_key(obj)
    data: dict[str, str] = {}
    for section in ("data", "stringData"):
        if not isinstance(obj.get(section) or {}, Mapping):
            raise ObjectError(section, "expected a mapping")
    for field_name, encoded in (obj.get("data") or {}).items():
        try:
            data[field_name] = base64.b64decode(str(encoded), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as err:
            raise ObjectError(f"data.{field_name}", "not valid base64 text") from err
    for field_name, text in (obj.get("stringData") or {}).items():
        if not isinstance(text, str):
            raise ObjectError(f"stringData.{field_name}", "expected a string")
        data[field_name] = text
    return Secret(key, data)
