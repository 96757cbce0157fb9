"""Rate-limit decisions against Redis, direct gRPC and through Envoy, against floors of the same run.

    .venv/bin/python -m tests.bench.gateway --only ratelimit --out docs/benchmarks.md   (`make bench` runs it too)
    .venv/bin/python -m tests.bench.ratelimit [--duration 4] [--quick] [--out docs/benchmarks.md]

Three gRPC servers run side by side: the empty unary call (`tests.bench.empty_unary`, the floor of
any Python decision), `python -m ratelimit` with counters in memory, and the same with counters in
Redis. A load generator in its own process (`... ratelimit client`, so its CPU is not the servers')
drives them, interleaved round by round, first closed-loop (N calls in flight) and then open-loop
at a fixed rate. Then wrk drives the simulated engine through plain Envoy and through the same
Envoy with the rate-limit filter calling the Redis-backed service. Only ratios between
configurations of one run mean anything: the machine is small, shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from launcher.procs import Supervisor, free_port, wait_http, wait_port
from tests.bench import report, targets, wrk
from tests.bench.report import Budget, Measurement
from tests.bench.targets import CpuSample, Target
from tests.bench.workloads import PATH, Workload, chat, preflight
from tests.support.cpu import cpu_seconds
from tests.support.paths import REPO

RPC = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
USERS = 100  # descriptor values: user=u0 .. u99
LIMIT_NAME = "bench_per_user"
LIMIT_PER_MINUTE = 1_000_000_000  # never over: every decision is a full "count it, answer OK"
ENGINE_OUTPUT_TOKENS = 16
CALL_TIMEOUT_S = 5.0
RAMP_S = 0.2  # closed loop: calls in flight before a segment's counters are read
PACED_WARM_S = 0.3  # open loop: paced calls before a segment's window opens

BEGIN = "<!-- ratelimit-bench: begin (python -m tests.bench.gateway --only ratelimit replaces this section) -->"
END = "<!-- ratelimit-bench: end -->"

EMPTY, MEMORY, REDIS = "empty call", "ratelimit + memory", "ratelimit + redis"
PLAIN, LIMITED = "Envoy", "Envoy + rate-limit filter"


class RateLimitBenchError(RuntimeError):
    """The run cannot produce trustworthy figures; the message says what went wrong where."""


@dataclass(frozen=True)
class Settings:
    duration_s: float = (
        4.0  # measured seconds per server (closed loop) and per Envoy config and concurrency
    )
    paced_s: float = 5.0  # measured seconds per server at the fixed rate
    rate: int = 500  # decisions per second, open loop
    in_flight: int = 16  # closed loop
    direct_rounds: int = 4  # interleaved segments each direct gRPC measurement is split into
    rounds: int = 2  # the same for the wrk measurements (whole seconds each)
    warmup_s: float = 1.0
    envoy_concurrency: int = 1
    redis_url: str = DEFAULT_REDIS
    quick: bool = False

    @classmethod
    def smoke(cls) -> Settings:
        return cls(duration_s=1.0, paced_s=1.0, direct_rounds=1, rounds=1, warmup_s=0.5, quick=True)


# --------------------------------------------------------------------------- the load client (own process)


def _requests(domain: str) -> list[bytes]:
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common
    from envoy.service.ratelimit.v3 import rls_pb2

    out = []
    for i in range(USERS):
        entry = common.RateLimitDescriptor.Entry(key="user", value=f"u{i}")
        message = rls_pb2.RateLimitRequest(
            domain=domain, descriptors=[common.RateLimitDescriptor(entries=[entry])]
        )
        out.append(message.SerializeToString())
    return out


class _Probe:
    """CPU clocks of the measured server (and Redis) and the client's own count, read together."""

    def __init__(self, pid: int, redis_pid: int | None) -> None:
        self.pid, self.redis_pid = pid, redis_pid

    def read(self, done: int) -> tuple[int, float, float, float]:
        redis = cpu_seconds(self.redis_pid) if self.redis_pid else math.nan
        return done, time.perf_counter(), cpu_seconds(self.pid), redis


def _segment(
    start: tuple[int, float, float, float], end: tuple[int, float, float, float]
) -> dict[str, float]:
    return {
        "decisions": end[0] - start[0],
        "wall_s": end[1] - start[1],
        "cpu_s": end[2] - start[2],
        "redis_cpu_s": end[3] - start[3],
    }


