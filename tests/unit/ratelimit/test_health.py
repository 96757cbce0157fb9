"""The service's health, as upstream's HealthChecker (its test/server/health_test.go)."""

from __future__ import annotations

import pytest

from ratelimit.health import CONFIG, REDIS, SIGTERM, Health


def test_healthy_while_every_component_is_and_each_change_reported_once() -> None:
    health = Health()
    assert health.ok
    assert health.set(REDIS, False) is False and not health.ok
    assert health.set(REDIS, False) is None  # no change
    assert health.failing() == [REDIS]
    assert health.set(REDIS, True) is True and health.ok


def test_sigterm_keeps_it_unhealthy_whatever_redis_does() -> None:
    health = Health()
    assert health.set(SIGTERM, False) is False
    assert health.set(REDIS, False) is None and health.set(REDIS, True) is None
    assert not health.ok and health.failing() == [SIGTERM]


def test_the_config_component_only_when_asked() -> None:
    health = Health((REDIS, SIGTERM, CONFIG))
    assert health.set(CONFIG, False) is False
    assert health.set(REDIS, True) is None and not health.ok
    assert health.set(CONFIG, True) is True
    with pytest.raises(KeyError, match="invalid health component: config"):
        Health().set(CONFIG, True)
