"""Policy objects and snapshots: parsing each kind, the credential rules, errors that say where."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from arks import api
from arks.api import (
    ArksEndpoint,
    BackendRef,
    ObjectError,
    ObjectKey,
    Price,
    QuotaItem,
    RateLimit,
    SecretRef,
    SocketAddress,
    token_digest,
)
from arks.policy import (
    FilePolicySource,
    Policy,
    PolicyError,
    build_policy,
    load_policy_file,
    read_policy_file,
)
from tests.support.paths import DEMO_POLICY

FIXTURES = Path(__file__).parent / "fixtures" / "policy"
DEMO_TOKEN = "sk-arks-demo-0123456789abcdef"
HASH = "sha256:" + "0" * 64
NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


# --- object builders: the plain dicts a YAML file or the API server would give ----------------


def _object(
    api_version: str, kind: str, name: str, namespace: str | None, **top: Any
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata, **top}


def token(name: str, namespace: str | None = None, **spec: Any) -> dict[str, Any]:
    return _object("arks.ai/v1", "ArksToken", name, namespace, spec=spec)


def endpoint(name: str, namespace: str | None = None, **spec: Any) -> dict[str, Any]:
    return _object("arks.ai/v1", "ArksEndpoint", name, namespace, spec=spec)


def quota(name: str, namespace: str | None = None, **spec: Any) -> dict[str, Any]:
    return _object("arks.ai/v1", "ArksQuota", name, namespace, spec=spec)


def backend(name: str, *ports: int, namespace: str | None = None) -> dict[str, Any]:
    endpoints = [{"ip": {"address": "127.0.0.1", "port": port}} for port in ports]
    return _object(
        "gateway.envoyproxy.io/v1alpha1", "Backend", name, namespace, spec={"endpoints": endpoints}
    )


def secret(name: str, namespace: str | None = None, **top: Any) -> dict[str, Any]:
    return _object("v1", "Secret", name, namespace, **top)


def grant(model: str, quota_name: str | None = None, **limits: int) -> dict[str, Any]:
    qos: dict[str, Any] = {"arksEndpoint": {"name": model}}
    if limits:
        qos["rateLimits"] = [{"type": kind, "value": value} for kind, value in limits.items()]
    if quota_name:
        qos["quota"] = {"name": quota_name}
    return qos


def build(*objects: Mapping[str, Any]) -> Policy:
    return build_policy((f"test: object {i}", obj) for i, obj in enumerate(objects, start=1))


# --- parsing each kind ------------------------------------------------------------------------


def test_backend_lists_its_socket_addresses() -> None:
    parsed = api.parse_backend(backend("engine", 8000, 8001, namespace="team-a"))

    assert parsed.key == ObjectKey("team-a", "engine")
    assert parsed.endpoints == (SocketAddress("127.0.0.1", 8000), SocketAddress("127.0.0.1", 8001))


def test_endpoint_name_is_the_public_model_name_and_refs_default_to_its_namespace() -> None:
    parsed = api.parse_endpoint(endpoint("qwen-7b", "team-a", routeConfigs=[{"name": "engine"}]))

    assert parsed.model == "qwen-7b"
    assert parsed.route_configs == (
        BackendRef(
            name="engine", namespace="team-a", group="", kind="Service", port=None, weight=1
        ),
    )
    assert parsed.default_weight == 5
    assert parsed.gateway_ref is None
    assert parsed.match_configs == ()


def test_endpoint_keeps_explicit_backend_ref_fields() -> None:
    ref = {
        "name": "engine",
        "namespace": "engines",
        "group": "gateway.envoyproxy.io",
        "kind": "Backend",
        "port": 8000,
        "weight": 3,
    }

    parsed = api.parse_endpoint(
        endpoint("qwen", routeConfigs=[ref], defaultWeight=2, weighting="least-load")
    )

    assert parsed.route_configs == (
        BackendRef("engine", "engines", "gateway.envoyproxy.io", "Backend", 8000, 3),
    )
    assert parsed.default_weight == 2


def test_object_namespace_defaults_to_default() -> None:
    assert api.parse_endpoint(endpoint("qwen")).key == ObjectKey("default", "qwen")


def test_token_defaults_to_no_grants_no_expiry_and_enabled() -> None:
    parsed = api.parse_token(token("alice", tokenHash=HASH))

    assert parsed.user == "alice"
    assert parsed.token_hash == HASH
    assert parsed.qos == ()
    assert parsed.expires_at is None
    assert not parsed.disabled
    assert not parsed.plain_token_given
    assert parsed.grants("qwen") is None


def test_token_grants_carry_rate_limits_and_quota() -> None:
    parsed = api.parse_token(
        token(
            "alice",
            tokenHash=HASH,
            qos=[grant("qwen", "monthly", rpm=10, tpm=1000), grant("llama")],
        )
    )

    qwen = parsed.grants("qwen")
    assert qwen is not None
    assert qwen.rate_limits == (RateLimit("rpm", 10), RateLimit("tpm", 1000))
    assert qwen.quota == "monthly"
    llama = parsed.grants("llama")
    assert llama is not None and llama.rate_limits == () and llama.quota is None


def test_every_rate_limit_type_is_accepted() -> None:
    limits = [{"type": kind, "value": 1} for kind in api.RATE_LIMIT_TYPES]

    parsed = api.parse_token(
        token(
            "alice", tokenHash=HASH, qos=[{"arksEndpoint": {"name": "qwen"}, "rateLimits": limits}]
        )
    )

    assert [limit.type for limit in parsed.qos[0].rate_limits] == list(api.RATE_LIMIT_TYPES)


def test_token_secret_ref_key_defaults_to_token() -> None:
    parsed = api.parse_token(token("alice", tokenSecretRef={"name": "alice-token"}))

    assert parsed.secret_ref == SecretRef("alice-token", "token")
    assert parsed.token_hash is None


def test_plain_token_is_stored_only_as_its_digest() -> None:
    parsed = api.parse_token(token("alice", token="sk-alice"))

    assert parsed.token_hash == token_digest("sk-alice")
    assert parsed.plain_token_given
    assert "sk-alice" not in repr(parsed)


def test_token_digest_is_sha256_hex() -> None:
    digest = token_digest("sk-alice")

    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    assert digest == token_digest("sk-alice") != token_digest("sk-bob")


@pytest.mark.parametrize(
    "expires_at",
    [
        "2030-01-01T00:00:00Z",
        "2030-01-01T01:00:00+01:00",
        "2030-01-01T00:00:00",
        datetime(2030, 1, 1),
    ],
    ids=["zulu", "offset", "naive-string-is-utc", "naive-datetime-is-utc"],
)
def test_expires_at_is_an_aware_utc_instant(expires_at: Any) -> None:
    parsed = api.parse_token(token("alice", tokenHash=HASH, expiresAt=expires_at))

    assert parsed.expires_at == datetime(2030, 1, 1, tzinfo=UTC)


def test_token_expires_at_its_expiry_instant() -> None:
    parsed = api.parse_token(token("alice", tokenHash=HASH, expiresAt="2030-01-01T00:00:00Z"))
    expiry = datetime(2030, 1, 1, tzinfo=UTC)

    assert not parsed.expired(expiry - timedelta(microseconds=1))
    assert parsed.expired(expiry)
    assert not api.parse_token(token("bob", tokenHash=HASH)).expired(NOW)


def test_quota_period_defaults_to_none_and_values_are_floats() -> None:
    parsed = api.parse_quota(
        quota(
            "monthly",
            quotas=[
                {"type": "total", "value": 100},
                {"type": "cost", "value": 2.5, "period": "month"},
            ],
            prices=[{"model": "qwen", "input": 1, "output": 2.5}, {"model": "llama"}],
        )
    )

    assert parsed.quotas == (QuotaItem("total", 100.0, "none"), QuotaItem("cost", 2.5, "month"))
    assert parsed.prices == (Price("qwen", 1.0, 2.5), Price("llama", 0.0, 0.0))


def test_secret_string_data_is_plain_and_data_is_base64() -> None:
    parsed = api.parse_secret(
        secret("s", data={"a": "c2stYWxpY2U=", "b": "b2xk"}, stringData={"b": "new"})
    )

    assert dict(parsed.data) == {"a": "sk-alice", "b": "new"}  # stringData wins, as in Kubernetes


def test_object_error_carries_the_dotted_path() -> None:
    with pytest.raises(ObjectError) as err:
        api.parse_token(
            token(
                "alice",
                tokenHash=HASH,
                qos=[grant("qwen"), {"arksEndpoint": {"name": "llama", "model": "x"}}],
            )
        )

    assert err.value.path == "spec.qos[1].arksEndpoint.model"
    assert err.value.problem == "unknown field"


def test_metadata_must_be_a_mapping() -> None:
    with pytest.raises(ObjectError, match=r"^metadata: expected a mapping, got NoneType"):
        api.parse_endpoint({"apiVersion": "arks.ai/v1", "kind": "ArksEndpoint", "spec": {}})


# --- credentials and snapshots ----------------------------------------------------------------


def test_token_hash_is_looked_up_by_digest() -> None:
    policy = build(token("alice", tokenHash=token_digest("sk-alice")))

    found = policy.token(token_digest("sk-alice"))
    assert found is not None and found.user == "alice"
    assert policy.token(token_digest("sk-bob")) is None
    assert policy.warnings == ()


def test_secret_ref_with_string_data_gives_the_digest_of_the_secret_value() -> None:
    policy = build(
        secret("alice-token", stringData={"token": "sk-alice"}),
        token("alice", tokenSecretRef={"name": "alice-token"}),
    )

    assert policy.token(token_digest("sk-alice")) is not None
    assert policy.warnings == ()


def test_secret_ref_with_base64_data_and_a_custom_key() -> None:
    policy = build(
        token(
            "alice", tokenSecretRef={"name": "creds", "key": "api-key"}
        ),  # order in the file does not matter
        secret("creds", data={"api-key": "c2stYWxpY2U=", "token": "b3RoZXI="}),
    )

    found = policy.token(token_digest("sk-alice"))
    assert found is not None and found.user == "alice"
    assert policy.token(token_digest("other")) is None


def test_plain_token_works_but_warns() -> None:
    policy = build(token("alice", token="sk-alice"))

    assert policy.token(token_digest("sk-alice")) is not None
    assert policy.warnings == (
        "ArksToken default/alice: spec.token holds a plain token; use tokenHash or tokenSecretRef",
    )


def test_secret_ref_to_a_missing_secret_warns_and_the_token_is_unusable() -> None:
    policy = build(token("alice", tokenSecretRef={"name": "nowhere"}))

    assert policy.tokens_by_digest == {}
    assert policy.warnings == (
        "ArksToken default/alice: secret 'nowhere' key 'token' not found (nor its digest in "
        "status.tokenHash); the token is not usable",
    )


def published(obj: dict[str, Any], digest: str, name: str, key: str = "token") -> dict[str, Any]:
    return {**obj, "status": {"tokenHash": digest, "tokenHashSecret": {"name": name, "key": key}}}


def test_in_a_cluster_a_secret_ref_token_is_known_by_the_digest_the_controller_published() -> None:
    """The gateway reads no Secrets: the controller publishes the digest in the status, for the
    Secret key it read; it counts only while that is the key the spec names now."""
    alice = token("alice", tokenSecretRef={"name": "creds"})
    policy = build(published(alice, token_digest("sk-alice"), "creds"))
    found = policy.token(token_digest("sk-alice"))
    assert found is not None and found.user == "alice"
    for stale in (
        published(alice, token_digest("sk-alice"), "old-creds"),  # the spec names another Secret
        published(alice, token_digest("sk-alice"), "creds", key="other"),  # or another key
        published(alice, "sha256:not-a-digest", "creds"),
    ):
        assert build(stale).tokens_by_digest == {}
    # a token given by digest ignores any status digest
    by_hash = token("bob", tokenHash=token_digest("sk-bob"))
    assert set(build(published(by_hash, token_digest("x"), "creds")).tokens_by_digest) == {
        token_digest("sk-bob")
    }
    # a Secret among the objects (a policy file) wins over a published digest
    both = build(
        published(alice, token_digest("old"), "creds"), secret("creds", stringData={"token": "new"})
    )
    assert set(both.tokens_by_digest) == {token_digest("new")}


def test_secret_ref_to_a_missing_key_warns() -> None:
    policy = build(
        secret("creds", stringData={"other": "x"}), token("alice", tokenSecretRef={"name": "creds"})
    )

    assert policy.tokens_by_digest == {}
    assert "secret 'creds' key 'token' not found" in policy.warnings[0]


def test_secret_is_looked_up_in_the_token_namespace_only() -> None:
    policy = build(
        secret("creds", "team-b", stringData={"token": "sk-alice"}),
        token("alice", "team-a", tokenSecretRef={"name": "creds"}),
    )

    assert policy.tokens_by_digest == {}
    assert "ArksToken team-a/alice: secret 'creds'" in policy.warnings[0]


def test_grants_of_unknown_endpoints_and_quotas_warn() -> None:
    policy = build(
        endpoint("qwen"),
        quota("monthly", quotas=[{"type": "total", "value": 1}]),
        token("alice", tokenHash=HASH, qos=[grant("qwen", "monthly"), grant("llama", "weekly")]),
    )

    assert policy.warnings == (
        "ArksToken default/alice: grants unknown ArksEndpoint 'llama'",
        "ArksToken default/alice: references unknown ArksQuota 'weekly'",
    )


def test_endpoint_referencing_an_unknown_backend_warns_but_services_do_not() -> None:
    policy = build(
        endpoint("qwen", routeConfigs=[{"kind": "Backend", "name": "gone"}, {"name": "a-service"}])
    )

    assert policy.warnings == (
        "ArksEndpoint default/qwen: references unknown Backend default/gone",
    )


def test_models_for_lists_granted_models_that_exist_in_grant_order() -> None:
    alice = token("alice", tokenHash=HASH, qos=[grant("llama"), grant("gone"), grant("qwen")])
    policy = build(
        endpoint("qwen"), endpoint("llama"), endpoint("mistral"), endpoint("qwen", "team-b"), alice
    )

    found = policy.token(HASH)
    assert found is not None
    assert policy.models_for(found) == ["llama", "qwen"]
    assert policy.endpoint("team-b", "qwen") is not None
    assert policy.endpoint("team-b", "llama") is None


def test_the_same_token_hash_on_two_tokens_is_an_error() -> None:
    with pytest.raises(
        PolicyError,
        match=r"^test: object 2 \(ArksToken default/bob\): same token as ArksToken default/alice$",
    ):
        build(token("alice", tokenHash=HASH), token("bob", tokenHash=HASH))


def test_in_a_cluster_duplicate_tokens_are_both_dropped_and_the_rest_still_applies() -> None:
    objects = [
        token("alice", tokenHash=HASH),
        token("bob", tokenHash=HASH),
        token("carol", tokenHash=HASH),
        token("dave", token="sk-dave"),
    ]
    policy = build_policy(
        [(f"object {i}", o) for i, o in enumerate(objects, 1)], drop_duplicate_tokens=True
    )
    assert policy.token(HASH) is None  # whose request it would be is ambiguous
    assert policy.token(token_digest("sk-dave")) is not None
    clashes = [w for w in policy.warnings if "same token" in w]
    assert len(clashes) == 2 and all("neither is accepted" in w for w in clashes)


def test_same_token_in_two_namespaces_is_an_error() -> None:
    with pytest.raises(PolicyError, match="same token as ArksToken team-a/alice"):
        build(
            token("alice", "team-a", token="sk-x"),
            token("alice", "team-b", tokenHash=token_digest("sk-x")),
        )


def test_a_non_mapping_object_is_an_error() -> None:
    with pytest.raises(PolicyError, match=r"^where: expected a Kubernetes object"):
        build_policy([("where", ["not", "an", "object"])])  # type: ignore[list-item]


def test_empty_object_list_is_an_empty_policy() -> None:
    assert build() == Policy()


# --- config errors from files: each names the file, the document, the object and the field ----


CONFIG_ERRORS = [
    (
        "unknown_field_rate_limit",
        "document 1 (ArksToken default/alice)",
        "spec.qos[0].rateLimits[1].burst: unknown field",
    ),
    (
        "unknown_field_backend_spec",
        "document 2 (Backend default/engine)",
        "spec.hostname: unknown field",
    ),
    (
        "unknown_field_route_config",
        "document 1 (ArksEndpoint team-a/qwen)",
        "spec.routeConfigs[0].weigth: unknown field",
    ),
    (
        "bad_rate_limit_type",
        "document 3 (ArksToken default/alice)",
        "spec.qos[0].rateLimits[1].type: 'rph' is not one of rpm, rpd, tpm, tpd, concurrency",
    ),
    (
        "bad_quota_type",
        "document 1 (ArksQuota default/monthly)",
        "spec.quotas[0].type: 'tokens' is not one of prompt, response, total, cost",
    ),
    (
        "bad_quota_period",
        "document 1 (ArksQuota default/monthly)",
        "spec.quotas[1].period: 'year' is not one of none, day, week, month",
    ),
    (
        "wrong_type_port",
        "document 1 (Backend default/engine)",
        "spec.endpoints[0].ip.port: expected int, got str '8000'",
    ),
    (
        "wrong_type_disabled",
        "document 1 (ArksToken default/alice)",
        "spec.disabled: expected bool, got str 'yes'",
    ),
    (
        "wrong_type_rate_limit_value",
        "document 1 (ArksToken default/alice)",
        "spec.qos[0].rateLimits[0].value: expected int, got bool True",
    ),
    (
        "wrong_type_quota_value",
        "document 1 (ArksQuota default/monthly)",
        "spec.quotas[0].value: expected int or float, got bool True",
    ),
    ("wrong_type_qos", "document 1 (ArksToken default/alice)", "spec.qos: expected list, got dict"),
    (
        "port_out_of_range",
        "document 1 (Backend default/engine)",
        "spec.endpoints[0].ip.port: 70000 is not a port",
    ),
    (
        "bad_token_hash",
        "document 1 (ArksToken default/alice)",
        'spec.tokenHash: expected "sha256:" and 64 lowercase hex digits',
    ),
    (
        "bad_name",
        "document 1 (ArksEndpoint default/Qwen_7B)",
        "metadata.name: 'Qwen_7B' is not a valid Kubernetes name",
    ),
    (
        "token_without_credential",
        "document 1 (ArksToken default/alice)",
        "spec: exactly one of tokenHash, tokenSecretRef or token is required",
    ),
    (
        "token_hash_and_secret_ref",
        "document 1 (ArksToken default/alice)",
        "spec: exactly one of tokenHash, tokenSecretRef or token is required",
    ),
    (
        "token_hash_and_plain_token",
        "document 1 (ArksToken default/alice)",
        "spec: exactly one of tokenHash, tokenSecretRef or token is required",
    ),
    (
        "bad_expires_at",
        "document 1 (ArksToken default/alice)",
        "spec.expiresAt: not an RFC 3339 time: 'next year'",
    ),
    (
        "backend_without_endpoints",
        "document 1 (Backend default/engine)",
        "spec.endpoints: required",
    ),
    (
        "qos_without_endpoint",
        "document 1 (ArksToken default/alice)",
        "spec.qos[0].arksEndpoint: required",
    ),
    (
        "negative_weight",
        "document 1 (ArksEndpoint default/qwen)",
        "spec.routeConfigs[0].weight: must be >= 0",
    ),
    (
        "negative_quota_value",
        "document 1 (ArksQuota default/monthly)",
        "spec.quotas[0].value: must be >= 0",
    ),
    (
        "secret_bad_base64",
        "document 1 (Secret default/alice-token)",
        "data.token: not valid base64 text",
    ),
    ("secret_data_not_mapping", "document 1 (Secret default/alice-token)", "data: "),
    (
        "unsupported_kind",
        "document 1 (ArksWidget default/widget)",
        "kind: unsupported kind arks.ai/v1/ArksWidget",
    ),
    (
        "missing_api_version",
        "document 1 (ArksEndpoint default/qwen)",
        "apiVersion: apiVersion and kind are required",
    ),
    (
        "list_item_error",
        "document 1 item 1 (ArksQuota default/monthly)",
        "spec.quotas[0].type: 'tokens' is not one of",
    ),
    ("not_an_object", "document 2", "expected a Kubernetes object (a mapping)"),
    ("list_items_not_a_list", "document 1", "items"),
]


@pytest.mark.parametrize(
    ("fixture", "where", "problem"), CONFIG_ERRORS, ids=[case[0] for case in CONFIG_ERRORS]
)
def test_config_error_names_file_document_object_and_field(
    fixture: str, where: str, problem: str
) -> None:
    path = FIXTURES / f"{fixture}.yaml"

    with pytest.raises(PolicyError) as err:
        load_policy_file(path)

    message = str(err.value)
    assert message.startswith(f"{path}: {where}"), message
    assert problem in message, message


def test_duplicate_object_names_both_documents() -> None:
    path = FIXTURES / "duplicate_object.yaml"

    with pytest.raises(PolicyError) as err:
        load_policy_file(path)

    assert (
        str(err.value)
        == f"{path}: document 3 (ArksEndpoint default/qwen): duplicate of {path}: document 1"
    )


def test_two_tokens_with_the_same_secret_is_an_error() -> None:
    path = FIXTURES / "same_token_twice.yaml"

    with pytest.raises(PolicyError) as err:
        load_policy_file(path)

    assert (
        str(err.value)
        == f"{path}: document 3 (ArksToken default/bob): same token as ArksToken default/alice"
    )


def test_invalid_yaml_names_the_file() -> None:
    path = FIXTURES / "invalid_yaml.yaml"

    with pytest.raises(PolicyError, match=r"not valid YAML") as err:
        load_policy_file(path)

    assert str(err.value).startswith(f"{path}: ")


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    with pytest.raises(PolicyError, match=r"cannot read") as err:
        load_policy_file(path)

    assert str(err.value).startswith(f"{path}: ")


def test_ignored_kinds_are_skipped_and_list_items_are_read() -> None:
    path = FIXTURES / "ignored_kinds_and_list.yaml"

    policy = load_policy_file(path)

    assert list(policy.backends) == [ObjectKey("default", "engine")]
    assert list(policy.endpoints) == [ObjectKey("default", "qwen")]
    alice = policy.token(token_digest("sk-alice"))
    assert alice is not None and policy.models_for(alice) == ["qwen"]
    assert policy.warnings == ()


def test_read_policy_file_names_documents_and_list_items() -> None:
    path = FIXTURES / "ignored_kinds_and_list.yaml"

    names = [where for where, _ in read_policy_file(path)]

    # Empty documents are skipped but still counted, so numbers match what an editor shows.
    assert names == [
        f"{path}: document 1",
        f"{path}: document 2",
        f"{path}: document 3 item 0",
        f"{path}: document 3 item 1",
        f"{path}: document 5",
        f"{path}: document 6",
    ]


@pytest.mark.parametrize(
    "text", ["", "# nothing yet\n", "---\n---\n", "\n\n# just comments\n---\n"]
)
def test_a_file_with_no_object_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)

    with pytest.raises(PolicyError, match="no objects"):
        load_policy_file(path)


# --- the demo policy --------------------------------------------------------------------------


def test_demo_policy_loads_without_warnings() -> None:
    policy = load_policy_file(DEMO_POLICY)

    assert policy.warnings == ()
    assert set(policy.backends) == {ObjectKey("default", "sim-a"), ObjectKey("default", "sim-b")}
    assert set(policy.quotas) == {ObjectKey("default", "demo")}


def test_demo_token_is_granted_both_models() -> None:
    policy = load_policy_file(DEMO_POLICY)

    demo = policy.token(token_digest(DEMO_TOKEN))

    assert demo is not None
    assert demo.user == "demo"
    assert policy.models_for(demo) == ["qwen-7b", "llama-8b"]
    qwen = demo.grants("qwen-7b")
    assert qwen is not None and qwen.quota == "demo"
    assert qwen.rate_limits == (RateLimit("rpm", 600), RateLimit("tpm", 1_000_000))


def test_demo_endpoints_route_to_their_backends() -> None:
    policy = load_policy_file(DEMO_POLICY)

    qwen = policy.endpoint("default", "qwen-7b")
    assert isinstance(qwen, ArksEndpoint)
    assert [(ref.kind, ref.key) for ref in qwen.route_configs] == [
        ("Backend", ObjectKey("default", "sim-a"))
    ]


# --- FilePolicySource: reload on change, keep the last good policy on error -------------------


def _write(path: Path, text: str, bump: int) -> None:
    """Write and move the mtime forward by `bump` seconds, so no test has to sleep."""
    path.write_text(text)
    stamp = 1_700_000_000_000_000_000 + bump * 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


ONE_MODEL = """
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {name: qwen}
spec: {}
"""
TWO_MODELS = (
    ONE_MODEL
    + """---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {name: llama}
