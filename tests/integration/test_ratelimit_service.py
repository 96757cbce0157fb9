"""The rate-limit service as Envoy uses it: over gRPC directly, and behind real Envoy's filter."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launcher.procs import Supervisor, free_port, wait_http, wait_port
from launcher.stack import envoy_binary
from tests.support.exposition import assert_process_metrics, sample
from tests.support.waiting import wait_for

CONFIG = """
domain: {domain}
descriptors:
  - key: user
    rate_limit: {{unit: minute, requests_per_unit: 3, name: per_user}}
    descriptors:
      - key: model
        rate_limit: {{unit: hour, requests_per_unit: 100, name: per_model}}
  - key: tokens
    rate_limit: {{unit: minute, requests_per_unit: 1000, name: tpm, algorithm: gcra}}
  - key: shadowed
    shadow_mode: true
    rate_limit: {{unit: minute, requests_per_unit: 1}}
  - key: vip
    rate_limit: {{unlimited: true}}
"""

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT


def descriptor(*entries: tuple[str, str], hits: int | None = None) -> common.RateLimitDescriptor:
    d = common.RateLimitDescriptor(
        entries=[common.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if hits is not None:
        d.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
    return d


class Service:
    def __init__(
        self,
        sup: Supervisor,
        tmp: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        config_text: str = CONFIG,
    ) -> None:
        self.domain = (
            f"test-{uuid.uuid4().hex[:8]}"  # fresh counters per service, also in a shared Redis
        )
        config = tmp / f"{self.domain}.yaml"
        config.write_text(config_text.format(domain=self.domain))
        self.port, self.metrics_port = free_port(), free_port()
        self.http_port, self.debug_port = free_port(), free_port()  # upstream's PORT, DEBUG_PORT
        self.child = sup.python(
            f"ratelimit-{self.domain}",
            "ratelimit",
            "--config",
            str(config),
            "--grpc-address",
            f"127.0.0.1:{self.port}",
            "--metrics-port",
            str(self.metrics_port),
            "--port",
            str(self.http_port),
            "--debug-port",
            str(self.debug_port),
            *extra,
            env=env,
        )
        wait_http(self.child, f"http://127.0.0.1:{self.metrics_port}/metrics")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = rls_pb2_grpc.RateLimitServiceStub(self.channel)

    def ask(
        self, *descriptors: common.RateLimitDescriptor, hits_addend: int = 0
    ) -> rls_pb2.RateLimitResponse:
        request = rls_pb2.RateLimitRequest(
            domain=self.domain, descriptors=descriptors, hits_addend=hits_addend
        )
        return self.stub.ShouldRateLimit(request, timeout=5)

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics").text


@pytest.fixture(params=["memory", "redis"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    extra = ("--redis", "redis://127.0.0.1:6379/0") if request.param == "redis" else ()
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(sup, tmp_path, *extra)
        yield svc
        svc.channel.close()


def test_the_n_plus_first_request_is_over_limit_with_statuses(service: Service) -> None:
    codes = [service.ask(descriptor(("user", "alice"))).overall_code for _ in range(4)]
    assert codes == [OK, OK, OK, OVER]
    last = service.ask(descriptor(("user", "alice")))
    status = last.statuses[0]
    assert status.code == OVER
    assert (status.current_limit.requests_per_unit, status.current_limit.name) == (3, "per_user")
    until_reset = status.duration_until_reset.ToTimedelta().total_seconds()
    assert status.limit_remaining == 0 and 0 < until_reset <= 60  # under 1 s near a minute's end
    # As envoyproxy/ratelimit by default: no headers, no body.
    assert list(last.response_headers_to_add) == [] and last.raw_body == b""
    assert service.ask(descriptor(("user", "bob"))).overall_code == OK  # counters are per value


def test_upstreams_headers_under_its_names_and_our_openai_body_when_asked(tmp_path: Path) -> None:
    env = {"LIMIT_RESPONSE_HEADERS_ENABLED": "true", "LIMIT_REMAINING_HEADER": "X-Left"}
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(sup, tmp_path, "--openai-body", env=env)
        try:
            answers = [svc.ask(descriptor(("user", "alice"))) for _ in range(4)]
        finally:
            svc.channel.close()
    first = {h.key: h.value for h in answers[0].response_headers_to_add}
    assert set(first) == {"RateLimit-Limit", "X-Left", "RateLimit-Reset"}
    assert (first["RateLimit-Limit"], first["X-Left"]) == ("3", "2")  # the count alone
    assert 1 <= int(first["RateLimit-Reset"]) <= 60 and answers[0].raw_body == b""
    limited = {h.key: h.value for h in answers[3].response_headers_to_add}
    assert (limited["X-Left"], limited["content-type"]) == ("0", "application/json")
    assert 1 <= int(limited["retry-after"]) <= 60
    assert json.loads(answers[3].raw_body)["error"]["code"] == "rate_limit_exceeded"


def test_metrics_export_the_process_and_store_errors_at_zero(service: Service) -> None:
    text = service.metrics()
    assert_process_metrics(text, "ratelimit")
    for policy in ("fail_open", "fail_closed"):  # before any error: an alert's rate() has a base
        assert sample(text, "arks_ratelimit_backend_errors_total", policy=policy) == 0.0


def test_each_call_is_timed_by_its_domain_and_an_unconfigured_domain_is_unknown(
    service: Service,
) -> None:
    for _ in range(3):
        service.ask(descriptor(("user", "dora")))
    stranger = f"client-chosen-{uuid.uuid4().hex}"
    request = rls_pb2.RateLimitRequest(domain=stranger, descriptors=[descriptor(("user", "x"))])
    assert service.stub.ShouldRateLimit(request, timeout=5).overall_code == OK
    text = service.metrics()
    count = "arks_ratelimit_call_seconds_count"
    assert sample(text, count, domain=service.domain) == 3
    assert sample(text, count, domain="unknown") == 1
    assert stranger not in text  # an unconfigured domain is one label value, never the string
    assert sample(text, "arks_ratelimit_call_seconds_bucket", domain="unknown", le="1.0") == 1
    for kind in ("redis_error", "service_error"):  # at 0 before any error
        assert sample(text, "arks_ratelimit_call_errors_total", type=kind) == 0.0


def test_nested_descriptors_and_unknown_keys(service: Service) -> None:
    answer = service.ask(descriptor(("user", "carol"), ("model", "m")), descriptor(("nobody", "x")))
    assert answer.overall_code == OK
    assert (
        answer.statuses[0].current_limit.name == "per_model"
        and answer.statuses[0].limit_remaining == 99
    )
    assert not answer.statuses[1].HasField("current_limit")


def test_hits_addend_charges_costs_and_zero_only_looks(service: Service) -> None:
    assert service.ask(descriptor(("tokens", "t"), hits=600)).overall_code == OK
    looked = service.ask(descriptor(("tokens", "t"), hits=0))
    assert looked.overall_code == OK and looked.statuses[0].limit_remaining == 400
    assert (
        service.ask(descriptor(("tokens", "t"), hits=600)).overall_code == OVER
    )  # charged anyway: debt
    assert service.ask(descriptor(("tokens", "t"), hits=0)).overall_code == OVER
    # request-level hits_addend applies to descriptors without their own
    assert service.ask(descriptor(("user", "dave")), hits_addend=3).statuses[0].limit_remaining == 0


def test_envoys_limit_override(service: Service) -> None:
    """1 per second: the two asks must fall in one fixed window (epoch-aligned seconds), so a
    pair that straddles a second's end is asked again with a fresh value."""
    for attempt in range(5):
        d = descriptor(("user", f"erin-{attempt}"))
        d.limit.CopyFrom(
            common.RateLimitDescriptor.RateLimitOverride(
                requests_per_unit=1, unit=rls_pb2.RateLimitResponse.RateLimit.SECOND
            )
        )
        started = time.time()
        answers = [service.ask(d) for _ in range(2)]
        if int(time.time()) == int(started):
            break
    assert [a.overall_code for a in answers] == [OK, OVER]
    limit = answers[1].statuses[0].current_limit
    assert (limit.requests_per_unit, limit.name) == (1, "")  # unnamed, as upstream's
    # A domain the configuration does not have: no limit, override or not (as upstream).
    elsewhere = rls_pb2.RateLimitRequest(domain="not-configured", descriptors=[d])
    answer = service.stub.ShouldRateLimit(elsewhere, timeout=5)
    assert answer.overall_code == OK and not answer.statuses[0].HasField("current_limit")


