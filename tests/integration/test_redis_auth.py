"""Redis with AUTH as manifests/ runs it: redis-server started by the StatefulSet's own command
line (password from the Secret's env, read as a config line on stdin), the readiness probe, and
the rate-limit service and the gateway authenticating with the password file the Deployments
mount, or stopping with a clear message when the password is missing or wrong. The password
appears in no command line and no log."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from redis import Redis
from redis.exceptions import AuthenticationError, RedisError

from arks.adapters.redis.client import RedisAuthFailed, check_auth
from launcher.procs import Supervisor, free_port, wait_http
from tests.support.manifests import INSTALL, containers, one
from tests.support.paths import DEMO_POLICY

PASSWORD = secrets.token_hex(24)  # what the README's `openssl rand -hex 24` makes
REDIS = next(containers(one("StatefulSet", "arks-redis", INSTALL)))


class ManifestRedis:
    """redis-server started by the manifest's command, on a free port, its data in `tmp`."""

    def __init__(self, tmp: Path, password: str) -> None:
        self.port = free_port()
        config = one("ConfigMap", "arks-redis", INSTALL)["data"]["redis.conf"]
        config = config.replace("dir /data", f"dir {tmp}")
        # Later lines win: the test's port, and only loopback.
        conf = tmp / "redis.conf"
        conf.write_text(f"{config}port {self.port}\nbind 127.0.0.1\n")
        command = [*REDIS["command"], *REDIS.get("args", [])]
        assert command[:2] == ["sh", "-c"]
        script = command[2].replace("/etc/redis/redis.conf", str(conf))
        env = {"PATH": "/usr/bin:/bin", "REDISCLI_AUTH": password}
        self.proc = subprocess.Popen(
            ["sh", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                Redis(port=self.port, password=password, socket_timeout=0.5).ping()
                return
            except (OSError, RedisError) as err:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        "redis-server did not start from the manifest's command"
                    ) from err
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return out.decode(errors="replace")


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[ManifestRedis]:
    server = ManifestRedis(tmp_path, PASSWORD)
    yield server
    assert PASSWORD not in server.stop()  # Redis's own log


def test_redis_as_the_manifest_starts_it_refuses_clients_without_the_password(
    redis: ManifestRedis,
) -> None:
    with pytest.raises(AuthenticationError):
        Redis(port=redis.port).ping()
    with pytest.raises(AuthenticationError):
        Redis(port=redis.port, password="not-" + PASSWORD).ping()
    assert Redis(port=redis.port, password=PASSWORD).ping()


def test_redis_takes_the_manifests_memory_ceiling(redis: ManifestRedis) -> None:
    """Its redis.conf parses and sets maxmemory (noeviction alone sets no ceiling)."""
    client = Redis(port=redis.port, password=PASSWORD)
    assert int(client.config_get("maxmemory")["maxmemory"]) == 512 * 2**20
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


def test_the_password_is_on_no_command_line(redis: ManifestRedis) -> None:
    """`exec` makes redis-server the container's process (PID 1 there), and its argv, which
    `ps` shows to everyone on the node, holds no password."""
    cmdline = Path(f"/proc/{redis.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert cmdline.startswith("redis-server ")
    assert PASSWORD not in cmdline


def test_the_readiness_probe_authenticates_from_its_environment(redis: ManifestRedis) -> None:
    program, *args = REDIS["readinessProbe"]["exec"]["command"]
    probe = [program, "-p", str(redis.port), *args]  # the test's port; the pod's is the default
    ok = subprocess.run(probe, env={"REDISCLI_AUTH": PASSWORD}, capture_output=True, text=True)
    assert ok.stdout.strip() == "PONG"
    assert ok.returncode == 0
    # The kubelet reads only the exit status: an error reply (NOAUTH here, LOADING while the
    # append-only file replays) must fail the probe, which plain `redis-cli ping` does not.
    refused = subprocess.run(probe, env={}, capture_output=True, text=True)
    assert "NOAUTH" in refused.stdout + refused.stderr
    assert refused.returncode != 0


# --- the clients ------------------------------------------------------------------------------

CONFIG = """
domain: auth-test
descriptors:
  - key: namespace
    rate_limit: {unit: minute, requests_per_unit: 10}
"""


def _password_file(tmp: Path, password: str) -> Path:
    path = tmp / "secret" / "password"
    path.parent.mkdir(exist_ok=True)
    path.write_text(password + "\n")  # as `echo` or an editor leaves it
    return path


def _ratelimit_args(tmp: Path, redis: ManifestRedis, port: int, metrics: int) -> list[str]:
    config = tmp / "ratelimit.yaml"
    config.write_text(CONFIG)
    return [
        "--config", str(config),
        "--redis", redis.url,
        "--grpc-address", f"127.0.0.1:{port}",
        "--metrics-port", str(metrics),
        # its HTTP and debug ports off upstream's defaults (8080, 6070)
        "--port", str(free_port()), "--debug-port", str(free_port()),
    ]  # fmt: skip


def test_ratelimit_counts_in_redis_with_the_password_file(
    redis: ManifestRedis, tmp_path: Path
) -> None:
    port, metrics = free_port(), free_port()
    args = _ratelimit_args(tmp_path, redis, port, metrics)
    password_file = _password_file(tmp_path, PASSWORD)
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        child = sup.python(
            "ratelimit", "ratelimit", *args, "--redis-password-file", str(password_file)
        )
        wait_http(child, f"http://127.0.0.1:{metrics}/metrics")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = rls_pb2.RateLimitRequest(
                domain="auth-test",
                descriptors=[
                    common.RateLimitDescriptor(
                        entries=[common.RateLimitDescriptor.Entry(key="namespace", value="a")]
                    )
                ],
                hits_addend=1,
            )
            answer = rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(request, timeout=5)
        assert answer.statuses[0].limit_remaining == 9
        log = child.log_tail(200)
    # The count is in Redis: the service authenticated for real.
    keys = Redis(port=redis.port, password=PASSWORD).keys("arks:rl:*")
    assert keys
    assert PASSWORD not in log


def _exits(sup: Supervisor, name: str, module: str, args: list[str]) -> tuple[int, str]:
    child = sup.python(name, module, *args)
    deadline = time.monotonic() + 30
    while child.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not child.alive(), f"{module} kept running without Redis's password"
    code = child.popen.returncode
    return code, child.log_tail(50)


@pytest.mark.parametrize("password", [None, "wrong"])
def test_ratelimit_stops_clearly_without_the_right_password(
    redis: ManifestRedis, tmp_path: Path, password: str | None
) -> None:
    args = _ratelimit_args(tmp_path, redis, free_port(), free_port())
    if password is not None:
        args += ["--redis-password-file", str(_password_file(tmp_path, password))]
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        code, log = _exits(sup, "ratelimit", "ratelimit", args)
    assert code != 0
    expected = "no password given" if password is None else "wrong password"
    assert f"refused to authenticate ({expected})" in log, log
    assert f"127.0.0.1:{redis.port}/0" in log
    assert PASSWORD not in log and (
        password is None or password not in log.replace("wrong password", "")
    )


@pytest.mark.parametrize("password", [None, "wrong"])
async def test_a_cluster_url_without_the_right_password_is_refused_at_start(
    redis: ManifestRedis, password: str | None
) -> None:
    """A cluster's client reports the refused AUTH inside a RedisClusterException (here the one
    node it was given; no cluster needed to be refused): still a setting to fix, not an outage."""
    url = f"redis+cluster://127.0.0.1:{redis.port}"
    expected = "no password given" if password is None else "wrong password"
    with pytest.raises(RedisAuthFailed, match=f"refused to authenticate \\({expected}\\)"):
        await check_auth(url, password, timeout_s=2.0)
    await check_auth(url, PASSWORD, timeout_s=2.0)  # accepted (not a cluster: unreachable)


def _extproc_args(redis: ManifestRedis) -> list[str]:
    return [
        "--policy", str(DEMO_POLICY),
        "--redis", redis.url,
        "--grpc-address", f"127.0.0.1:{free_port()}",
        "--metrics-port", str(free_port()),
    ]  # fmt: skip


def test_the_gateway_starts_with_the_password_and_stops_clearly_without(
    redis: ManifestRedis, tmp_path: Path
) -> None:
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        code, log = _exits(sup, "extproc-no-password", "extproc", _extproc_args(redis))
        assert code != 0 and "refused to authenticate (no password given)" in log, log
        args = _extproc_args(redis)
        metrics = args[args.index("--metrics-port") + 1]
        password_file = _password_file(tmp_path, PASSWORD)
        child = sup.python("extproc", "extproc", *args, "--redis-password-file", str(password_file))
        wait_http(child, f"http://127.0.0.1:{metrics}/metrics")
        assert child.alive()
        assert PASSWORD not in child.log_tail(200)


def test_a_missing_password_file_is_named(redis: ManifestRedis, tmp_path: Path) -> None:
    args = [*_extproc_args(redis), "--redis-password-file", str(tmp_path / "nope")]
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        code, log = _exits(sup, "extproc", "extproc", args)
    assert code != 0 and "--redis-password-file" in log and "nope" in log, log
