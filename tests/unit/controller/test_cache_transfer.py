"""The cache pods' copy, for real: a source server on a free loopback port, copies into temp
directories, the free-disk check, the marker discipline and path safety."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
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