async def _client(plan: dict[str, Any]) -> dict[str, Any]:
    import grpc
    from envoy.service.ratelimit.v3 import rls_pb2

    ok = rls_pb2.RateLimitResponse.OK
    parse = rls_pb2.RateLimitResponse.FromString
    requests = _requests(plan["domain"])
    redis_pid = plan["redis_pid"]
    out: dict[str, Any] = {"closed": {}, "paced": {}, "calls": {}}
    channels = []
    calls = {}
    for t in plan["targets"]:
        channel = grpc.aio.insecure_channel(t["address"])
        channels.append(channel)
        await asyncio.wait_for(channel.channel_ready(), 10)
        # bytes in (pre-serialized), response parsed to check every answer
        calls[t["label"]] = channel.unary_unary(
            RPC, request_serializer=None, response_deserializer=parse
        )
        out["closed"][t["label"]] = []
        out["paced"][t["label"]] = []
        out["calls"][t["label"]] = 0

    async def one(label: str, i: int) -> None:
        response = await calls[label](requests[i % USERS], timeout=CALL_TIMEOUT_S)
        if response.overall_code != ok:
            raise RateLimitBenchError(f"{label}: answer {i} is not OK: {response}")
        out["calls"][label] += 1

    async def closed(label: str, probe: _Probe, seconds: float) -> dict[str, float]:
        done = 0
        stop = False

        async def worker(k: int) -> None:
            nonlocal done
            i = k
            while not stop:
                await one(label, i)
                done += 1
                i += plan["in_flight"]

        tasks = [asyncio.create_task(worker(k)) for k in range(plan["in_flight"])]
        try:
            await asyncio.sleep(RAMP_S)
            _raise_first(tasks)
            start = probe.read(done)
            await asyncio.sleep(seconds)
            end = probe.read(done)
        finally:
            stop = True
            await asyncio.gather(*tasks)  # re-raises the first failed call
        return _segment(start, end)

    async def paced(label: str, probe: _Probe, seconds: float) -> dict[str, Any]:
        interval = 1.0 / plan["rate"]
        latencies: list[float] = []
        lags: list[float] = []
        window: list[tuple[int, float, float, float]] = []
        done = 0
        tasks: set[asyncio.Task[None]] = set()
        errors: list[BaseException] = []

        async def timed(i: int, due: float, measured: bool) -> None:
            nonlocal done
            sent = time.perf_counter()
            try:
                await one(label, i)
            except Exception as err:  # raised by the scheduler below, not lost in a finished task
                errors.append(err)
                return
            if measured:
                latencies.append((time.perf_counter() - sent) * 1e6)
                lags.append((sent - due) * 1e6)
                done += 1

        t0 = time.perf_counter()
        opens, closes = t0 + PACED_WARM_S, t0 + PACED_WARM_S + seconds
        i = 0
        while True:
            due = t0 + i * interval
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
                continue
            if due >= opens and not window:
                window.append(probe.read(0))
            if due >= closes:
                window.append(probe.read(0))
                break
            task = asyncio.create_task(timed(i, due, due >= opens))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if errors:
                break
            i += 1
            await asyncio.sleep(0)  # let the call start now, so its send time is its real one
        await asyncio.gather(*tasks)
        if errors:
            raise errors[0]
        segment: dict[str, Any] = _segment(window[0], window[1])
        segment.update(decisions=done, latencies_us=latencies, lags_us=lags)
        return segment

    targets_ = plan["targets"]
    for t in targets_:
        print(f"  warming up {t['label']} ...", file=sys.stderr, flush=True)
        await closed(t["label"], _Probe(t["pid"], redis_pid), plan["warmup_s"])
    for kind, run, seconds in (
        ("closed", closed, plan["closed_segment_s"]),
        ("paced", paced, plan["paced_segment_s"]),
    ):
        for round_ in range(plan["rounds"]):
            for t in targets_ if round_ % 2 == 0 else list(reversed(targets_)):
                print(
                    f"  {kind} loop, round {round_ + 1}: {t['label']} ...",
                    file=sys.stderr,
                    flush=True,
                )
                result = await run(t["label"], _Probe(t["pid"], redis_pid), seconds)
                out[kind][t["label"]].append(result)
    for channel in channels:
        await channel.close()
    return out


def _raise_first(tasks: Sequence[asyncio.Task[None]]) -> None:
    for task in tasks:
        if task.done() and not task.cancelled():
            error = task.exception()
            if error is not None:
                raise error


