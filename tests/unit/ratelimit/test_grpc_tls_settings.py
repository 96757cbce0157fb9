"""TLS on the gRPC port from flags or upstream's variables: what turns it on, and the one-line
error for a setting without a certificate and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from arks.adapters.grpc_tls import ServerTls
from ratelimit.server import Settings

VARIABLES = (
    "GRPC_SERVER_USE_TLS",
    "GRPC_SERVER_TLS_CERT",
    "GRPC_SERVER_TLS_KEY",
    "GRPC_CLIENT_TLS_CACERT",
    "GRPC_CLIENT_TLS_SAN",
)


@pytest.fixture(autouse=True)
def no_tls_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_plaintext_unless_a_certificate_and_key_are_given(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.from_args([]).grpc_tls is None
    monkeypatch.setenv("GRPC_SERVER_TLS_CERT", "/certs/tls.crt")  # without the switch, as upstream
    monkeypatch.setenv("GRPC_SERVER_TLS_KEY", "/certs/tls.key")
    assert Settings.from_args([]).grpc_tls is None
    flags = ["--grpc-tls-cert", "/c.crt", "--grpc-tls-key", "/c.key", "--grpc-client-ca", "/ca"]
    assert Settings.from_args(flags).grpc_tls == ServerTls(
        Path("/c.crt"), Path("/c.key"), Path("/ca")
    )


def test_envoy_gateways_variables_and_a_flag_over_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (
        ("GRPC_SERVER_USE_TLS", "true"),
        ("GRPC_SERVER_TLS_CERT", "/certs/tls.crt"),
        ("GRPC_SERVER_TLS_KEY", "/certs/tls.key"),
        ("GRPC_CLIENT_TLS_CACERT", "/certs/ca.crt"),
        ("GRPC_CLIENT_TLS_SAN", "envoy"),
    ):
        monkeypatch.setenv(name, value)
    certs = Path("/certs")
    assert Settings.from_args([]).grpc_tls == ServerTls(
        certs / "tls.crt", certs / "tls.key", certs / "ca.crt", "envoy"
    )
    assert Settings.from_args(["--grpc-client-san", "other"]).grpc_tls == ServerTls(
        certs / "tls.crt", certs / "tls.key", certs / "ca.crt", "other"
    )


@pytest.mark.parametrize(
    ("environ", "argv", "message"),
    [
        (
            {"GRPC_SERVER_USE_TLS": "true"},
            [],
            "GRPC_SERVER_USE_TLS=true needs GRPC_SERVER_TLS_CERT (or --grpc-tls-cert) and "
            "GRPC_SERVER_TLS_KEY (or --grpc-tls-key)",
        ),
        (
            {"GRPC_SERVER_USE_TLS": "true", "GRPC_SERVER_TLS_CERT": "/certs/tls.crt"},
            [],
            "GRPC_SERVER_USE_TLS=true needs GRPC_SERVER_TLS_KEY (or --grpc-tls-key)",
        ),
        ({}, ["--grpc-tls-cert", "/c.crt"], "TLS on the gRPC port needs --grpc-tls-key too"),
        ({}, ["--grpc-tls-key", "/c.key"], "TLS on the gRPC port needs --grpc-tls-cert too"),
        ({}, ["--grpc-client-ca", "/ca"], "--grpc-client-ca needs --grpc-tls-cert and"),
        ({}, ["--grpc-client-san", "envoy"], "--grpc-client-san needs --grpc-tls-cert and"),
    ],
)
def test_a_tls_setting_without_certificate_and_key_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], argv: list[str], message: str
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        Settings.from_args(argv)
    text = str(stopped.value.code)
    assert text.startswith(f"ratelimit: {message}") and "\n" not in text
