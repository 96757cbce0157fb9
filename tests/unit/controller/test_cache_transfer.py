"""The cache pods' copy, for real: a source server on a free loopback port, copies into temp
directories, the free-disk check, the marker discipline and path safety."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from controller.cache_transfer import (
    EXIT_NO_SPACE,
    EXIT_SOURCE,
    MARKER,
    TransferError,
    fetch,
    free_bytes,
    main,
    make_server,
)


@pytest.fixture
def claim(tmp_path: Path) -> Path:
    root = tmp_path / "claim"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "model-00001.safetensors").write_bytes(b"w" * 300_000)
    (root / MARKER).write_text("src1\n")
    return root


@pytest.fixture
def source(claim: Path) -> Iterator[str]:
    server = make_server(claim, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_copy_holds_every_file_and_the_marker_and_is_readable_by_anyone(
    source: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    said = fetch(source, cache, "m", "id-1", require_marker=True)
    assert "cached" in said
    copy = cache / "m"
    assert (copy / "config.json").read_text() == '{"a": 1}'
    assert (copy / "sub" / "model-00001.safetensors").stat().st_size == 300_000
    assert (copy / MARKER).read_text() == "id-1\n", "the marker holds the cache's source id"
    assert (copy / "config.json").stat().st_mode & 0o777 == 0o644
    assert not (cache / ".m.partial").exists()
    assert "already holds" in fetch(source, cache, "m", "id-1")
    assert "cached" in fetch(source, cache, "m", "id-2"), "another source is copied again"
    assert (copy / MARKER).read_text() == "id-2\n"


def test_a_claim_without_its_marker_is_not_copied(source: str, claim: Path, tmp_path: Path) -> None:
    (claim / MARKER).unlink()
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(TransferError, match="no complete model") as e:
        fetch(source, cache, "m", "id-1", require_marker=True)
    assert e.value.code == EXIT_SOURCE
    assert not (cache / "m").exists()
    assert "cached" in fetch(source, cache, "m", "id-1"), "an adopted claim has no marker"


def test_a_node_without_room_for_the_model_fails_clearly_and_writes_nothing(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    reserve = free_bytes(cache)  # keep all the free space free: the model cannot fit
    code = main(
        [
            "fetch",
            "--source",
            source,
            "--root",
            str(cache),
            "--name",
            "m",
            "--id",
            "id-1",
            "--reserve-bytes",
            str(reserve),
        ]
    )
    assert code == EXIT_NO_SPACE
    err = capsys.readouterr().err
    assert "not enough disk" in err and "needs 300008 bytes" in err
    assert list(cache.iterdir()) == []


def test_the_source_serves_only_files_inside_its_root(
    source: str, claim: Path, tmp_path: Path
) -> None:
    (tmp_path / "secret").write_text("no")
    (claim / "link").symlink_to(tmp_path / "secret")
    for path in ("/files/../secret", "/files/%2e%2e/secret", "/files/link", "/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(source + path)
        assert e.value.code == 404, path
    with urllib.request.urlopen(source + "/index") as response:
        listed = response.read().decode()
    assert "link" not in listed and "secret" not in listed


@pytest.mark.parametrize("path", ["../other/config.json", "{tmp}/cache/other/x", "a//b", "./x"])
def test_a_source_listing_a_path_outside_the_model_writes_nothing(
    path: str, tmp_path: Path
) -> None:
    # Any pod of the tenant's namespace with the source's labels answers through its Service.
    path = path.format(tmp=tmp_path)  # an absolute path, inside the test's own directory

    class Hostile(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"files": [{"path": path, "size": 1}]}).encode()
            if self.path != "/index":
                body = b"x"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    cache = tmp_path / "cache"
    (cache / "other").mkdir(parents=True)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(TransferError, match="outside the model"):
            fetch(url, cache, "m", "id-1")
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(p.name for p in cache.rglob("*")) == ["other"]


def test_an_unreachable_source_fails_without_a_copy(tmp_path: Path) -> None:
    server = make_server(tmp_path, "127.0.0.1", 0)
    port = server.server_address[1]
    server.server_close()  # nothing listens there now
    with pytest.raises(TransferError, match="cannot read"):
        fetch(f"http://127.0.0.1:{port}", tmp_path, "m", "id", timeout_s=2)
    assert not (tmp_path / "m").exists()


def test_remove_deletes_the_copy_and_a_partial_one(tmp_path: Path) -> None:
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / ".m.partial").mkdir()
    (tmp_path / "other").mkdir()
    assert main(["remove", "--root", str(tmp_path), "--name", "m"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_the_rendered_cache_pods_copy_serve_probe_and_clean_up_for_real(tmp_path: Path) -> None:
    """The commands the renderer puts in the source pod, the cache DaemonSet and the cleanup
    DaemonSet, run as processes (paths and the Service address swapped for local ones)."""
    import subprocess
    import sys
    import time

    from controller.render.model_cache import (
        render_cache_daemonset,
        render_cache_source,
        render_cleanup_daemonset,
    )
    from launcher.procs import free_port
    from tests.unit.controller.render.test_render_model import make_model

    model = make_model("huggingface", cache=True)
    claim, cache = tmp_path / "claim", tmp_path / "cache"
    claim.mkdir()
    cache.mkdir()
    (claim / "weights.bin").write_bytes(b"x" * 4096)
    (claim / MARKER).write_text("whatever\n")
    port = free_port()

    def local(argv: list[str]) -> list[str]:
        swapped = [
            a.replace("/models", str(claim))
            .replace("/cache", str(cache))
            .replace("8080", str(port))
            for a in argv
        ]
        swapped = [f"http://127.0.0.1:{port}" if a.startswith("http://") else a for a in swapped]
        return [sys.executable if a == "python" else a for a in swapped]

    (serve,) = render_cache_source(model)[0]["spec"]["template"]["spec"]["containers"]
    server = subprocess.Popen(local(serve["command"]), stderr=subprocess.DEVNULL)
    try:
        ds = render_cache_daemonset(model)
        assert ds is not None
        pod = ds["spec"]["template"]["spec"]
        copy_ = next(c for c in pod["initContainers"] if c["name"] == "copy")
        argv = local(copy_["command"])
        argv[argv.index("--reserve-bytes") + 1] = "0"
        for _ in range(50):  # the server may not listen yet: the pod would be restarted
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            if done.returncode == 0:
                break
            time.sleep(0.1)
        assert done.returncode == 0, done.stderr
        name = model["metadata"]["name"]
        assert (cache / name / "weights.bin").stat().st_size == 4096
        probe = pod["containers"][0]["readinessProbe"]["exec"]["command"]
        assert subprocess.run(local(probe), check=False).returncode == 0, "Ready once copied"
    finally:
        server.terminate()
        server.wait(timeout=10)

    cleanup = render_cleanup_daemonset(model, "/cache", {})
    (remove,) = cleanup["spec"]["template"]["spec"]["initContainers"]
    assert subprocess.run(local(remove["command"]), check=False).returncode == 0
    assert not (cache / name).exists()
    assert subprocess.run(local(probe), check=False).returncode != 0
