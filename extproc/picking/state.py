"""The engines picking endpoints route to, as the picker sees them: the only shared state.

Per engine: its address as Envoy names hosts (`ip:port`), the latest load scraped from its
`/metrics` (`arks.engine_metrics`: parsed there, never here), consecutive scrape failures, and our
own picks still in flight. Per endpoint: which engines it may use. The scrape loop
(`scraping.py`) swaps the endpoint map when the policy changes and folds in each round; the
servicer records picks and their end (the access-log entry of the request).

"Unseen" picks are those made since the engine's last successful scrape and not finished yet:
the scrape cannot show them, so the queue scorer adds them (a burst between two scrapes does
not all land on the engine that looked idle). Picks made before the scrape are in its numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from arks.api import SocketAddress
from arks.engine_metrics import EngineLoad, Observation

EndpointKey = tuple[str, str]  # (namespace, model)


def host(address: SocketAddress) -> str:
    """An engine address as Envoy's override-host lookup spells it."""
    if ":" in address.address:  # IPv6
        return f"[{address.address}]:{address.port}"
    return f"{address.address}:{address.port}"


class EngineView(NamedTuple):
    """One engine as filters and scorers see it: typed numbers, a snapshot (a tuple: cheap to
    build per request)."""

    address: str
    scraped: bool = False  # answered a scrape at least once
    waiting: float = 0.0  # its queue at the last scrape (0 where the engine does not say)
    kv_cache_usage: float = 0.0  # 0..1
    failures: int = 0  # consecutive failed scrapes
    unseen: int = 0  # our picks since its last scrape, still in flight
    in_flight: int = 0  # all our picks still in flight


@dataclass(slots=True)
class _Engine:
    load: EngineLoad | None = None
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    failures: int = 0
    generation: int = 0  # successful scrapes so far
    unseen: int = 0
    in_flight: int = 0


@dataclass(frozen=True, slots=True)
class _Pick:
    address: str
    generation: int
    at: float


@dataclass
class Datastore:
    """Engines by endpoint, their load, and the picks awaiting their access-log entry."""

    max_pick_age_s: float = 630.0  # a pick whose entry never came stops counting after this
    _endpoints: dict[EndpointKey, tuple[str, ...]] = field(default_factory=dict)
    _engines: dict[str, _Engine] = field(default_factory=dict)
    _picks: dict[str, _Pick] = field(default_factory=dict)  # by request id, oldest first

    def set_endpoints(self, endpoints: Mapping[EndpointKey, Iterable[str]]) -> None:
        """The picking endpoints and their engines; engines no endpoint names are forgotten."""
        self._endpoints = {
            key: tuple(dict.fromkeys(addresses)) for key, addresses in endpoints.items()
        }
        wanted = {a for addresses in self._endpoints.values() for a in addresses}
        for gone in self._engines.keys() - wanted:
            del self._engines[gone]
        for address in wanted - self._engines.keys():
            self._engines[address] = _Engine()

    def load(self, address: str) -> EngineLoad | None:
        """The engine's last scraped load (None: never scraped)."""
        engine = self._engines.get(address)
        return engine.load if engine else None

    def addresses(self) -> list[str]:
        return list(self._engines)

    def observe(self, observations: Mapping[str, Observation]) -> None:
        """Fold in one scrape round."""
        for address, observation in observations.items():
            engine = self._engines.get(address)
            if engine is None:
                continue
            if isinstance(observation, EngineLoad):
                engine.load, engine.failures, engine.unseen = observation, 0, 0
                engine.waiting = observation.waiting or 0.0
                engine.kv_cache_usage = min(1.0, max(0.0, observation.kv_cache_usage or 0.0))
                engine.generation += 1
            else:
                engine.failures += 1

    def engines(self, key: EndpointKey) -> list[EngineView]:
        out = []
        for address in self._endpoints.get(key, ()):
            e = self._engines[address]
            out.append(
                EngineView(
                    address,
                    e.load is not None,
                    e.waiting,
                    e.kv_cache_usage,
                    e.failures,
                    e.unseen,
                    e.in_flight,
                )
            )
        return out

    def picked(self, request_id: str, address: str, now: float) -> None:
        engine = self._engines.get(address)
        if engine is None or not request_id:
            return
        self.finished(request_id)  # a reused id counts once
        engine.unseen += 1
        engine.in_flight += 1
        self._picks[request_id] = _Pick(address, engine.generation, now)

    def finished(self, request_id: str) -> bool:
        """The request ended (its access-log entry came, or it was refused after the pick)."""
        pick = self._picks.pop(request_id, None)
        if pick is None:
            return False
        engine = self._engines.get(pick.address)
        if engine is not None:
            engine.in_flight = max(0, engine.in_flight - 1)
            if engine.generation == pick.generation:
                engine.unseen = max(0, engine.unseen - 1)
        return True

    def expire(self, now: float) -> int:
        """Forget picks older than `max_pick_age_s` (their entry was lost); how many."""
        old = []
        for request_id, pick in self._picks.items():
            if now - pick.at <= self.max_pick_age_s:
                break
            old.append(request_id)
        for request_id in old:
            self.finished(request_id)
        return len(old)

    def __len__(self) -> int:
        return len(self._picks)