spec: {}
"""
)
BROKEN = (
    ONE_MODEL
    + """---
apiVersion: arks.ai/v1
kind: ArksEndpoint
metadata: {name: llama}
spec: {color: blue}
"""
)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    _write(path, ONE_MODEL, bump=0)
    return path


def test_file_source_serves_the_file_policy(policy_file: Path) -> None:
    source = FilePolicySource(policy_file)

    assert list(source.current().endpoints) == [ObjectKey("default", "qwen")]
    assert (source.reloads, source.errors) == (0, 0)


def test_file_source_does_nothing_while_the_file_is_unchanged(policy_file: Path) -> None:
    source = FilePolicySource(policy_file)
    before = source.current()

    assert not source.reload_if_changed()
    assert source.current() is before


def test_file_source_reloads_a_changed_file(policy_file: Path) -> None:
    source = FilePolicySource(policy_file)
    first = source.current()

    _write(policy_file, TWO_MODELS, bump=1)

    assert source.reload_if_changed()
    assert set(source.current().endpoints) == {
        ObjectKey("default", "qwen"),
        ObjectKey("default", "llama"),
    }
    assert source.current().version != first.version
    assert (source.reloads, source.errors) == (1, 0)
    assert not source.reload_if_changed()


def test_file_source_notices_a_touch_with_the_same_size(policy_file: Path) -> None:
    source = FilePolicySource(policy_file)

    _write(policy_file, ONE_MODEL, bump=1)

    assert source.reload_if_changed()
    assert source.reloads == 1


def test_bad_file_keeps_the_last_good_policy_and_counts_an_error(policy_file: Path) -> None:
    source = FilePolicySource(policy_file)
    good = source.current()

    _write(policy_file, BROKEN, bump=1)

    assert not source.reload_if_changed()
    assert source.current() is good
    assert (source.reloads, source.errors) == (0, 1)
    assert not source.reload_if_changed()  # the same bad file is not retried over and over
    assert source.errors == 1

    _write(policy_file, TWO_MODELS, bump=2)

    assert source.reload_if_changed()
    assert len(source.current().endpoints) == 2
    assert (source.reloads, source.errors) == (1, 1)


TOKEN_AND_MODEL = (
    ONE_MODEL
    + """---
