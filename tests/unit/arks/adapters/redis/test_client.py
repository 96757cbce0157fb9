"""The Redis client's helpers: where Redis is (one server, a cluster, sentinels) from its URL, and
the password, read from a Secret file and never printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from arks.adapters.redis.client import Target, read_password, target, where


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


def test_where_hides_the_credentials_of_a_cluster_or_sentinel_url() -> None:
    assert where("redis+cluster://:pw@a:7000,b:7001") == "redis+cluster://a:7000,b:7001"
    assert where("rediss+sentinel://u:pw@s1:26379/main") == "rediss+sentinel://s1:26379/main"
    assert where("redis://[::1") == "(an unreadable Redis URL)"
    assert where("unix://:pw@/run/redis.sock") == "unix:///run/redis.sock"
    assert "pw" not in repr(target("redis+cluster://u:pw@a:7000"))
    assert "pw" not in repr(target("redis://:pw@a:7000"))


def test_a_single_server_url_is_kept_as_redis_py_reads_it() -> None:
    for url in ("redis://h:6380/2", "rediss://h", "unix:///run/redis.sock"):
        assert target(url) == Target("single", url)


def test_a_cluster_is_its_nodes() -> None:
    found = target("rediss+cluster://user:pw@a:7000,[::1]:7001")
    assert found.kind == "cluster" and found.tls
    assert found.nodes == (("a", 7000), ("::1", 7001))
    assert (found.username, found.password) == ("user", "pw")
    assert target("redis+cluster://:pw@a:7000").password == "pw"
    assert target("redis+cluster://pw@a:7000").password == "pw"


def test_credentials_are_percent_decoded_with_or_without_a_user() -> None:
    assert target("redis+cluster://u%3Ax:p%40w@a:7000")[-2:] == ("u:x", "p@w")
    assert target("redis+cluster://p%40w@a:7000").password == "p@w"
    assert target("redis+sentinel://p%2Fw@s:26379/m").password == "p/w"


def test_sentinels_name_their_master_and_maybe_a_database() -> None:
    found = target("redis+sentinel://s1:26379,s2:26380/mymaster/3")
    assert (found.kind, found.master, found.db, found.tls) == ("sentinel", "mymaster", 3, False)
    assert found.nodes == (("s1", 26379), ("s2", 26380))
    assert target("redis+sentinel://s1:26379/mymaster").db == 0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("localhost:6379", "has a scheme"),
        ("redis+cluster://", "names no host:port"),
        ("redis+cluster://a", "is not host:port"),
        ("redis+cluster://a:x", "is not host:port"),
        ("redis+cluster://a:7000/1", "one database"),
        ("redis+sentinel://s:26379", "name the master"),
        ("redis+sentinel://s:26379/m/x", "name the master"),
        ("redis+sentinel://s:26379/m/1/2", "name the master"),
    ],
)
def test_a_url_that_cannot_work_says_why(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        target(url)
