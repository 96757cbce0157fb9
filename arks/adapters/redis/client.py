"""What every Redis store of the rate-limit package shares: how to connect (one server, a Redis
Cluster, or a master found through Redis Sentinel), how to run a Lua script in one round trip,
and what counts as the store being unavailable.

Where Redis is, as one URL:
  redis://host:port/db, rediss://..., unix:///path    one server (redis-py's URL forms)
  redis+cluster://host:port,host:port                  a Redis Cluster, from any of its nodes
  redis+sentinel://host:port,host:port/master[/db]     the master Sentinel names `master`
(`rediss+cluster`, `rediss+sentinel`: the same over TLS.) A cluster's client follows MOVED and
ASK and finds a promoted replica by itself; a sentinel-found master is looked up again when its
connection breaks, so a failover is ridden out like a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from arks.limits.model import BackendUnavailable

if TYPE_CHECKING:
    from arks.adapters.redis.resp import Pipelined


class Script(NamedTuple):
    text: str
    sha: str

    @classmethod
    def of(cls, text: str) -> Script:
        return cls(text, hashlib.sha1(text.encode()).hexdigest())


class RedisAuthFailed(Exception):
    """Redis refused the password (or asked for one we do not have): a setting to fix, not an
    outage to ride out, so the services stop instead of failing open or closed for ever."""


Kind = Literal["single", "cluster", "sentinel"]

_KINDS: dict[str, tuple[Kind, bool]] = {
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}


class Target(NamedTuple):
    """Where Redis is: `url` as given; for a cluster or sentinels, their nodes parsed."""

    kind: Kind
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""  # the name Sentinel knows the master by
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # never the credentials
        return f"Target({self.kind}, {where(self.url)})"


def target(url: str) -> Target:
    """`url` parsed (the forms in the module's docstring); ValueError says what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"a Redis URL has a scheme (redis://host:port): {where(url)!r}")
    if scheme not in _KINDS:
        return Target("single", url)
    kind, tls = _KINDS[scheme]
    userinfo, at, hosts = rest.rpartition("@")
    if not at:
        hosts = rest
    hosts, _, path = hosts.partition("/")
    username, password = None, None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username, password = (
            (unquote(user) or None, unquote(secret)) if colon else (None, unquote(user))
        )
    nodes = tuple(_node(text, scheme) for text in hosts.split(",") if text)
    if not nodes:
        raise ValueError(f"{scheme}:// names no host:port")
    parts = [p for p in path.split("/") if p]
    if kind == "cluster":
        if parts:
            raise ValueError("a Redis Cluster has one database: no path after its nodes")
        return Target(kind, url, nodes, tls=tls, username=username, password=password)
    if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"{scheme}://host:port,.../master[/db]: name the master Sentinel watches")
    db = int(parts[1]) if len(parts) == 2 else 0
    return Target(kind, url, nodes, parts[0], db, tls, username, password)