def client_main(plan_path: Path) -> None:
    import uvloop

    plan = json.loads(plan_path.read_text())
    try:
        result = uvloop.run(_client(plan))
    except Exception as err:  # anything: the parent reports our stderr
        sys.exit(f"load client FAILED: {type(err).__name__}: {err}")
    print(json.dumps(result))


# --------------------------------------------------------------------------- the servers


@dataclass(frozen=True)
class Server:
    label: str
    port: int
    pid: int
    metrics_port: int | None = None  # the rate-limit service's Prometheus endpoint

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric_sum(self, name: str, domain: str | None = None) -> float:
        if self.metrics_port is None:
            return math.nan
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and (domain is None or f'domain="{domain}"' in line):
                total += float(line.rsplit(" ", 1)[1])
        return total


def _python_env() -> dict[str, str]:
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    }


def start_empty(sup: Supervisor) -> Server:
    port = free_port()
    child = sup.python(
        "empty-unary",
        "tests.bench.empty_unary",
        "--grpc-address",
        f"127.0.0.1:{port}",
        env=_python_env(),
    )
    wait_port(child, port)
    return Server(EMPTY, port, child.popen.pid)


def start_ratelimit(sup: Supervisor, label: str, config: Path, redis_url: str | None) -> Server:
    port, metrics_port = free_port(), free_port()
    extra = ["--redis", redis_url] if redis_url else []
    child = sup.python(
        label.replace(" + ", "-"),
        "ratelimit",
        "--config",
        str(config),
        "--grpc-address",
        f"127.0.0.1:{port}",
        "--metrics-port",
        str(metrics_port),
        "--port",  # upstream's HTTP and debug ports: free ones, as two services run at once
        str(free_port()),
        "--debug-port",
        str(free_port()),
        "--log-level",
        "WARNING",
        *extra,
    )
    wait_http(child, f"http://127.0.0.1:{metrics_port}/metrics")
    wait_port(child, port)
    return Server(label, port, child.popen.pid, metrics_port)


def check_decides(server: Server, domain: str) -> None:
    """One decision over gRPC, checked: a misconfigured service answers OK without counting."""
    import grpc
    from envoy.service.ratelimit.v3 import rls_pb2

    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(
            RPC, request_serializer=None, response_deserializer=rls_pb2.RateLimitResponse.FromString
        )
        first, second = (call(_requests(domain)[0], timeout=CALL_TIMEOUT_S) for _ in range(2))
    if first.overall_code != rls_pb2.RateLimitResponse.OK:
        raise RateLimitBenchError(f"{server.label}: preflight decision is not OK: {first}")
    if server.metrics_port is None:
        return
    statuses = [first.statuses, second.statuses]
    if any(len(s) != 1 or s[0].current_limit.name != LIMIT_NAME for s in statuses):
        raise RateLimitBenchError(
            f"{server.label}: preflight did not apply the bench limit: {first}"
        )
    if second.statuses[0].limit_remaining != first.statuses[0].limit_remaining - 1:
        raise RateLimitBenchError(
            f"{server.label}: preflight decisions were not counted: {first} then {second}"
        )
    if server.metric_sum("arks_ratelimit_backend_errors_total"):
        raise RateLimitBenchError(
            f"{server.label}: the counter store failed already at preflight (see its log)"
        )


def redis_pid(url: str) -> int | None:
    """The local Redis server's pid (for its CPU, as context), or None if it is not on this machine."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        pid = int(client.info("server")["process_id"])
    except redis.RedisError as err:
        raise RateLimitBenchError(f"Redis at {url} is not reachable: {err}") from err
    finally:
        client.close()
    if not Path(f"/proc/{pid}").exists():
        return None
    try:
        cpu_seconds(pid)
    except OSError:
        return None
    return pid


def rate_limit_config(domain: str) -> str:
    return (
        f"domain: {domain}\n"
        "descriptors:\n"
        "  - key: user\n"
        f"    rate_limit: {{unit: minute, requests_per_unit: {LIMIT_PER_MINUTE}, name: {LIMIT_NAME}}}\n"
    )


# --------------------------------------------------------------------------- Envoy with the rate-limit filter


def limited_bootstrap(
    listen: int, admin: int, engine_port: int, rls_port: int, domain: str
) -> dict[str, Any]:
    """The plain baseline's bootstrap plus the rate-limit filter: `x-user` header → `user` descriptor."""
    boot = targets.baseline_bootstrap(listen, admin, engine_port, None)
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    route["route"]["rate_limits"] = [
        {"actions": [{"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}]}
    ]
    hcm["http_filters"].insert(
        0,
        {
            "name": "envoy.filters.http.ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                "domain": domain,
                "failure_mode_deny": True,  # a failed decision must fail the run, not pass unmeasured
                "timeout": "1s",
                "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
                "rate_limit_service": {
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "ratelimit"}},
                },
            },
        },
    )
    endpoint = {
        "endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": rls_port}}
        }
    }
    boot["static_resources"]["clusters"].append(
        {
            "name": "ratelimit",
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": "ratelimit",
                "endpoints": [{"lb_endpoints": [endpoint]}],
            },
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
        }
    )
    return boot


