"""ArksToken status as a pure function: phase, conditions, counts and when to look again."""

from __future__ import annotations

import base64
import datetime
from typing import Any

import pytest

from arks.api import token_digest
from controller.reconcilers.token import (
    FORBIDDEN_RECHECK_S,
    SECRET_READER_ROLE,
    desired_status,
    token_status,
)

NOW = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.UTC)
DIGEST = "sha256:" + "ab" * 32
QOS = [
    {"arksEndpoint": {"name": "qwen-7b"}, "quota": {"name": "team-a"}},
    {"arksEndpoint": {"name": "llama-8b"}, "quota": {"name": "team-a"}},
]


def token(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "arks.ai/v1",
        "kind": "ArksToken",
        "metadata": {"name": "alice", "namespace": "prod", "generation": 3},
        "spec": {"qos": QOS, **spec},
    }


def secret(**data: str) -> dict[str, Any]:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "alice-token", "namespace": "prod"},
        "data": encoded,
    }


def status_of(obj: dict[str, Any], sec: dict[str, Any] | None = None, **kw: Any) -> Any:
    return token_status(
        obj,
        secret=sec,
        endpoints=kw.get("endpoints", {"qwen-7b", "llama-8b"}),
        quotas=kw.get("quotas", {"team-a"}),
        now=kw.get("now", NOW),
        secret_forbidden=kw.get("secret_forbidden", False),
        shared=kw.get("shared", lambda digest: False),
    )


def check(status: Any, type_: str) -> tuple[str, str]:
    found = next(c for c in status.checks if c.type == type_)
    return found.status, found.reason


def test_a_digest_token_without_expiry_is_active_with_counts() -> None:
    s = status_of(token(tokenHash=DIGEST))
    assert s.phase == "Active" and (s.endpoints, s.quotas) == (2, 1)
    assert check(s, "Ready") == ("True", "Active")
    assert check(s, "ReferencesResolved") == ("True", "Resolved")
    assert check(s, "PlainTextToken") == ("False", "NotPlainText")
    assert s.recheck_after_s is None and s.warnings == ()


def test_an_expiring_token_asks_to_be_rechecked_at_its_expiry_then_is_expired() -> None:
    obj = token(tokenHash=DIGEST, expiresAt="2026-11-27T13:30:00Z")
    s = status_of(obj)
    assert s.phase == "Active" and s.recheck_after_s == 5400.0
    ready = next(c for c in s.checks if c.type == "Ready")
    assert "2026-11-27T13:30:00Z" in ready.message

    later = status_of(obj, now=NOW + datetime.timedelta(hours=2))
    assert later.phase == "Expired" and check(later, "Ready") == ("False", "Expired")
    assert later.recheck_after_s is None


def test_disabled_wins_over_expiry_and_is_not_ready() -> None:
    s = status_of(token(tokenHash=DIGEST, disabled=True, expiresAt="2020-01-01T00:00:00Z"))
    assert s.phase == "Disabled" and check(s, "Ready") == ("False", "Disabled")


def test_plain_token_works_but_is_warned_about_and_never_echoed() -> None:
    s = status_of(token(token="sk-very-secret-value"))
    assert s.phase == "Active"
    assert check(s, "PlainTextToken") == ("True", "PlainTextToken")
    assert s.warnings and "tokenHash" in s.warnings[0]
    assert "sk-very-secret-value" not in repr(s)


@pytest.mark.parametrize(
    ("sec", "reason"),
    [
        (None, "SecretNotFound"),
        (secret(other="x"), "SecretKeyNotFound"),
        (secret(token="  \n"), "SecretKeyEmpty"),
    ],
)
def test_a_secret_that_does_not_provide_the_token_makes_it_invalid(sec: Any, reason: str) -> None:
    ref = {"name": "alice-token", "key": "token"}
    s = status_of(token(tokenSecretRef=ref), sec)
    assert s.phase == "Invalid" and check(s, "Ready") == ("False", reason)


