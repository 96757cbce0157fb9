"""The service's health, as envoyproxy/ratelimit's HealthChecker keeps it: healthy while every
component is (Redis answers; no SIGTERM received; with HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED, a
configuration with a domain). One state, served by gRPC health and HTTP `/healthcheck` alike."""

from __future__ import annotations

from collections.abc import Iterable

REDIS, CONFIG, SIGTERM = "redis", "config", "sigterm"  # upstream's component names


class Health:
    def __init__(self, components: Iterable[str] = (REDIS, SIGTERM)) -> None:
        self._components = dict.fromkeys(components, True)

    @property
    def ok(self) -> bool:
        return all(self._components.values())

    def set(self, component: str, ok: bool) -> bool | None:
        """One component's state; the overall health when that changed it, else None. A
        component this health does not track is an error (upstream's "Invalid component")."""
        if component not in self._components:
            raise KeyError(f"invalid health component: {component}")
        before = self.ok
        self._components[component] = ok
        return None if self.ok == before else self.ok

    def failing(self) -> list[str]:
        """The components that are not healthy, for the log."""
        return [name for name, ok in self._components.items() if not ok]
