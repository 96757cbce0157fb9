"""Children of the Supervisor die with the process that started them (also by SIGKILL), and
are started without running Python between fork and exec (`launcher.launch`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from launcher.procs import Supervisor
from tests.support.paths import REPO


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as dead.
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_children_die_when_their_parent_is_killed(tmp_path: Path) -> None:
    parent = textwrap.dedent(f"""
        import sys, time
        from launcher.procs import Supervisor
        sup = Supervisor(log_dir=__import__("pathlib").Path({str(tmp_path)!r}))
        program = sup.start("sleeper", ["sleep", "60"])
        module = sup.python("server", "http.server", "--bind", "127.0.0.1", "0")
        print(program.popen.pid, module.popen.pid, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    time.sleep(0.5)  # both children are up (and asked for their death signal)
    assert all(alive(pid) for pid in pids)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)


def test_a_module_child_gets_its_arguments_and_a_program_its_own(tmp_path: Path) -> None:
    data = tmp_path / "in.json"
    data.write_text('{"b": 1, "a": [2]}')
    with Supervisor(log_dir=tmp_path / "logs") as sup:
        tool = sup.python("tool", "json.tool", "--sort-keys", "--compact", str(data))
        echo = sup.start("echo", ["echo", "one", "two"])
        assert tool.popen.wait(10) == 0 and echo.popen.wait(10) == 0
    assert json.loads((tmp_path / "logs" / "tool.log").read_text()) == {"a": [2], "b": 1}
    assert (tmp_path / "logs" / "echo.log").read_text() == "one two\n"


def test_the_launcher_gives_up_when_its_parent_is_already_gone() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "launcher.launch", "1", "echo", "hi"],
        capture_output=True,
        text=True,
        timeout=10,
        cwd=REPO,
    )
    assert (done.returncode, done.stdout) == (1, "")