def test_a_secret_held_token_is_active_and_its_value_never_appears() -> None:
    s = status_of(
        token(tokenSecretRef={"name": "alice-token"}), secret(token="sk-held-in-secret\n")
    )
    assert s.phase == "Active"
    assert "sk-held-in-secret" not in repr(s)


def test_the_digest_of_a_secret_held_token_is_published_with_the_key_it_came_from() -> None:
    ref = {"name": "alice-token"}
    obj = token(tokenSecretRef=ref)
    s = status_of(obj, secret(token="sk-held-in-secret\n"))  # --from-file keeps the newline
    assert s.digest == token_digest("sk-held-in-secret")  # as the gateway would compute it
    desired = desired_status({}, s, 3, NOW, ref)
    assert desired["tokenHash"] == token_digest("sk-held-in-secret")
    assert desired["tokenHashSecret"] == {"name": "alice-token", "key": "token"}
    # a token given by digest, or a Secret that does not provide it: nothing published (None
    # removes what a merge patch had published before)
    for computed, ref_given in ((status_of(token(tokenHash=DIGEST)), None), (status_of(obj), ref)):
        assert computed.digest is None
        gone = desired_status({"tokenHash": DIGEST}, computed, 3, NOW, ref_given)
        assert gone["tokenHash"] is None and gone["tokenHashSecret"] is None


def test_a_shared_digest_is_duplicate_token_and_a_secret_held_one_is_still_published() -> None:
    """Another ArksToken holding the same digest: the gateway accepts neither, so neither is
    Active; a Secret-held token's digest stays published, or the copy would be the gateway's
    only holder of it (and would be given this token's requests)."""
    held = token_digest("sk-held-in-secret")
    for obj, sec, digest in (
        (token(tokenHash=DIGEST), None, DIGEST),
        (token(token="sk-plain"), None, token_digest("sk-plain")),
        (token(tokenSecretRef={"name": "alice-token"}), secret(token="sk-held-in-secret"), held),
    ):
        s = status_of(obj, sec, shared=lambda d, digest=digest: d == digest)
        assert (s.phase, check(s, "Ready")) == ("Invalid", ("False", "DuplicateToken"))
        assert s.digest == (held if sec else None)
        assert status_of(obj, sec, shared=lambda d, digest=digest: d != digest).phase == "Active"


def test_a_namespace_that_did_not_opt_in_says_so_and_is_asked_again() -> None:
    s = status_of(token(tokenSecretRef={"name": "alice-token"}), None, secret_forbidden=True)
    assert s.phase == "Invalid" and check(s, "Ready") == ("False", "SecretForbidden")
    ready = next(c for c in s.checks if c.type == "Ready")
    assert SECRET_READER_ROLE in ready.message and "prod" in ready.message
    assert s.digest is None and s.recheck_after_s == FORBIDDEN_RECHECK_S
    # tokens given by digest never need the Secret
    assert status_of(token(tokenHash=DIGEST), None, secret_forbidden=True).phase == "Active"


def test_missing_endpoints_and_quotas_are_named() -> None:
    s = status_of(token(tokenHash=DIGEST), endpoints={"qwen-7b"}, quotas=set())
    found = next(c for c in s.checks if c.type == "ReferencesResolved")
    assert (found.status, found.reason) == ("False", "EndpointNotFound")
    assert "llama-8b" in found.message and "team-a" in found.message
    assert s.phase == "Active"  # the granted endpoints that exist still work


def test_an_invalid_spec_is_reported_not_raised() -> None:
    s = status_of(token(tokenHash="md5:abc"))
    assert s.phase == "Invalid" and check(s, "Ready") == ("False", "InvalidSpec")
    assert "tokenHash" in s.checks[0].message


def test_conditions_keep_their_transition_time_when_nothing_changes() -> None:
    s = status_of(token(tokenHash=DIGEST))
    first = desired_status({}, s, 3, NOW)
    again = desired_status(first, s, 3, NOW + datetime.timedelta(minutes=5))
    assert again == first
    assert first["observedGeneration"] == 3 and first["phase"] == "Active"
    assert {c["type"] for c in first["conditions"]} == {
        "Ready",
        "ReferencesResolved",
        "PlainTextToken",
    }
