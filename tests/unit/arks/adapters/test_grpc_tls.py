"""The client SAN check: Go's x509 VerifyHostname, which upstream's verifyClient asks of the
client certificate."""

from __future__ import annotations

from pathlib import Path

import pytest

from arks.adapters.grpc_tls import ServerTls, interceptors, san_matches


@pytest.mark.parametrize(
    ("san", "dns", "ips", "matches"),
    [
        ("envoy", ["envoy"], [], True),
        ("Envoy.Example.", ["envoy.example"], [], True),  # case and a trailing dot ignored
        ("envoy", ["other", "envoy"], [], True),  # any of the SANs
        ("envoy", ["envoy-gateway"], [], False),
        ("a.envoy.example", ["*.envoy.example"], [], True),  # a wildcard is one first label
        ("a.b.envoy.example", ["*.envoy.example"], [], False),
        ("envoy.example", ["*.envoy.example"], [], False),
        ("envoy", [], ["127.0.0.1"], False),  # a name is not looked for in the IP SANs
        ("127.0.0.1", ["127.0.0.1"], [], False),  # nor an address in the DNS SANs
        ("127.0.0.1", [], ["127.0.0.1"], True),
        ("[::1]", [], ["0:0:0:0:0:0:0:1"], True),  # bracketed, in any notation
        ("10.0.0.1", [], ["::ffff:10.0.0.1"], True),  # Go's IP.Equal
        ("10.0.0.2", [], ["10.0.0.1", "not an address"], False),
    ],
)
def test_a_san_matches_as_gos_verify_hostname(
    san: str, dns: list[str], ips: list[str], matches: bool
) -> None:
    assert san_matches(san, dns, ips) is matches


def test_the_san_is_checked_only_where_client_certificates_are_asked_for() -> None:
    cert, key, ca = (Path("/certs", name) for name in ("tls.crt", "tls.key", "ca.crt"))
    assert interceptors(None) == []
    assert interceptors(ServerTls(cert, key, ca)) == []
    assert interceptors(ServerTls(cert, key, None, "envoy")) == []  # as upstream
    (check,) = interceptors(ServerTls(cert, key, ca, "envoy"))
    assert check.san == "envoy"