def test_shadow_mode_and_unlimited(service: Service) -> None:
    assert [service.ask(descriptor(("shadowed", "s"))).overall_code for _ in range(3)] == [
        OK,
        OK,
        OK,
    ]
    assert all(service.ask(descriptor(("vip", "v"))).overall_code == OK for _ in range(10))
    assert (
        f'arks_ratelimit_shadow_mode_total{{domain="{service.domain}",key="{service.domain}.shadowed"}} 2.0'
        in service.metrics()
    )
    # As envoyproxy/ratelimit answers them: a shadowed limit over its count reports OK with its
    # limit; an unlimited descriptor OK with the largest remaining count and no limit.
    shadowed = service.ask(descriptor(("shadowed", "s"))).statuses[0]
    assert shadowed.code == OK and shadowed.current_limit.requests_per_unit == 1
    vip = service.ask(descriptor(("vip", "v"))).statuses[0]
    assert (vip.code, vip.limit_remaining, vip.HasField("current_limit")) == (OK, 2**32 - 1, False)


def test_an_empty_domain_or_descriptor_list_is_an_error_as_upstreams(service: Service) -> None:
    for request, message in (
        (rls_pb2.RateLimitRequest(domain="", descriptors=[descriptor(("user", "a"))]), "domain"),
        (rls_pb2.RateLimitRequest(domain=service.domain), "descriptor list"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            service.stub.ShouldRateLimit(request, timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNKNOWN
        assert caught.value.details() == f"rate limit {message} must not be empty"
    assert 'arks_ratelimit_call_errors_total{type="service_error"} 2.0' in service.metrics()


def test_durations_until_reset_are_whole_seconds(service: Service) -> None:
    status = service.ask(descriptor(("user", "erin"))).statuses[0]
    reset = status.duration_until_reset
    assert reset.nanos == 0 and 1 <= reset.seconds <= 60


def test_global_shadow_mode_answers_ok_and_keeps_each_descriptors_code(tmp_path: Path) -> None:
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        shadow = Service(sup, tmp_path, "--shadow-mode")
        try:
            answers = [shadow.ask(descriptor(("user", "frank"))) for _ in range(4)]
            assert [a.overall_code for a in answers] == [OK, OK, OK, OK]
            assert [a.statuses[0].code for a in answers] == [OK, OK, OK, OVER]
            assert answers[-1].raw_body == b""  # nothing refused: no 429 body
            # counted apart, as upstream's global_shadow_mode
            assert sample(shadow.metrics(), "arks_ratelimit_global_shadow_mode_total") == 1
        finally:
            shadow.channel.close()


# --- Redis going away --------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[Supervisor, int]]:
    port = free_port()
    with Supervisor(log_dir=tmp_path / "redis") as sup:
        yield sup, port


def start_redis(sup: Supervisor, port: int) -> None:
    child = sup.start(
        f"redis-{port}", ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
    )
    wait_port(child, port)


@pytest.mark.parametrize("mode", ["fail-open", "fail-closed"])
def test_redis_outage_follows_the_policy_and_counting_resumes(
    own_redis: tuple[Supervisor, int], tmp_path: Path, mode: str
) -> None:
    sup, port = own_redis
    start_redis(sup, port)
    extra = ["--redis", f"redis://127.0.0.1:{port}/0", "--redis-timeout-s", "0.3"]
    if mode == "fail-closed":
        extra.append("--fail-closed")
    svc = Service(sup, tmp_path, *extra)
    try:
        assert svc.ask(descriptor(("user", "x"))).overall_code == OK
        sup.children[0].stop()  # Redis goes away
        during = svc.ask(descriptor(("user", "x")))
        assert during.overall_code == (OK if mode == "fail-open" else OVER)
        assert svc.ask(descriptor(("nobody", "n"))).overall_code == OK  # unlimited needs no Redis
        text = svc.metrics()
        errors = sample(text, "arks_ratelimit_backend_errors_total", policy=mode.replace("-", "_"))
        assert (errors or 0.0) >= 1
        # envoyproxy/ratelimit's should_rate_limit.redis_error: the call decided without Redis
        assert sample(text, "arks_ratelimit_call_errors_total", type="redis_error") == 1.0
        # As envoyproxy/ratelimit's health: NOT_SERVING while Redis does not answer.
        assert wait_for(lambda: health_of(svc), lambda h: h == {NOT_SERVING}, timeout=10)
        start_redis(sup, port)  # back, empty
        answer = wait_for(
            lambda: svc.ask(descriptor(("user", "x"))), lambda a: a.statuses[0].limit_remaining == 2
        )
        assert answer.overall_code == OK
        assert wait_for(lambda: health_of(svc), lambda h: h == {SERVING}, timeout=10)
    finally:
        svc.channel.close()


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# envoyproxy/ratelimit registers its health as "ratelimit"; "" is the server's, and the last is
# the service's own name (what a gRPC health check naming the service asks).
HEALTH_NAMES = ("", "ratelimit", "envoy.service.ratelimit.v3.RateLimitService")


def health_of(svc: Service) -> set[int]:
    stub = health_pb2_grpc.HealthStub(svc.channel)
    return {
        stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        for name in HEALTH_NAMES
    }


def test_health_answers_for_upstreams_service_name(service: Service) -> None:
    assert health_of(service) == {SERVING}


# --- behind real Envoy -------------------------------------------------------------------------


def envoy_bootstrap(listen: int, admin: int, rls_port: int, engine_port: int, domain: str) -> dict:
    h2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }

    def cluster(name: str, port: int, http2: bool = False) -> dict:
        c = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "127.0.0.1",
                                            "port_value": port,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
        if http2:
            c["typed_extension_protocol_options"] = h2
        return c

    route = {
        "match": {"prefix": "/"},
        "route": {
            "cluster": "engine",
            "rate_limits": [
                {
                    "actions": [
                        {"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}
                    ]
                }
            ],
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "t",
        "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [route]}]},
        "http_filters": [
            {
                "name": "envoy.filters.http.ratelimit",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                    "domain": domain,
                    "failure_mode_deny": False,
                    "timeout": "1s",
                    "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
                    "rate_limit_service": {
                        "transport_api_version": "V3",
                        "grpc_service": {"envoy_grpc": {"cluster_name": "ratelimit"}},
                    },
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "l",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster("engine", engine_port),
                cluster("ratelimit", rls_port, http2=True),
            ],
        },
    }


def test_behind_envoy_the_client_gets_429_with_headers_and_an_openai_body(tmp_path: Path) -> None:
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(sup, tmp_path, "--response-headers", "--openai-body")
        engine_port = free_port()
        engine = sup.python("engine", "launcher.sim", "--port", str(engine_port), "--model", "m")
        wait_http(engine, f"http://127.0.0.1:{engine_port}/health")
        listen, admin = free_port(), free_port()
        bootstrap = tmp_path / "envoy.json"
        bootstrap.write_text(
            json.dumps(envoy_bootstrap(listen, admin, svc.port, engine_port, svc.domain))
        )
        envoy = sup.start(
            "envoy",
            [
                envoy_binary(),
                "-c",
                str(bootstrap),
                "--disable-hot-restart",
                "--log-level",
                "warning",
            ],
        )
        wait_http(envoy, f"http://127.0.0.1:{admin}/ready")
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        answers = [
            httpx.post(
                f"http://127.0.0.1:{listen}/v1/chat/completions",
                json=body,
                headers={"x-user": "alice"},
            )
            for _ in range(4)
        ]
        svc.channel.close()
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].headers["ratelimit-remaining"] == "2"
    assert answers[0].headers["ratelimit-limit"] == "3"
    assert answers[0].headers["x-ratelimit-remaining"] == "2"
    limited = answers[3]
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.headers["x-ratelimit-limit"].startswith("3")
    assert limited.headers["content-type"] == "application/json"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"


SHARED = """\
domain: {domain}
descriptors:
  - key: files
    value: files/*
    share_threshold: true
    rate_limit: {{unit: minute, requests_per_unit: 2}}
  - key: path
    value: /api/*/items
    rate_limit: {{unit: minute, requests_per_unit: 1}}
"""


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_share_threshold_and_inner_wildcards_through_the_service(
    store: str, tmp_path: Path
) -> None:
    """envoyproxy/ratelimit's share_threshold: every value a wildcard matches counts against one
    counter; a plain wildcard (here with `*` inside the value) counts each value apart."""
    extra = ("--redis", "redis://127.0.0.1:6379/0") if store == "redis" else ()
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(sup, tmp_path, *extra, config_text=SHARED)
        try:

            def code(*entry: tuple[str, str]) -> int:
                return svc.ask(descriptor(*entry)).overall_code

            shared = [code(("files", f"files/{name}")) for name in ("a.pdf", "b.csv", "c.txt")]
            assert shared == [OK, OK, OVER]  # one counter of 2 for every file
            assert code(("path", "/api/v1/items")) == OK
            assert code(("path", "/api/v2/items")) == OK  # its own counter
            assert code(("path", "/api/v1/items")) == OVER
            assert code(("path", "/api/v1/other")) == OK  # no limit matches
        finally:
            svc.channel.close()


def test_a_domain_in_two_files_merges_when_asked_as_upstreams_env_says(tmp_path: Path) -> None:
    """Two files of one domain: refused by default (the service does not start), merged with
    MERGE_DOMAIN_CONFIG=true (envoyproxy/ratelimit's variable) or --merge-domain-config."""
    domain = f"merged-{uuid.uuid4().hex[:8]}"
    directory = tmp_path / "config"
    directory.mkdir()
    for key in ("key1", "key2"):
        (directory / f"{key}.yaml").write_text(
            f"domain: {domain}\ndescriptors:\n  - key: {key}\n"
            "    rate_limit: {unit: minute, requests_per_unit: 1}\n"
        )
    port, metrics_port = free_port(), free_port()
    argv = [
        "--config",
        str(directory),
        "--grpc-address",
        f"127.0.0.1:{port}",
        "--metrics-port",
        str(metrics_port),
        "--port",
        str(free_port()),
        "--debug-port",
        str(free_port()),
    ]
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        refused = sup.python("refused", "ratelimit", *argv)
        assert refused.popen.wait(timeout=30) != 0
        assert f"duplicate domain '{domain}'" in (tmp_path / "logs" / "refused.log").read_text()
        bad = sup.python("bad-env", "ratelimit", *argv, env={"MERGE_DOMAIN_CONFIG": "maybe"})
        assert bad.popen.wait(timeout=30) != 0
        assert (
            "MERGE_DOMAIN_CONFIG='maybe' is not a boolean"
            in (tmp_path / "logs" / "bad-env.log").read_text()
        )
        child = sup.python("merged", "ratelimit", *argv, env={"MERGE_DOMAIN_CONFIG": "true"})
        wait_http(child, f"http://127.0.0.1:{metrics_port}/metrics")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            for key in ("key1", "key2"):
                request = rls_pb2.RateLimitRequest(
                    domain=domain, descriptors=[descriptor((key, "v"))]
                )
                answers = [stub.ShouldRateLimit(request, timeout=5).overall_code for _ in range(2)]
                assert answers == [OK, OVER], key


QUOTAS = """\
domain: {domain}
descriptors:
  - key: team
    quota_mode: true
    rate_limit: {{unit: minute, requests_per_unit: 1}}
  - key: org
    quota_mode: true
    rate_limit: {{unit: minute, requests_per_unit: 2}}
"""


def test_quota_mode_refuses_only_when_every_quota_is_spent(tmp_path: Path) -> None:
    """envoyproxy/ratelimit's quota_mode: a request over one quota but within another goes
    through (its descriptor still says OVER_LIMIT); over all of them, it is refused."""
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(sup, tmp_path, config_text=QUOTAS)
        try:
            both = (descriptor(("team", "t")), descriptor(("org", "o")))
            answers = [svc.ask(*both) for _ in range(3)]
        finally:
            svc.channel.close()
    assert [a.overall_code for a in answers] == [OK, OK, OVER]
    assert [[s.code for s in a.statuses] for a in answers] == [
        [OK, OK],
        [OVER, OK],
        [OVER, OVER],
    ]


def test_a_spent_limit_is_answered_from_the_local_cache_as_upstreams_variable_says(
    tmp_path: Path,
) -> None:
    """LOCAL_CACHE_SIZE_IN_BYTES: once over, a counter is answered in the service until its
    window ends; Redis's count stops where the refusals began; the refusals answered here are
    counted apart too (upstream's over_limit_with_local_cache)."""
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        svc = Service(
            sup,
            tmp_path,
            "--redis",
            "redis://127.0.0.1:6379/0",
            env={"LOCAL_CACHE_SIZE_IN_BYTES": "1048576"},
        )
        try:
            user = f"u-{uuid.uuid4().hex[:8]}"
            for attempt in range(5):  # 3 per minute: the asks must fall in one window
                started = time.time()
                codes = [
                    svc.ask(descriptor(("user", f"{user}-{attempt}"))).overall_code
                    for _ in range(8)
                ]
                if int(time.time()) // 60 == int(started) // 60:
                    break
            assert codes == [OK, OK, OK] + [OVER] * 5
            admin = redis.Redis.from_url("redis://127.0.0.1:6379/0")
            try:
                (key,) = admin.keys(f"arks:rl:{svc.domain}_user_{user}-{attempt}_*")
                assert int(admin.get(key) or 0) == 4, "only the first refusal reached Redis"
            finally:
                admin.close()
            text = svc.metrics()
            assert (
                sample(
                    text,
                    "arks_ratelimit_over_limit_total",
                    domain=svc.domain,
                    key=f"{svc.domain}.user",
                )
                == 5
            )
            cached = "arks_ratelimit_over_limit_with_local_cache_total"  # upstream's stat
            assert sample(text, cached, domain=svc.domain, key=f"{svc.domain}.user") == 4
        finally:
            svc.channel.close()
