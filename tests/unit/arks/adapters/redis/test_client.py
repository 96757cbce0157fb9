"""The Redis client's helpers that handle the password: read from a Secret file, never printed."""

from __future__ import annotations

from pathlib import Path

from arks.adapters.redis.client import read_password, where


def test_where_names_the_server_without_credentials() -> None:
    assert where("redis://:s3cret@redis.example:6380/2") == "redis.example:6380/2"
    assert where("redis://user:s3cret@redis.example/0") == "redis.example:6379/0"


def test_the_password_file_loses_only_its_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text("abc def\n")
    assert read_password(path) == "abc def"
    path.write_text("abc\r\n")
    assert read_password(path) == "abc"
    path.write_text(" abc ")
    assert read_password(path) == " abc "
