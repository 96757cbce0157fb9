"""What envoyproxy/ratelimit serves beside gRPC, from the real `python -m ratelimit`: its HTTP port
(`/healthcheck`, `/json`), its debug port (`/rlconfig`, `/stats`), its environment variables and
its response dynamic metadata (src/server/server_impl.go, health.go, settings/settings.go,
service/ratelimit.go at the commit of tests/unit/arks/limits/fixtures/upstream)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launcher.procs import Supervisor, free_port, wait_http
from tests.integration.test_ratelimit_service import (
    NOT_SERVING,
    OK,
    SERVING,
    Service,
    descriptor,
    health_of,
)
from tests.support.exposition import sample
from tests.support.redis_server import PrivateRedis
from tests.support.waiting import wait_for

UPSTREAM_RUNTIME = (
    Path(__file__).parents[1]
    / "unit/arks/limits/fixtures/upstream/test/integration/runtime/current"
)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(sup, tmp_path)
        yield svc
        svc.channel.close()


def http(svc: Service, path: str) -> str:
    return f"http://127.0.0.1:{svc.http_port}{path}"


def ask_json(svc: Service, *entries: tuple[str, str]) -> httpx.Response:
    body = {
        "domain": svc.domain,
        "descriptors": [{"entries": [{"key": k, "value": v} for k, v in entries]}],
    }
    return httpx.post(http(svc, "/json"), content=json.dumps(body))


def test_healthcheck_says_ok_while_healthy(service: Service) -> None:
    answer = httpx.get(http(service, "/healthcheck"))
    assert (answer.status_code, answer.text) == (200, "OK")
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"


def test_json_answers_as_upstream_and_shares_the_grpc_counters(service: Service) -> None:
    """200 with the protojson RateLimitResponse, 429 once over the limit; the calls count on
    the counters gRPC's do (one decision path)."""
    first = ask_json(service, ("user", "alice"))
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    body = first.json()
    assert body["overallCode"] == "OK"
    [status] = body["statuses"]
    assert status["currentLimit"] == {"name": "per_user", "requestsPerUnit": 3, "unit": "MINUTE"}
    assert (status["code"], status["limitRemaining"]) == ("OK", 2)
    assert status["durationUntilReset"].endswith("s")  # a Duration in protojson: "42s"
    assert "dynamicMetadata" not in body and "responseHeadersToAdd" not in body  # off by default
    assert service.ask(descriptor(("user", "alice"))).statuses[0].limit_remaining == 1
    assert ask_json(service, ("user", "alice")).status_code == 200
    over = ask_json(service, ("user", "alice"))
    assert over.status_code == 429
    parsed = json_format.Parse(over.text, rls_pb2.RateLimitResponse())
    assert parsed.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    assert "limitRemaining" not in over.json()["statuses"][0]  # 0: left out, as protojson does
    unlimited = ask_json(service, ("vip", "v")).json()
    assert unlimited == {
        "overallCode": "OK",
        "statuses": [{"code": "OK", "limitRemaining": 4294967295}],
    }
    # Timed as calls, as gRPC's are: 4 on /json, 1 on gRPC.
    assert (
        sample(service.metrics(), "arks_ratelimit_call_seconds_count", domain=service.domain) == 5
    )


@pytest.mark.parametrize(
    "body",
    [
        "",  # no body
        "}",  # not JSON
        '{"domain": "d", "descriptors": [{"entries": [{"key": "k"}]}], "nope": 1}',  # unknown field
        '{"domain": "", "descriptors": [{"entries": [{"key": "k", "value": "v"}]}]}',  # no domain
        '{"domain": "d"}',  # no descriptors
    ],
)
def test_json_refuses_what_upstream_refuses_with_400(service: Service, body: str) -> None:
    answer = httpx.post(http(service, "/json"), content=body)
    assert (answer.status_code, answer.text) == (400, "Bad Request\n")
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"


def test_other_paths_are_not_found(service: Service) -> None:
    answer = httpx.get(http(service, "/metrics"))
    assert (answer.status_code, answer.text) == (404, "404 page not found\n")


def test_rlconfig_prints_every_limit_as_upstreams_dump(service: Service) -> None:
    lines = httpx.get(f"http://127.0.0.1:{service.debug_port}/rlconfig").text.splitlines()
    d = service.domain
    assert sorted(lines) == sorted(
        [
            f"{d}.user: unit=MINUTE requests_per_unit=3, shadow_mode: false, quota_mode: false",
            f"{d}.user.model: unit=HOUR requests_per_unit=100, shadow_mode: false, quota_mode: false",
            f"{d}.tokens: unit=MINUTE requests_per_unit=1000, shadow_mode: false, quota_mode: false",
            f"{d}.shadowed: unit=MINUTE requests_per_unit=1, shadow_mode: true, quota_mode: false",
            f"{d}.vip: unit=UNKNOWN requests_per_unit=0, shadow_mode: false, quota_mode: false",
        ]
    )


