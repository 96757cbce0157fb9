"""Throwaway Redis Cluster and Sentinel deployments for tests: real `redis-server` processes on
free 127.0.0.1 ports (a cluster made by `redis-cli --cluster create`, sentinels run by
`redis-server --sentinel`, the binary Debian's redis-sentinel package links to), killed and
cleaned up by the test."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (held together while chosen, so none is chosen twice)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def command(port: int, *args: str, timeout_s: float = 2.0) -> str:
    """`redis-cli -p port args...`'s output ("" when the server does not answer)."""
    try:
        done = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def wait_for(what: str, check: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Node:
    """One redis-server (a cluster node, a replica or a sentinel) and its directory."""

    def __init__(
        self, root: Path, *extra: str, sentinel_conf: str | None = None, cluster: bool = False
    ) -> None:
        self.port, self.bus_port = free_ports(2)
        self.dir = root / str(self.port)
        self.dir.mkdir(parents=True)
        self.extra = extra
        if cluster:  # the cluster bus on a port of its own (by default port + 10000)
            self.extra += ("--cluster-enabled", "yes", "--cluster-port", str(self.bus_port))
            self.extra += ("--cluster-config-file", str(self.dir / "nodes.conf"))
        self.sentinel_conf = sentinel_conf
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Started and answering PING; a port another process took meanwhile fails loudly."""
        if self.sentinel_conf is not None:
            conf = self.dir / "sentinel.conf"
            if not conf.exists():  # a restarted sentinel keeps what it learnt
                conf.write_text(f"port {self.port}\nbind 127.0.0.1\n{self.sentinel_conf}")
            args = ["redis-server", str(conf), "--sentinel"]
        else:
            args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
            args += ["--save", "", "--appendonly", "no", "--dir", str(self.dir), *self.extra]
            # A replica's first sync at once (Redis 7 waits 5 s for more replicas to join it).
            args += ["--repl-diskless-sync-delay", "0"]
        log = (self.dir / "log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        log.close()
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'log').read_text()[-500:]}")
            return command(self.port, "PING") == "PONG"

        wait_for(f"redis-server on {self.port}", up, 10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class Cluster:
    """`masters` masters with `replicas` replicas each, slots spread by `redis-cli`; a node's
    failure is noticed within `node_timeout_ms` and its replica promoted."""

    def __init__(
        self, root: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000
    ) -> None:
        self.nodes: list[Node] = []
        for _ in range(masters * (1 + replicas)):
            timeout = ("--cluster-node-timeout", str(node_timeout_ms))
            # A replica may take over however long ago it last heard from its master.
            validity = ("--cluster-replica-validity-factor", "0")
            self.nodes.append(Node(root, *timeout, *validity, cluster=True))
        self.replicas = replicas

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        replicas = ("--cluster-replicas", str(self.replicas), "--cluster-yes")
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(n.address for n in self.nodes), *replicas],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}")
        self.wait_ok()

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Every live node sees the cluster whole, with every slot served, and every replica
        has its master's data."""

        def ok() -> bool:
            for node in self.live():
                info = command(node.port, "CLUSTER", "INFO")
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    return False
                role = command(node.port, "INFO", "replication")
                if "role:slave" in role and "master_link_status:up" not in role:
                    return False
            return True

        wait_for("the cluster to be ok", ok, timeout_s)

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None]

    def masters(self) -> list[Node]:
        return [n for n in self.live() if "role:master" in command(n.port, "INFO", "replication")]

    @property
    def urls(self) -> str:
        """The nodes as envoyproxy/ratelimit's REDIS_URL lists them for REDIS_TYPE=cluster."""
        return ",".join(n.address for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


class Sentinels:
    """One master, one replica, and `count` sentinels watching them as `name` (quorum: a
    majority); a dead master is replaced within about a second."""

    def __init__(self, root: Path, name: str = "arks", count: int = 3) -> None:
        self.name = name
        self.master = Node(root)
        self.replica = Node(root)
        quorum = count // 2 + 1
        conf = (
            f"sentinel monitor {name} 127.0.0.1 {self.master.port} {quorum}\n"
            f"sentinel down-after-milliseconds {name} 500\n"
            f"sentinel failover-timeout {name} 2000\n"
            f"sentinel parallel-syncs {name} 1\n"
            # Told of the replica up front: found otherwise by the master's INFO, every 10 s.
            f"sentinel known-replica {name} 127.0.0.1 {self.replica.port}\n"
        )
        self.sentinels = [Node(root, sentinel_conf=conf) for _ in range(count)]

    def start(self) -> None:
        self.master.start()
        self.replica.extra += ("--replicaof", "127.0.0.1", str(self.master.port))
        self.replica.start()
        wait_for(
            "the replica to sync",
            lambda: "master_link_status:up" in command(self.replica.port, "INFO", "replication"),
        )
        for sentinel in self.sentinels:
            sentinel.start()
        wait_for("the sentinels to know each other and the replica", self._settled)

    def _settled(self) -> bool:
        for sentinel in self.sentinels:
            info = command(sentinel.port, "INFO", "sentinel")
            if f"slaves=1,sentinels={len(self.sentinels)}" not in info:
                return False
        return True

    def current_master(self) -> int:
        """The master's port as the sentinels report it."""
        for sentinel in self.sentinels:
            reply = command(sentinel.port, "SENTINEL", "get-master-addr-by-name", self.name)
            if reply:
                return int(reply.split()[-1])
        raise RuntimeError("no sentinel answers")

    @property
    def url(self) -> str:
        """As envoyproxy/ratelimit's REDIS_URL names it for REDIS_TYPE=sentinel."""
        return ",".join([self.name, *(s.address for s in self.sentinels)])

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.master]:
            node.kill()


@contextlib.contextmanager
def running(topology: Cluster | Sentinels) -> Iterator[Cluster | Sentinels]:
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()
