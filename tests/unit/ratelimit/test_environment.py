"""envoyproxy/ratelimit's environment variables as our flags' defaults, and the refused ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratelimit.environment import (
    EnvError,
    GrpcTls,
    defaults,
    grpc_address,
    log_level,
    parse_bool,
    refusal,
    runtime_config,
)
from ratelimit.server import upstream_environment


def read(**environ: str):  # type: ignore[no-untyped-def]
    return defaults(
        environ,
        host="127.0.0.1",
        grpc_default="127.0.0.1:8081",
        metrics=("127.0.0.1", 9102),
        level_default="INFO",
        near_ratio=0.8,
    )


def test_unset_variables_leave_upstreams_ports_on_our_host() -> None:
    got = read()
    assert (got.http_host, got.http_port, got.debug_host, got.debug_port) == (
        "127.0.0.1",
        8080,
        "127.0.0.1",
        6070,
    )
    assert (got.grpc_address, got.metrics_address, got.metrics_port) == (
        "127.0.0.1:8081",
        "127.0.0.1",
        9102,
    )
    assert (got.config, got.log_level, got.near_ratio) == ((), "INFO", 0.8)
    assert not got.dynamic_metadata and not got.healthy_with_config


def test_upstreams_variables_set_the_defaults() -> None:
    got = read(
        HOST="0.0.0.0",
        PORT="18080",
        DEBUG_HOST="::1",
        DEBUG_PORT="16070",
        GRPC_PORT="18081",
        LOG_LEVEL="debug",
        NEAR_LIMIT_RATIO="0.5",
        RESPONSE_DYNAMIC_METADATA="true",
        HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED="1",
    )
    assert (got.http_host, got.http_port, got.debug_host, got.debug_port) == (
        "0.0.0.0",
        18080,
        "::1",
        16070,
    )
    assert (got.grpc_address, got.log_level, got.near_ratio) == ("127.0.0.1:18081", "DEBUG", 0.5)
    assert got.dynamic_metadata and got.healthy_with_config


def test_grpc_tls_is_read_only_with_grpc_server_use_tls() -> None:
    files = {
        "GRPC_SERVER_TLS_CERT": "/certs/tls.crt",
        "GRPC_SERVER_TLS_KEY": "/certs/tls.key",
        "GRPC_CLIENT_TLS_CACERT": "/certs/ca.crt",
        "GRPC_CLIENT_TLS_SAN": "envoy",
        "GRPC_SERVER_TLS_CA_CERT": "/certs/ca.crt",  # Envoy Gateway sets it; upstream reads none
    }
    assert read().grpc_tls == GrpcTls()
    assert read(**files).grpc_tls == GrpcTls()  # as upstream: the files without the switch
    assert read(GRPC_SERVER_USE_TLS="T", **files).grpc_tls == GrpcTls(
        True, Path("/certs/tls.crt"), Path("/certs/tls.key"), Path("/certs/ca.crt"), "envoy"
    )
    assert read(GRPC_SERVER_USE_TLS="true").grpc_tls == GrpcTls(use_tls=True)
    with pytest.raises(EnvError, match=r"^GRPC_SERVER_USE_TLS='yes' is not a boolean"):
        read(GRPC_SERVER_USE_TLS="yes")


def test_use_prometheus_moves_our_metrics_to_its_address() -> None:
    assert (
        read(USE_PROMETHEUS="true").metrics_address,
        read(USE_PROMETHEUS="true").metrics_port,
    ) == ("0.0.0.0", 9090)
    moved = read(USE_PROMETHEUS="true", PROMETHEUS_ADDR="127.0.0.2:9191")
    assert (moved.metrics_address, moved.metrics_port) == ("127.0.0.2", 9191)
    assert read(PROMETHEUS_ADDR="127.0.0.2:9191").metrics_port == 9102  # only with USE_PROMETHEUS


def test_grpc_address_from_host_port_or_a_unix_socket() -> None:
    assert grpc_address({"GRPC_HOST": "0.0.0.0"}, "127.0.0.1", 8081) == "0.0.0.0:8081"
    assert grpc_address({"GRPC_HOST": "::"}, "127.0.0.1", 8081) == "[::]:8081"
    uds = {"GRPC_UDS": "/run/rl.sock", "GRPC_PORT": "1"}
    assert grpc_address(uds, "127.0.0.1", 8081) == "unix:/run/rl.sock"


def test_the_runtime_directory_is_upstreams_file_providers() -> None:
    # RUNTIME_WATCH_ROOT (default true) without a subdirectory: upstream's empty runtime loader.
    assert runtime_config({}) == ()
    assert runtime_config({"RUNTIME_ROOT": "/rt"}) == ()
    assert runtime_config({"RUNTIME_SUBDIRECTORY": "ratelimit"}) == (
        Path("/srv/runtime_data/current/ratelimit/config"),
    )
    assert runtime_config(
        {"RUNTIME_ROOT": "/rt", "RUNTIME_SUBDIRECTORY": "rl", "RUNTIME_APPDIRECTORY": "limits"}
    ) == (Path("/rt/rl/limits"),)
    assert runtime_config({"RUNTIME_ROOT": "/rt", "RUNTIME_WATCH_ROOT": "false"}) == (
        Path("/rt/config"),
    )


def test_booleans_as_gos_parse_bool() -> None:
    assert [parse_bool("X", v) for v in ("1", "t", "TRUE", "True", "0", "f", "FALSE", "")] == [
        True,
        True,
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    assert parse_bool("X", "", default=True)
    with pytest.raises(EnvError, match="X='yes' is not a boolean"):
        parse_bool("X", "yes")


def test_log_levels_by_logrus_or_logging_names() -> None:
    assert [log_level("L", v) for v in ("trace", "Debug", "WARN", "warning", "error", "panic")] == [
        "DEBUG",
        "DEBUG",
        "WARNING",
        "WARNING",
        "ERROR",
        "CRITICAL",
    ]
    with pytest.raises(EnvError, match="LOG_LEVEL='loud' is not a log level"):
        read(LOG_LEVEL="loud")


@pytest.mark.parametrize("name", ["PORT", "DEBUG_PORT", "GRPC_PORT"])
def test_a_port_that_is_no_number_is_named(name: str) -> None:
    with pytest.raises(EnvError, match=f"^{name}='http' is not an integer$"):
        read(**{name: "http"})


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"USE_STATSD": "true"}, "USE_STATSD"),
        ({"USE_DOG_STATSD": "1"}, "USE_DOG_STATSD"),
        ({"EXTRA_TAGS": "a:b"}, "EXTRA_TAGS"),
        ({"TRACING_ENABLED": "true"}, "TRACING_ENABLED"),
        ({"LOG_FORMAT": "JSON"}, "LOG_FORMAT"),
    ],
)
def test_a_feature_we_do_not_implement_is_refused_by_its_name(
    environ: dict[str, str], named: str
) -> None:
    message = refusal(environ)
    assert message is not None and message.startswith(f"{named}=") and "\n" not in message
    with pytest.raises(EnvError, match=f"^{named}="):
        read(**environ)


def test_switches_left_off_or_harmless_are_accepted() -> None:
    harmless = {
        "USE_STATSD": "false",
        "USE_DOG_STATSD": "0",
        "GRPC_SERVER_USE_TLS": "false",
        "TRACING_ENABLED": "false",
        "TRACING_SERVICE_NAME": "rl",
        "LOG_FORMAT": "text",
        "STATSD_HOST": "statsd",
        "DISABLE_STATS": "true",
        "GRPC_MAX_CONNECTION_AGE": "1h",
        "PROMETHEUS_MAPPER_YAML": "/m.yaml",  # read only with USE_PROMETHEUS
        "RUNTIME_IGNOREDOTFILES": "true",
    }
    assert refusal(harmless) is None


def test_switches_connection_age_and_prometheus_names_as_upstream_defaults_them() -> None:
    unset = read()
    assert (unset.max_connection_age_s, unset.max_connection_age_grace_s) == (86400.0, 3600.0)
    assert not any(
        (unset.shadow_mode, unset.quota_mode, unset.response_headers, unset.merge_domains)
    )
    assert not unset.use_prometheus
    got = read(
        GRPC_MAX_CONNECTION_AGE="1m30s",
        GRPC_MAX_CONNECTION_AGE_GRACE="250ms",
        SHADOW_MODE="true",
        QUOTA_MODE="1",
        LIMIT_RESPONSE_HEADERS_ENABLED="T",
        MERGE_DOMAIN_CONFIG="true",
        USE_PROMETHEUS="true",
    )
    assert (got.max_connection_age_s, got.max_connection_age_grace_s) == (90.0, 0.25)
    assert all((got.shadow_mode, got.quota_mode, got.response_headers, got.merge_domains))
    assert got.use_prometheus
    assert (got.prometheus_mapper, got.response_time_ms) == (None, False)
    eg = read(  # Envoy Gateway's, with its Prometheus telemetry on
        USE_PROMETHEUS="true",
        PROMETHEUS_ADDR=":19001",
        PROMETHEUS_MAPPER_YAML="/etc/statsd-exporter/conf.yaml",
        PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS="true",
    )
    assert (eg.metrics_address, eg.metrics_port) == ("0.0.0.0", 19001)
    assert eg.prometheus_mapper == Path("/etc/statsd-exporter/conf.yaml") and eg.response_time_ms
    off = read(PROMETHEUS_MAPPER_YAML="/m.yaml", PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS="true")
    assert (off.prometheus_mapper, off.response_time_ms) == (
        None,
        False,
    )  # read with USE_PROMETHEUS
    with pytest.raises(EnvError, match=r"^GRPC_MAX_CONNECTION_AGE="):
        read(GRPC_MAX_CONNECTION_AGE="a day")
    with pytest.raises(EnvError, match=r"^SHADOW_MODE="):
        read(SHADOW_MODE="yes")


def test_the_upstream_binary_listens_on_every_address_unless_told() -> None:
    """`ratelimit` (the image's /bin/ratelimit) fills in upstream's 0.0.0.0 for HOST, GRPC_HOST
    and DEBUG_HOST, empty ones too; a value set stays."""
    environ = {"HOST": "", "DEBUG_HOST": "10.0.0.7"}
    upstream_environment(environ)
    assert environ == {"HOST": "0.0.0.0", "GRPC_HOST": "0.0.0.0", "DEBUG_HOST": "10.0.0.7"}
    got = read(**environ)
    assert (got.http_host, got.debug_host, got.grpc_address) == (
        "0.0.0.0",
        "10.0.0.7",
        "0.0.0.0:8081",
    )