def start_limited_envoy(
    sup: Supervisor, work: Path, engine_port: int, rls: Server, domain: str, concurrency: int
) -> tuple[Target, int]:
    listen, admin = free_port(), free_port()
    bootstrap = work / "envoy-ratelimit.json"
    bootstrap.write_text(
        json.dumps(limited_bootstrap(listen, admin, engine_port, rls.port, domain), indent=1)
    )
    envoy = sup.start("envoy-ratelimit", targets.envoy_argv(bootstrap, concurrency))
    wait_http(envoy, f"http://127.0.0.1:{admin}/ready")
    return Target(LIMITED, f"http://127.0.0.1:{listen}", (rls.pid,), envoy.popen.pid), admin


def envoy_ratelimit_stats(admin: int) -> dict[str, int]:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{admin}/stats?filter=ratelimit", timeout=5
    ) as resp:
        text = resp.read().decode()
    stats: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith("cluster.engine.ratelimit.") and value.strip().isdigit():
            stats[name.rsplit(".", 1)[1]] = int(value)
    return stats


# --------------------------------------------------------------------------- the run


@dataclass
class Direct:
    """One server's figures over all its segments, as the load client measured them."""

    decisions: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    latencies_us: list[float] = field(default_factory=list)
    lags_us: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, segments: Sequence[dict[str, Any]]) -> Direct:
        d = cls()
        for s in segments:
            d.decisions += int(s["decisions"])
            d.wall_s += s["wall_s"]
            d.cpu_s += s["cpu_s"]
            d.redis_cpu_s += s["redis_cpu_s"]
            d.latencies_us += s.get("latencies_us", [])
            d.lags_us += s.get("lags_us", [])
        return d

    @property
    def rate(self) -> float:
        return self.decisions / self.wall_s if self.wall_s else math.nan

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.decisions * 1e6 if self.decisions else math.nan

    @property
    def redis_us(self) -> float:
        return self.redis_cpu_s / self.decisions * 1e6 if self.decisions else math.nan

    def latency_ms(self, p: float) -> float:
        return percentile(self.latencies_us, p) / 1000.0

    def lag_ms(self, p: float) -> float:
        return percentile(self.lags_us, p) / 1000.0


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100.0 * len(ordered)) - 1))]


@dataclass
class Results:
    settings: Settings
    closed: dict[str, Direct]
    paced: dict[str, Direct]
    envoy: dict[tuple[int, str], Measurement]  # (wrk connections, config)
    envoy_rls_calls: int
    load_average: tuple[float, float, float]
    elapsed_s: float = 0.0


def run_client(work: Path, plan: dict[str, Any]) -> dict[str, Any]:
    plan_path = work / "client-plan.json"
    plan_path.write_text(json.dumps(plan))
    argv = [sys.executable, "-m", "tests.bench.ratelimit", "client", str(plan_path)]
    budget_s = 60 + len(plan["targets"]) * (
        plan["warmup_s"]
        + plan["rounds"]
        * (
            plan["closed_segment_s"]
            + plan["paced_segment_s"]
            + RAMP_S
            + PACED_WARM_S
            + 2 * CALL_TIMEOUT_S
        )
    )
    try:
        done = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **_python_env()},
            timeout=budget_s,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise RateLimitBenchError(f"the load client took longer than {budget_s:.0f} s") from err
    if done.returncode != 0:
        raise RateLimitBenchError(
            f"the load client exited with {done.returncode} (its message is above)"
        )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def measure_envoy(
    wrk_bin: str, work: Path, arms: Sequence[Target], workload: Workload, settings: Settings
) -> dict[tuple[int, str], Measurement]:
    script = work / f"ratelimit-{workload.key}.lua"
    script.write_text(wrk.lua_script("POST", workload.body_bytes(), dict(workload.headers)))
    for target in arms:
        wrk.run(wrk_bin, target.url + PATH, script, workload.connections, settings.warmup_s)
    loads = {t.name: wrk.Result() for t in arms}
    cpu = {t.name: CpuSample(0.0, 0.0) for t in arms}
    segment_s = settings.duration_s / settings.rounds
    for round_ in range(settings.rounds):
        for target in arms if round_ % 2 == 0 else list(reversed(arms)):
            before = CpuSample.take(target)
            loads[target.name].merge(
                wrk.run(wrk_bin, target.url + PATH, script, workload.connections, segment_s)
            )
            time.sleep(0.1)
            cpu[target.name] = cpu[target.name] + (CpuSample.take(target) - before)
    for name, load in loads.items():
        if load.error_count or load.requests == 0:
            raise RateLimitBenchError(
                f"wrk c={workload.connections} via {name}: {load.requests} requests, errors {dict(load.errors)} "
                "(status = non-2xx/3xx answers; the rate-limit filter fails closed here)"
            )
    return {(workload.connections, name): Measurement(loads[name], cpu[name]) for name in loads}


