"""Fixtures for the integration tests: the local stack, a private Redis, an emulated Kubernetes API.

Each test module that uses `stack` gets one stack on free ports with its own policy file
(`tests.support.stack`); tests read usage from the gateway's metrics, as an operator would.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.kube import RunningKubeEmulator, running_kube_emulator
from tests.support.redis_server import PrivateRedis
from tests.support.redis_topologies import Cluster, running
from tests.support.stack import Stack, running_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH (install Debian's redis-server)")
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-master Redis Cluster (a replica each) for tests that only count on it; tests that
    kill nodes start their own."""
    with running(Cluster(tmp_path_factory.mktemp("redis-cluster"))) as cluster:
        assert isinstance(cluster, Cluster)
        yield cluster


@pytest.fixture(scope="module")
def kube() -> Iterator[RunningKubeEmulator]:
    """An emulated Kubernetes API server for the module's tests."""
    with running_kube_emulator() as running:
        yield running


@pytest.fixture
def api(kube: RunningKubeEmulator) -> Iterator[Any]:
    with kube.api_client() as client:
        yield client


@pytest.fixture
def ns() -> str:
    """A namespace of the test's own, so tests sharing an emulator never see each other."""
    return f"test-{uuid.uuid4().hex[:8]}"
