"""`arks up` as a user runs it: prints a working endpoint and token; Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from arks.prometheus_config import CONTROLLER_JOB, ENGINES_JOB, ENVOY_JOB, GATEWAY_JOB
from launcher.cli import DEMO_POLICY
from launcher.procs import free_port
from tests.support.prometheus import Prometheus
from tests.support.waiting import wait_for


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_arks_up(
    tmp_path: Path, port: int, *, demo: bool = True, extra: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    """`arks up` on the demo policy, moved to free ports so it never collides with `make run`;
    with `demo=False` its Secret is an ordinary one (a real tenant's token)."""
    documents = list(yaml.safe_load_all(DEMO_POLICY.read_text()))
    for doc in documents:
        if doc["kind"] == "Backend":
            doc["spec"]["endpoints"][0]["ip"]["port"] = free_port()
        if doc["kind"] == "Secret" and not demo:
            doc["metadata"].pop("annotations", None)
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump_all(documents))
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "up",
        "--policy",
        str(policy),
        "--port",
        str(port),
        "--admin-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        "--controller-metrics-port",
        str(free_port()),
        "--state-dir",
        str(tmp_path / "state"),
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_arks_up_serves_the_demo_policy_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc = start_arks_up(tmp_path, port)
    try:
        banner = []
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "arks up exited early:\n" + "".join(banner)
            banner.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(banner)
        endpoint = re.search(r"OpenAI endpoint\s+(\S+)", text)
        token = re.search(r"Demo token\s+(sk-arks-\S+)", text)
        assert endpoint and token, text
        assert endpoint.group(1) == f"http://127.0.0.1:{port}/v1"
        assert "curl " in text
        assert re.search(r"Controller\s+http://127\.0\.0\.1:\d+/metrics", text), text
        assert "`arks up --prometheus`" in text  # the hint: Prometheus is installed here

        client = openai.OpenAI(base_url=endpoint.group(1), api_key=token.group(1), max_retries=0)
        assert sorted(m.id for m in client.models.list()) == ["llama-8b", "qwen-7b"]
        answer = client.chat.completions.create(
            model="qwen-7b", messages=[{"role": "user", "content": "Hello!"}]
        )
        assert answer.choices[0].message.content
        children = descendants(proc.pid)
        assert len(children) >= 4  # two engines, extproc, envoy

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        wait_for(lambda: [pid for pid in children if alive(pid)], lambda left: not left, timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def interrupt(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C, as a user stops it; killed if it does not stop within 30 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def banner_of(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "arks up exited early:\n" + "".join(lines)
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            return "".join(lines)
    raise AssertionError("no banner within 60 s:\n" + "".join(lines))


def test_arks_up_never_prints_a_token_that_is_not_the_demos(tmp_path: Path) -> None:
    proc = start_arks_up(tmp_path, free_port(), demo=False)
    try:
        text = banner_of(proc)
        assert "sk-arks-demo-0123456789abcdef" not in text
        assert "Demo token" not in text and "Authorization: Bearer" not in text
        assert "arks token" in text  # says how to get one instead
    finally:
        interrupt(proc)


def test_arks_up_killed_hard_still_leaves_nothing_behind(tmp_path: Path) -> None:
    proc = start_arks_up(tmp_path, free_port())
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Ctrl-C stops everything" in line:
            break
    children = descendants(proc.pid)
    assert children
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: [pid for pid in children if alive(pid)], lambda left: not left, timeout=15)


def child_running(parent: int, module: str) -> int:
    """The pid of the descendant of `parent` running `python -m <module>`."""
    for pid in descendants(parent):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if module.encode() in argv and alive(pid):
            return pid
    raise AssertionError(f"no {module} under {parent}")


def test_a_killed_gateway_is_restarted_and_says_what_is_wrong_meanwhile(tmp_path: Path) -> None:
    port = free_port()
    proc = start_arks_up(tmp_path, port)
    try:
        text = banner_of(proc)
        token = re.search(r"Demo token\s+(sk-arks-\S+)", text)
        assert token, text
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=token.group(1), max_retries=0
        )
        hello = [{"role": "user", "content": "Hello!"}]
        assert client.chat.completions.create(model="qwen-7b", messages=hello).choices

        os.kill(child_running(proc.pid, "extproc"), signal.SIGKILL)
        with pytest.raises(openai.APIStatusError) as away:
            client.chat.completions.create(model="qwen-7b", messages=hello)
        assert away.value.status_code == 503
        assert away.value.code == "gateway_unavailable", away.value.response.text
        assert "unreachable" in away.value.message
        health = httpx.get(f"http://127.0.0.1:{port}/healthz")  # a load balancer's view
        assert health.status_code == 503, health.text
        assert health.json()["error"]["code"] == "gateway_unavailable"

        assert proc.stdout is not None
        console = []
        for line in proc.stdout:  # the supervisor says what happened, then restarts it
            console.append(line)
            if "extproc restarted" in line:
                break
        assert any("extproc exited with code -9" in line for line in console), console
        answer = wait_for(lambda: _status(client, hello), lambda status: status == 200, timeout=20)
        assert answer == 200
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").text == "ok\n"
    finally:
        interrupt(proc)


def _status(client: openai.OpenAI, messages: list[dict[str, str]]) -> int:
    try:
        client.chat.completions.create(model="qwen-7b", messages=messages)
    except openai.APIStatusError as err:
        return err.status_code
    except openai.APIConnectionError:
        return 0
    return 200


def test_arks_up_prometheus_scrapes_every_part_with_the_shipped_config(tmp_path: Path) -> None:
    """`arks up --prometheus`: a real Prometheus on the port asked, every part of the stack up
    as a target, one `arks_build_info` per service, Envoy's cluster stats with `namespace` and
    `model` from the cluster name, and the shipped rules (if any) loaded healthy."""
    prometheus_port = free_port()
    proc = start_arks_up(
        tmp_path, free_port(), extra=("--prometheus", "--prometheus-port", str(prometheus_port))
    )
    try:
        text = banner_of(proc)
        url = re.search(r"Prometheus\s+(http://\S+)", text)
        endpoint = re.search(r"OpenAI endpoint\s+(\S+)", text)
        token = re.search(r"Demo token\s+(sk-arks-\S+)", text)
        assert url and endpoint and token, text
        assert url.group(1) == f"http://127.0.0.1:{prometheus_port}"
        client = openai.OpenAI(base_url=endpoint.group(1), api_key=token.group(1), max_retries=0)
        hello = [{"role": "user", "content": "Hello!"}]
        assert client.chat.completions.create(model="qwen-7b", messages=hello).choices

        prom = Prometheus(url.group(1))
        targets = wait_for(
            prom.targets,
            lambda found: len(found) == 5 and all(t["health"] == "up" for t in found),
            timeout=30,
        )
        jobs = sorted(t["labels"]["job"] for t in targets)
        assert jobs == sorted([GATEWAY_JOB, CONTROLLER_JOB, ENVOY_JOB, ENGINES_JOB, ENGINES_JOB])

        build = prom.query("arks_build_info")
        assert sorted(labels["service"] for labels, _ in build) == ["controller", "extproc"]
        relabelled = wait_for(
            lambda: prom.query(
                'envoy_cluster_upstream_rq_total{namespace="default", model="qwen-7b"}'
            ),
            lambda found: bool(found) and found[0][1] >= 1,
            timeout=30,
        )
        assert relabelled[0][0]["envoy_cluster_name"] == "endpoint/default/qwen-7b"
        assert prom.query('arks_engine_waiting_requests{model="qwen-7b"}')  # the controller's
        # The engines' own series, labelled with their endpoint's namespace by the scrape config.
        assert prom.query('vllm:num_requests_waiting{namespace="default", model_name="qwen-7b"}')
        assert all(group_healthy(g) for g in prom.rule_groups())
    finally:
        interrupt(proc)


def group_healthy(group: dict[str, object]) -> bool:
    rules = group.get("rules")
    assert isinstance(rules, list)
    return all(rule.get("health") in ("ok", "unknown") for rule in rules)


def test_arks_up_prometheus_without_the_binary_says_how_to_install_it(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing on PATH: no prometheus
    cmd = [sys.executable, "-m", "launcher.cli", "up", "--prometheus", "--state-dir", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "apt-get install prometheus" in done.stderr
    assert not (tmp_path / "logs").exists()  # nothing was started