def run(settings: Settings) -> Results:
    started = time.monotonic()
    load_average = os.getloadavg()
    wrk_bin = wrk.ensure_wrk()
    domain = f"bench-{uuid.uuid4().hex[:10]}"  # fresh counters in a Redis others may share
    with (
        tempfile.TemporaryDirectory(prefix="arks-bench-ratelimit-") as tmp,
        Supervisor(log_dir=Path(tmp) / "logs") as sup,
    ):
        try:
            return _run(settings, sup, Path(tmp), wrk_bin, domain, started, load_average)
        except RateLimitBenchError as err:
            tails = "\n".join(
                f"--- {c.name} (last lines of its log):\n{c.log_tail(15)}"
                for c in sup.children
                if c.log_tail(15).strip()
            )
            raise RateLimitBenchError(f"{err}\n{tails}") from err


def _run(
    settings: Settings,
    sup: Supervisor,
    work: Path,
    wrk_bin: str,
    domain: str,
    started: float,
    load_average: tuple[float, float, float],
) -> Results:
    config = work / "ratelimit.yaml"
    config.write_text(rate_limit_config(domain))
    redis = redis_pid(settings.redis_url)
    servers = [
        start_empty(sup),
        start_ratelimit(sup, MEMORY, config, None),
        start_ratelimit(sup, REDIS, config, settings.redis_url),
    ]
    for server in servers:
        check_decides(server, domain)
    print("measuring rate-limit decisions over direct gRPC ...", file=sys.stderr, flush=True)
    plan = {
        "domain": domain,
        "redis_pid": redis,
        "in_flight": settings.in_flight,
        "rate": settings.rate,
        "rounds": settings.direct_rounds,
        "warmup_s": settings.warmup_s,
        "closed_segment_s": settings.duration_s / settings.direct_rounds,
        "paced_segment_s": settings.paced_s / settings.direct_rounds,
        "targets": [{"label": s.label, "address": s.address, "pid": s.pid} for s in servers],
    }
    out = run_client(work, plan)
    for server in servers[1:]:
        made = out["calls"][server.label] + 2  # + the preflight's two
        hits = server.metric_sum("arks_ratelimit_hits_total", domain)
        if server.metric_sum("arks_ratelimit_backend_errors_total") or hits != made:
            raise RateLimitBenchError(
                f"{server.label}: {made} calls made but {hits:g} hits counted, or the counter store failed "
                "(decisions without it are not decisions)"
            )
    closed = {label: Direct.of(segments) for label, segments in out["closed"].items()}
    paced = {label: Direct.of(segments) for label, segments in out["paced"].items()}
    _print_direct(closed, paced, settings)

    print("measuring Envoy with and without the rate-limit filter ...", file=sys.stderr, flush=True)
    rls = servers[2]
    hits_before = rls.metric_sum("arks_ratelimit_hits_total", domain)
    engine_port = targets.start_engine(sup, ENGINE_OUTPUT_TOKENS)
    plain = targets.start_baseline(sup, work, engine_port, settings.envoy_concurrency, floor=False)
    plain = replace(plain, name=PLAIN)
    limited, admin = start_limited_envoy(
        sup, work, engine_port, rls, domain, settings.envoy_concurrency
    )
    envoy: dict[tuple[int, str], Measurement] = {}
    for connections in (1, 32):
        workload = replace(
            chat(connections), headers=(("Content-Type", "application/json"), ("x-user", "bench"))
        )
        for target in (plain, limited):
            preflight(target.url, workload, "unused", target.name)
        envoy |= measure_envoy(wrk_bin, work, [plain, limited], workload, settings)
        _print_envoy(envoy, connections)
    stats = envoy_ratelimit_stats(admin)
    calls = int(rls.metric_sum("arks_ratelimit_hits_total", domain) - hits_before)
    measured = sum(m.load.requests for (_, name), m in envoy.items() if name == LIMITED)
    if (
        stats.get("error", 0)
        or stats.get("failure_mode_allowed", 0)
        or stats.get("ok", 0) < measured
    ):
        raise RateLimitBenchError(
            f"Envoy's rate-limit filter did not decide every request: {stats}"
        )
    if calls < measured:
        raise RateLimitBenchError(
            f"the rate-limit service counted {calls} hits for {measured} requests"
        )
    return Results(settings, closed, paced, envoy, calls, load_average, time.monotonic() - started)