apiVersion: arks.ai/v1
kind: ArksToken
metadata: {name: alice}
spec:
  tokenHash: "sha256:%s"
  qos: [{arksEndpoint: {name: qwen}}]
"""
    % ("ab" * 32)
)


@pytest.mark.parametrize(
    "cut",
    [
        "",
        "# emptied by an editor\n",
        ONE_MODEL,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n",
    ],
    ids=["empty", "comment-only", "every-token-gone", "every-endpoint-and-token-gone"],
)
def test_a_reload_that_would_remove_everything_keeps_the_last_good_policy(
    tmp_path: Path, cut: str
) -> None:
    path = tmp_path / "policy.yaml"
    _write(path, TOKEN_AND_MODEL, bump=0)
    source = FilePolicySource(path)
    good = source.current()

    _write(path, cut, bump=1)

    assert not source.reload_if_changed()
    assert source.current() is good
    assert source.errors == 1


def test_a_file_still_being_written_is_read_once_it_settles(policy_file: Path) -> None:
    now = [0.0]
    source = FilePolicySource(policy_file, clock=lambda: now[0])
    _write(policy_file, TWO_MODELS, bump=10)
    written_at = policy_file.stat().st_mtime_ns / 1e9

    now[0] = written_at + 0.1  # a writer may still be at it
    assert not source.reload_if_changed()
    assert len(source.current().endpoints) == 1
    now[0] = written_at + 0.6
    assert source.reload_if_changed()
    assert len(source.current().endpoints) == 2


def test_deleted_file_keeps_the_last_good_policy(policy_file: Path) -> None:
    source = FilePolicySource(policy_file)
    good = source.current()

    policy_file.unlink()

    assert not source.reload_if_changed()
    assert source.current() is good
    assert source.errors == 1


def test_file_source_refuses_to_start_on_a_bad_file(policy_file: Path) -> None:
    _write(policy_file, BROKEN, bump=1)

    with pytest.raises(
        PolicyError, match=r"document 2 \(ArksEndpoint default/llama\): spec.color: unknown field"
    ):
        FilePolicySource(policy_file)


def test_file_source_keeps_the_last_good_policy_when_a_secret_is_malformed(
    policy_file: Path,
) -> None:
    source = FilePolicySource(policy_file)
    good = source.current()

    _write(policy_file, (FIXTURES / "secret_data_not_mapping.yaml").read_text(), bump=1)

    assert not source.reload_if_changed()
    assert source.current() is good
    assert source.errors == 1