def test_debug_port_serves_stats_and_lists_its_endpoints(service: Service) -> None:
    service.ask(descriptor(("user", "bob")))
    debug = f"http://127.0.0.1:{service.debug_port}"
    stats = httpx.get(f"{debug}/stats").text
    assert (
        f'arks_ratelimit_hits_total{{domain="{service.domain}",key="{service.domain}.user"}} 1.0'
        in stats
    )
    assert httpx.get(f"{debug}/").text == (
        "/rlconfig: print out the currently loaded configuration for debugging\n"
        "/stats: print out stats\n"
    )


def test_healthcheck_fails_while_redis_is_away_and_recovers(tmp_path: Path) -> None:
    redis = PrivateRedis()
    redis.start()
    try:
        with Supervisor(log_dir=tmp_path / "logs") as sup:
            svc = Service(sup, tmp_path, "--redis", redis.url, "--redis-timeout-s", "0.3")
            try:
                assert httpx.get(http(svc, "/healthcheck")).status_code == 200
                redis.kill()
                away = wait_for(
                    lambda: httpx.get(http(svc, "/healthcheck")),
                    lambda a: a.status_code == 500,
                    timeout=10,
                )
                assert away.text == ""  # upstream writes the status alone
                assert health_of(svc) == {NOT_SERVING}  # the same state as gRPC's health
                redis.start()
                back = wait_for(
                    lambda: httpx.get(http(svc, "/healthcheck")),
                    lambda a: a.status_code == 200,
                    timeout=10,
                )
                assert back.text == "OK" and health_of(svc) == {SERVING}
            finally:
                svc.channel.close()
    finally:
        redis.kill()


def test_sigterm_makes_the_service_unhealthy_before_it_stops(tmp_path: Path) -> None:
    """As upstream's HealthChecker: from SIGTERM on, /healthcheck answers 500, while calls in
    flight finish (one waits here on a paused Redis, which keeps the service stopping)."""
    redis = PrivateRedis()
    redis.start()
    try:
        with Supervisor(log_dir=tmp_path / "logs") as sup:
            svc = Service(sup, tmp_path, "--redis", redis.url, "--redis-timeout-s", "2")
            try:
                assert httpx.get(http(svc, "/healthcheck")).status_code == 200
                redis.pause()
                ended: list[object] = []

                def ask() -> None:  # on Redis paused past the 2 s grace: cancelled, or answered
                    try:
                        ended.append(svc.ask(descriptor(("user", "x"))).overall_code)
                    except grpc.RpcError as err:
                        ended.append(err.code())

                in_flight = threading.Thread(target=ask)
                in_flight.start()
                time.sleep(0.3)
                svc.child.popen.send_signal(signal.SIGTERM)
                codes = set()
                while svc.child.alive():
                    try:
                        codes.add(httpx.get(http(svc, "/healthcheck"), timeout=1).status_code)
                    except httpx.TransportError:
                        break  # the port closed: the service is going
                    time.sleep(0.05)
                redis.resume()
                in_flight.join(timeout=10)
                assert svc.child.popen.wait(timeout=10) == 0
            finally:
                svc.channel.close()
        assert 500 in codes
        assert len(ended) == 1  # the call in flight ended, one way or the other
        assert "health: NOT_SERVING (sigterm)" in (svc.child.log_path or Path()).read_text()
    finally:
        redis.kill()


METADATA = """
domain: {domain}
descriptors:
  - key: user
    rate_limit: {{unit: minute, requests_per_unit: 1}}
    metadata: {{tier: {{name: gold, rank: 1}}, team: a}}
  - key: model
    rate_limit: {{unit: minute, requests_per_unit: 5}}
    metadata: {{tier: {{name: silver, region: eu}}, model: m}}
"""


def test_dynamic_metadata_when_asked_as_upstreams_response_dynamic_metadata(
    tmp_path: Path,
) -> None:
    """The request echoed and the merged metadata of the limits that passed (the first
    descriptor's values win; mappings merge); none at all without the option."""
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        plain = Service(sup, tmp_path, config_text=METADATA)
        on = Service(sup, tmp_path, config_text=METADATA, env={"RESPONSE_DYNAMIC_METADATA": "true"})
        try:
            assert not plain.ask(descriptor(("user", "u"))).HasField("dynamic_metadata")
            both = (descriptor(("user", "u")), descriptor(("model", "m"), hits=2))
            first = json_format.MessageToDict(on.ask(*both, hits_addend=1).dynamic_metadata)
            second = json_format.MessageToDict(on.ask(*both).dynamic_metadata)
        finally:
            plain.channel.close()
            on.channel.close()
    assert first == {
        "domain": on.domain,
        "descriptors": [{"entries": ["user=u"]}, {"entries": ["model=m"], "hitsAddend": 2.0}],
        "hitsAddend": 1.0,
        "metadata": {
            "tier": {"name": "gold", "rank": 1.0, "region": "eu"},
            "team": "a",
            "model": "m",
        },
    }
    # user=u is now over its limit: only model's metadata, and no request-wide hitsAddend (0)
    assert second == {
        "domain": on.domain,
        "descriptors": [{"entries": ["user=u"]}, {"entries": ["model=m"], "hitsAddend": 2.0}],
        "metadata": {"tier": {"name": "silver", "region": "eu"}, "model": "m"},
    }