# --------------------------------------------------------------------------- the report


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) else math.nan


def _f(value: float, fmt: str) -> str:
    return "n/a" if math.isnan(value) else fmt.format(value)


def budgets(r: Results) -> list[Budget]:
    s = r.settings
    return [
        Budget(
            f"rate-limit CPU/decision, ratelimit+redis ÷ empty call — direct gRPC, {s.in_flight} in flight",
            _ratio(r.closed[REDIS].cpu_us, r.closed[EMPTY].cpu_us),
            "x",
            1.3,
            True,
        ),
        Budget(
            f"rate-limit CPU/decision, ratelimit+redis ÷ empty call — direct gRPC, {s.rate}/s (same rate)",
            _ratio(r.paced[REDIS].cpu_us, r.paced[EMPTY].cpu_us),
            "x",
            1.3,
            True,
        ),
        Budget(
            f"rate-limit p99 at {s.rate} decisions/s, ratelimit+redis, client-measured",
            r.paced[REDIS].latency_ms(99),
            "ms",
            2.0,
            True,
        ),
    ]


CLOSED_HEADER = [
    "server",
    "decisions/s",
    "server CPU (cores busy)",
    "Python CPU µs/decision",
    "÷ empty call",
    "decisions/s per core",
    "Redis CPU µs/decision",
    "decisions",
]


def closed_rows(r: Results) -> list[list[str]]:
    empty = r.closed[EMPTY].cpu_us
    rows = []
    for label, d in r.closed.items():
        rows.append(
            [
                label,
                f"{d.rate:.0f}",
                f"{_ratio(d.cpu_s, d.wall_s):.2f}",
                f"{d.cpu_us:.0f}",
                f"{_ratio(d.cpu_us, empty):.2f}x",
                f"{_ratio(1e6, d.cpu_us):.0f}",
                _f(d.redis_us, "{:.0f}") if label == REDIS else "—",
                str(d.decisions),
            ]
        )
    return rows


PACED_HEADER = [
    "server",
    "achieved decisions/s",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "Python CPU µs/decision",
    "÷ empty call",
    "client send lag p99 ms",
    "decisions",
]


def paced_rows(r: Results) -> list[list[str]]:
    empty = r.paced[EMPTY].cpu_us
    return [
        [
            label,
            f"{d.rate:.0f}",
            f"{d.latency_ms(50):.3f}",
            f"{d.latency_ms(99):.3f}",
            f"{d.latency_ms(99.9):.3f}",
            f"{d.latency_ms(100):.3f}",
            f"{d.cpu_us:.0f}",
            f"{_ratio(d.cpu_us, empty):.2f}x",
            f"{d.lag_ms(99):.3f}",
            str(d.decisions),
        ]
        for label, d in r.paced.items()
    ]


ENVOY_HEADER = [
    "config",
    "p50 ms",
    "p99 ms",
    "+p50 vs Envoy",
    "+p99 vs Envoy",
    "req/s",
    "req/s ÷ Envoy",
    "ratelimit CPU µs/req",
    "Envoy CPU µs/req",
    "requests",
]


def envoy_rows(envoy: dict[tuple[int, str], Measurement], connections: int) -> list[list[str]]:
    base = envoy[(connections, PLAIN)]
    rows = []
    for name in (PLAIN, LIMITED):
        m = envoy[(connections, name)]
        added = (
            ["—", "—"]
            if name == PLAIN
            else [f"{m.p50 - base.p50:+.3f} ms", f"{m.p99 - base.p99:+.3f} ms"]
        )
        rows.append(
            [
                name,
                f"{m.p50:.3f}",
                f"{m.p99:.3f}",
                *added,
                f"{m.load.rps:.0f}",
                f"{_ratio(m.load.rps, base.load.rps):.2f}x",
                "—" if name == PLAIN else f"{m.python_us:.0f}",
                f"{m.envoy_us:.0f}",
                str(m.load.requests),
            ]
        )
    return rows