def _node(text: str, scheme: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError(f"{scheme}://: {text!r} is not host:port")
    return host.strip("[]"), int(port)


class Tls(NamedTuple):
    """TLS to Redis beyond the scheme's defaults (`rediss://`: the system's CAs, host checked)."""

    ca_file: str | None = None  # the CA bundle to trust instead of the system's
    cert_file: str | None = None  # a client certificate (mutual TLS) and its key
    key_file: str | None = None
    check_hostname: bool = True


def connect(
    url: str,
    timeout_s: float,
    max_connections: int,
    password: str | None = None,
    *,
    username: str | None = None,
    sentinel_username: str | None = None,
    sentinel_password: str | None = None,
    tls: Tls | None = None,
) -> Redis:
    """A client for `url` (one server, a cluster or a sentinel-found master); `password` (AUTH)
    unless the URL carries one; `sentinel_username` and `sentinel_password` the sentinels' own.
    A cluster's client is typed as `Redis`: the commands the stores send are the same, and a
    cluster refuses (RedisClusterException) a script whose keys are not in one slot."""
    where_ = target(url)
    # One immediate retry on a dropped connection (e.g. a pooled one Redis closed while
    # restarting): the command almost surely never ran. Never on timeouts: the script may have
    # run, and a retry would charge twice.
    once = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "username": where_.username or username,
        "password": where_.password or password,
    }
    secure: dict[str, Any] = {}
    if tls is not None:
        secure = {
            "ssl_ca_certs": tls.ca_file,
            "ssl_certfile": tls.cert_file,
            "ssl_keyfile": tls.key_file,
            # Off: the chain is still verified, only the name not (as upstream's
            # REDIS_TLS_SKIP_HOSTNAME_VERIFICATION).
            "ssl_check_hostname": tls.check_hostname,
        }
    if where_.kind == "cluster":
        cluster = _Cluster(
            startup_nodes=[ClusterNode(host, port) for host, port in where_.nodes],
            max_connections=max_connections,
            ssl=where_.tls,
            # Redirections and a topology that changed are followed; a timed-out script is not
            # sent again (see `once`).
            retry=Retry(NoBackoff(), 2),
            **common,
            **(secure if where_.tls else {}),
        )
        return cluster  # type: ignore[return-value]
    if where_.kind == "sentinel":
        sentinel = Sentinel(
            list(where_.nodes),
            # The sentinels' own credentials: REDIS_SENTINEL_AUTH upstream; none by default.
            sentinel_kwargs={
                "socket_timeout": timeout_s,
                "socket_connect_timeout": timeout_s,
                "username": sentinel_username,
                "password": sentinel_password,
                **({"ssl": True, **secure} if where_.tls else {}),
            },
            ssl=where_.tls,
            db=where_.db,
            retry=once,
            max_connections=max_connections,
            **common,
            **(secure if where_.tls else {}),
        )
        master: Redis = sentinel.master_for(
            where_.master,
            redis_class=_SentinelMaster,
            connection_pool_class=_SentinelPool,
            timeout=timeout_s,  # the wait for a free connection, as one server's pool
        )
        return master
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        retry=once,
        **{k: v for k, v in common.items() if v is not None},
        **(secure if url.startswith("rediss://") else {}),
    )
    return Redis.from_pool(pool)


class _Cluster(RedisCluster):
    """A cluster client that does not send a command again after a timeout (redis-py retries
    on it): the script may have run, and a retry would charge twice. A refused connection, a
    cluster still electing, a slot not covered yet: retried, with the topology read again."""

    ERRORS_ALLOW_RETRY = (  # type: ignore[assignment]
        RedisConnectionError,
        ClusterDownError,
        SlotNotCoveredError,
    )

    def __init__(self, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(max_connections=max_connections, **kwargs)
        # redis-py's cluster client refuses a command at once (MaxConnectionsError) when a
        # node's connections are all in use, where one server's pool waits for one. Calls wait
        # their turn here instead (within their caller's timeout): a command or a pipeline
        # holds at most one connection per node at a time, so no node runs out.
        self._turns = asyncio.Semaphore(max_connections)

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if _IN_TURN.get() is self:  # a command a pipeline (or a command) sends for itself
            yield
            return
        async with self._turns:
            held = _IN_TURN.set(self)
            try:
                yield
            finally:
                _IN_TURN.reset(held)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turn():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]


class _ClusterPipeline(ClusterPipeline):
    """A pipeline that waits its turn for connections (see _Cluster)."""

    def __init__(self, client: _Cluster, transaction: bool | None = None) -> None:
        super().__init__(client, transaction)
        self._client = client

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        async with self._client.turn():
            return await super().execute(raise_on_error, allow_redirections)


_IN_TURN: ContextVar[_Cluster | None] = ContextVar("arks_redis_in_turn", default=None)