def test_upstreams_variables_place_the_ports_and_the_runtime_config(tmp_path: Path) -> None:
    """PORT, DEBUG_PORT, GRPC_HOST/GRPC_PORT and upstream's runtime layout (its integration
    test's: RUNTIME_ROOT=runtime/current, RUNTIME_SUBDIRECTORY=ratelimit, config/*.yaml)."""
    ports = {name: free_port() for name in ("PORT", "DEBUG_PORT", "GRPC_PORT")}
    env = {
        **{name: str(port) for name, port in ports.items()},
        "GRPC_HOST": "127.0.0.1",
        "RUNTIME_ROOT": str(UPSTREAM_RUNTIME),
        "RUNTIME_SUBDIRECTORY": "ratelimit",
        "LOG_LEVEL": "warn",
    }
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        child = sup.python("ratelimit", "ratelimit", "--metrics-port", str(free_port()), env=env)
        wait_http(child, f"http://127.0.0.1:{ports['PORT']}/healthcheck")
        dump = httpx.get(f"http://127.0.0.1:{ports['DEBUG_PORT']}/rlconfig").text.splitlines()
        body = '{"domain": "basic", "descriptors": [{"entries": [{"key": "one_per_minute"}]}]}'
        codes = [
            httpx.post(f"http://127.0.0.1:{ports['PORT']}/json", content=body).status_code
            for _ in range(2)
        ]
        with grpc.insecure_channel(f"127.0.0.1:{ports['GRPC_PORT']}") as channel:
            request = rls_pb2.RateLimitRequest(
                domain="another", descriptors=[descriptor(("key4", "x"))]
            )
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            answer = stub.ShouldRateLimit(request, timeout=5)
    assert (
        "basic.one_per_minute: unit=MINUTE requests_per_unit=1, shadow_mode: false, quota_mode: false"
        in dump
    )
    assert (
        "another.key4: unit=DAY requests_per_unit=20, shadow_mode: false, quota_mode: false" in dump
    )
    assert not any(line.startswith("reload.") for line in dump)  # outside config/: not read
    assert codes == [200, 429]
    assert answer.overall_code == OK and answer.statuses[0].current_limit.requests_per_unit == 20


def test_healthy_only_with_a_domain_when_asked_as_upstreams_variable_says(
    tmp_path: Path,
) -> None:
    """HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED: unhealthy (HTTP and gRPC) while the configuration
    has no domain, healthy once a file with one is loaded."""
    config = tmp_path / "config"
    config.mkdir()
    port, grpc_port = free_port(), free_port()
    env = {"HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED": "true", "PORT": str(port)}
    argv = ["--config", str(config), "--grpc-address", f"127.0.0.1:{grpc_port}"]
    argv += ["--metrics-port", str(free_port()), "--debug-port", str(free_port())]
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        child = sup.python("ratelimit", "ratelimit", *argv, env=env)
        wait_http(child, f"http://127.0.0.1:{port}/healthcheck", expect=500)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            ask = health_pb2.HealthCheckRequest(service="ratelimit")
            assert stub.Check(ask, timeout=5).status == NOT_SERVING
            (config / "d.yaml").write_text(
                "domain: d\ndescriptors:\n  - key: k\n"
                "    rate_limit: {unit: second, requests_per_unit: 1}\n"
            )
            wait_http(child, f"http://127.0.0.1:{port}/healthcheck")
            assert stub.Check(ask, timeout=5).status == SERVING


def test_grpc_on_a_unix_socket_as_upstreams_grpc_uds(tmp_path: Path) -> None:
    socket = tmp_path / "ratelimit.sock"
    port = free_port()
    env = {"GRPC_UDS": str(socket), "PORT": str(port), "DEBUG_PORT": str(free_port())}
    config = tmp_path / "d.yaml"
    config.write_text(
        "domain: d\ndescriptors:\n  - key: k\n"
        "    rate_limit: {unit: minute, requests_per_unit: 1}\n"
    )
    argv = ["--config", str(config), "--metrics-port", str(free_port())]
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        child = sup.python("ratelimit", "ratelimit", *argv, env=env)
        wait_http(child, f"http://127.0.0.1:{port}/healthcheck")
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            request = rls_pb2.RateLimitRequest(domain="d", descriptors=[descriptor(("k", "v"))])
            codes = [stub.ShouldRateLimit(request, timeout=5).overall_code for _ in range(2)]
    assert codes == [OK, rls_pb2.RateLimitResponse.OVER_LIMIT]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("USE_STATSD", "true"),
        ("TRACING_ENABLED", "1"),
        ("EXTRA_TAGS", "team:a"),
        ("LOG_FORMAT", "json"),
    ],
)
def test_an_upstream_switch_we_do_not_implement_is_refused_by_name(
    tmp_path: Path, name: str, value: str
) -> None:
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        child = sup.python("refused", "ratelimit", env={name: value})
        assert child.popen.wait(timeout=30) == 1
    lines = (tmp_path / "logs" / "refused.log").read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ratelimit: {name}={value!r} asks for ")