def _print_direct(closed: dict[str, Direct], paced: dict[str, Direct], settings: Settings) -> None:
    r = Results(settings, closed, paced, {}, 0, (0.0, 0.0, 0.0))
    print(f"\nrate-limit decisions, direct gRPC, {settings.in_flight} calls in flight")
    print(report.text_table(CLOSED_HEADER, closed_rows(r)))
    print(f"\nrate-limit decisions, direct gRPC, open loop at {settings.rate}/s")
    print(report.text_table(PACED_HEADER, paced_rows(r)) + "\n", flush=True)


def _print_envoy(envoy: dict[tuple[int, str], Measurement], connections: int) -> None:
    print(f"\nthrough Envoy, wrk concurrency {connections}")
    print(report.text_table(ENVOY_HEADER, envoy_rows(envoy, connections)) + "\n", flush=True)


def render_section(r: Results, command: str) -> str:
    s = r.settings
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in r.load_average)
    parts = [
        BEGIN,
        "## Rate-limit decisions: Redis, direct gRPC and through Envoy",
        "",
        f"- Date: {now}; this part took {r.elapsed_s:.0f} s",
        f"- Machine: {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}; "
        f"load average before the run: {load}",
        f"- Command: `{command}`",
        f"- Settings: direct gRPC: {s.warmup_s:g} s warm-up per server, then {s.duration_s:g} s closed loop "
        f"({s.in_flight} calls in flight on one channel) and {s.paced_s:g} s open loop ({s.rate} calls/s) per server, "
        f"each in {s.direct_rounds} interleaved round(s); one load-client process (`grpc.aio` on uvloop, requests "
        f"pre-serialized); every request is one descriptor `user: u<i % {USERS}>` under a limit of "
        f"{LIMIT_PER_MINUTE:,} per minute (never over: each decision counts and answers OK). Redis: `{s.redis_url}` "
        "(the machine's shared server). Through Envoy: wrk (1 thread) → Envoy `--concurrency "
        f"{s.envoy_concurrency}` → `launcher.sim` ({ENGINE_OUTPUT_TOKENS} output tokens), {s.warmup_s:g} s warm-up and "
        f"{s.duration_s:g} s measured per config and concurrency, in {s.rounds} interleaved round(s)."
        + (" **Quick smoke run: figures are not meaningful.**" if s.quick else ""),
        "",
        "### Budgets (DESIGN §6)",
        "",
        report.markdown_table(report.BUDGET_HEADER, [b.cells() for b in budgets(r)]),
        "",
        f"### Direct gRPC, closed loop ({s.in_flight} calls in flight)",
        "",
        report.markdown_table(CLOSED_HEADER, closed_rows(r)),
        "",
        f"### Direct gRPC, open loop at {s.rate} decisions/s",
        "",
        report.markdown_table(PACED_HEADER, paced_rows(r)),
        "",
    ]
    for connections in (1, 32):
        parts += [
            f"### Through Envoy, wrk concurrency {connections}",
            "",
            report.markdown_table(ENVOY_HEADER, envoy_rows(r.envoy, connections)),
            "",
        ]
    parts += [
        "### How to read this",
        "",
        "- **empty call** is `tests/bench/empty_unary.py`: `RateLimitService.ShouldRateLimit` on the same "
        "`grpc.aio` + uvloop setup as `ratelimit/server.py`, answering a constant OK: the floor of any Python "
        "decision. **ratelimit + memory / + redis** is `python -m ratelimit` with the counters in its memory or "
        "in Redis (one Lua script per decision). The budget compares ratelimit+redis with the empty call.",
        "- **Python CPU µs/decision** is the server process's user + system CPU (its CPU clock, all threads) over "
        "the measured window ÷ the decisions completed in it. **decisions/s per core** is its inverse. "
        "**server CPU (cores busy)** is that CPU ÷ wall time: below 1.0 the server was not the bottleneck "
        "(the load client, also Python, shares the 2 cores with it and with Redis).",
        "- CPU per call depends on the rate: a server that idles between calls pays more per call (event-loop "
        "and gRPC poller wake-ups), and a saturated one batches. The closed loop compares the servers each at "
        "its own maximum rate; the open loop compares them at the same rate, which is the fairer ratio.",
        "- **Redis CPU µs/decision** is the Redis server's CPU over the same window (context, not Python; the "
        "server is shared, so anything else using it lands here too).",
        "- Open-loop latencies are measured by the client from just before each call to its answer; the "
        "schedule does not wait for answers. **client send lag** is how late the client started calls against "
        "their schedule (its event loop's delay; uvloop's timers tick in whole milliseconds, so up to ~1 ms "
        "is the pacing itself): when it is much larger, the client, not the server, set the pace. The 2-core "
        "machine also runs the client and Redis, and whatever else is running lands in the tail: compare the "
        "ratelimit's p99 with the empty call's of the same run.",
        "- Through Envoy, **ratelimit CPU µs/req** is the Redis-backed service's CPU ÷ requests; the filter "
        "fails closed in this bench (`failure_mode_deny`), the run checks Envoy's `ratelimit.ok` counter and "
        "the service's hit counter against the requests, so every measured request was decided by the service.",
        "- **Against envoyproxy/ratelimit itself**: upstream publishes no per-decision figure (its Redis benchmark, `test/redis/bench_test.go`, is skipped and its README gives none), and it cannot be built here to run beside ours (no Go toolchain, and its modules come from the Go proxy, which this machine cannot reach). So the floor is the empty call in Python, not upstream's Go service.",
        "- **What the Redis path costs beyond memory** (the service run with parts stubbed out, 2026-12-06): awaiting the store's answer costs ~27 µs of CPU even when the reply is there at once (the suspended call, its future, the event loop's wake-up), real socket I/O ~13 µs more (one write and one read per decision); our Python around the decision runs 2-2.5x slower served than in the tight loop (`python -m tests.bench.ratelimit_hotpath`: ~16 µs on memory, ~33 µs on Redis). At 16 in flight the budget would need our Python at ~10 µs tight; what would reach it is the decision out of CPython, as for the gateway (README, Performance).",
        END,
    ]
    return "\n".join(parts)