class _SentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A sentinel-found master's pool that waits for a free connection as one server's does
    (redis-py's refuses a command at once, MaxConnectionsError, when all are in use)."""


class _SentinelMaster(Redis):
    """A sentinel-found master's client that closes its connections to the sentinels with its
    own: redis-py leaves them to the Sentinel object, which only the master's pool holds."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            pool = self.connection_pool
            if isinstance(pool, SentinelConnectionPool):
                await pool.sentinel_manager.aclose()


def read_password(path: Path) -> str:
    """The password in `path` (a mounted Secret key), without the trailing newline an editor or
    `echo` leaves."""
    return path.read_text().rstrip("\r\n")


def where(url: str) -> str:
    """Where a Redis URL points, for messages: never the credentials it may hold."""
    scheme, _, rest = url.partition("://")
    if scheme in _KINDS:
        return f"{scheme}://{rest.rpartition('@')[2]}"
    if scheme == "unix":
        return f"unix://{urlsplit(url).path}"
    try:
        parsed = urlsplit(url)
        return f"{parsed.hostname}:{parsed.port or 6379}{parsed.path}"
    except ValueError:
        return "(an unreadable Redis URL)"


def startup_failure(err: BaseException, password_file: Path | None) -> str | None:
    """Why a service cannot start on its Redis credentials, in one line for its exit (never the
    password): refused by Redis, or a password file it cannot read; None for another error."""
    if isinstance(err, RedisAuthFailed):
        return f"{err} (see --redis-password-file)"
    if isinstance(err, OSError) and password_file and err.filename == str(password_file):
        return f"--redis-password-file: {err}"
    return None


async def check_auth(url: str, password: str | None, timeout_s: float, **options: Any) -> None:
    """Raise RedisAuthFailed when Redis at `url` refuses these credentials (`options`: the rest
    of `connect`'s). An unreachable Redis passes: the stores' availability policies (fail open
    / closed) handle outages."""
    redis = connect(url, timeout_s, max_connections=1, password=password, **options)
    try:
        async with asyncio.timeout(timeout_s):
            await redis.ping()
    except (RedisError, RedisClusterException, OSError, TimeoutError) as e:
        refusal = _refusal(e)
        if refusal is not None:
            detail = "no password given" if password is None else "wrong password"
            raise RedisAuthFailed(
                f"redis {where(url)} refused to authenticate ({detail}): {refusal}"
            ) from e
    finally:
        await redis.aclose()


def _refusal(err: BaseException) -> AuthenticationError | None:
    """The AuthenticationError behind `err`: a cluster's client reports a refused AUTH on every
    node it tried as a RedisClusterException caused by it."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, AuthenticationError):
            return seen
        seen = seen.__cause__
    return None


async def ping(redis: Redis) -> None:
    """PING the server; on a cluster every master, so a master down (until its replica takes
    over) is a store that cannot answer for some of its keys."""
    if isinstance(redis, RedisCluster):
        await redis.ping(target_nodes=RedisCluster.PRIMARIES)
    else:
        await redis.ping()


async def mget(redis: Redis, keys: Sequence[str]) -> list[Any]:
    """GET of each key in one round trip; on a cluster one per master, the keys in many slots."""
    if isinstance(redis, RedisCluster):
        return await redis.mget_nonatomic(keys)
    return await redis.mget(keys)


async def run(
    redis: Redis,
    script: Script,
    keys: Sequence[str],
    args: Sequence[str | int],
    *,
    fast: Pipelined | None = None,
) -> Any:
    """`script` in one round trip: over `fast` (the pipelined client) when there is one."""
    if fast is not None:
        return await fast.script(script.text, script.sha, keys, args)
    try:
        return await redis.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        # First call against this server (or it restarted): EVAL also caches the script.
        return await redis.eval(script.text, len(keys), *keys, *args)


async def run_many(
    redis: Redis, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[str | int]]]
) -> list[Any]:
    """The script once per (keys, args), pipelined: one round trip. A server that does not have
    the script yet is given it, and the calls are sent again (a script that must count once,
    as the budgets' do, remembers what it applied)."""
    for attempt in (1, 2):
        async with redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
        missing = any(isinstance(reply, NoScriptError) for reply in replies)
        if not missing or attempt == 2:
            break
        await redis.script_load(script.text)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return list(replies)


@asynccontextmanager
async def answer_within(timeout_s: float, what: str) -> AsyncIterator[None]:
    """Bound the block by the timeout; any failure to get an answer is unavailability."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except (RedisError, RedisClusterException, OSError, TimeoutError) as e:
        detail = str(e) or f"no answer within {timeout_s} s"
        raise BackendUnavailable(f"redis {what}: {type(e).__name__}: {detail}") from e