def write_section(path: Path, section: str) -> None:
    """Put the section in `path`: replace the previous one if present, else append; keep the rest."""
    report.replace_section(path, BEGIN, END, section)


def existing_section(path: Path) -> str | None:
    """The rate-limit section already in `path`, to carry over when only the gateway part is rewritten."""
    return report.existing_section(path, BEGIN, END)


def run_section(*, quick: bool, command: str, settings: Settings | None = None) -> str:
    """Measure and render; what `tests.bench.gateway --only ratelimit|all` calls."""
    settings = settings or (Settings.smoke() if quick else Settings())
    results = run(settings)
    rows = [b.cells() for b in budgets(results)]
    print(
        report.text_table(
            report.BUDGET_HEADER, [[c.replace("**", "") for c in row] for row in rows]
        )
    )
    print(f"\n(rate-limit bench took {results.elapsed_s:.0f} s)", flush=True)
    return render_section(results, command)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        client_main(Path(argv[1]))
        return
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.ratelimit", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="put the markdown section in this file (replacing its previous one)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=Settings.duration_s,
        help="closed-loop and wrk seconds per config",
    )
    parser.add_argument(
        "--paced", type=float, default=Settings.paced_s, help="open-loop seconds per server"
    )
    parser.add_argument(
        "--rate", type=int, default=Settings.rate, help="open-loop decisions per second"
    )
    parser.add_argument(
        "--in-flight", type=int, default=Settings.in_flight, help="closed-loop calls in flight"
    )
    parser.add_argument(
        "--redis", default=DEFAULT_REDIS, help="Redis URL for the Redis-backed service"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 s per measurement, one round"
    )
    args = parser.parse_args(argv)
    settings = (
        Settings.smoke()
        if args.quick
        else Settings(
            duration_s=args.duration,
            paced_s=args.paced,
            rate=args.rate,
            in_flight=args.in_flight,
        )
    )
    settings = replace(settings, redis_url=args.redis)
    command = " ".join([".venv/bin/python", "-m", "tests.bench.ratelimit", *argv])
    try:
        section = run_section(quick=args.quick, command=command, settings=settings)
    except RuntimeError as err:
        sys.exit(f"rate-limit bench FAILED: {err}")
    if args.out is not None:
        write_section(args.out, section)
        print(f"wrote the rate-limit section of {args.out}")


if __name__ == "__main__":
    main()
