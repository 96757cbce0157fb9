"""Fetching engines' `/metrics`: the only I/O of this package.

`scrape` fetches one URL and reports what happened as data. `Scraper` scrapes a set of
endpoints concurrently every `interval_s`, parses each answer (`arks.engine_metrics.parse_engine_metrics`)
and keeps, per endpoint, the last load, the consecutive failures and the last success time.
A down, slow or garbled engine is a `ScrapeFailure` observation; nothing it does raises out of
the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import aiohttp

from arks.engine_metrics import (
    EngineLoad,
    MetricsParseError,
    Observation,
    ScrapeFailure,
    parse_engine_metrics,
)

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
MAX_BODY_BYTES = 4 * 1024 * 1024  # a vLLM exposition is tens of KiB


@dataclass(frozen=True, slots=True)
class Scrape:
    """One fetch: the body when it answered 200, else why not."""

    url: str
    ok: bool
    elapsed_s: float
    text: str | None = None
    error: str | None = None
    status: int | None = None


async def scrape(session: aiohttp.ClientSession, url: str, timeout_s: float) -> Scrape:
    """GET `url`; every failure (refused, timeout, non-200, oversized) is a `Scrape`, not raised."""
    started = time.monotonic()

    def failed(error: str, status: int | None = None) -> Scrape:
        return Scrape(url, False, time.monotonic() - started, error=error, status=status)

    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    return failed(f"HTTP {resp.status}", resp.status)
                body = await resp.content.read(MAX_BODY_BYTES + 1)
                if len(body) > MAX_BODY_BYTES:
                    return failed(f"body over {MAX_BODY_BYTES} bytes", resp.status)
                text = body.decode("utf-8", errors="replace")
                return Scrape(url, True, time.monotonic() - started, text=text, status=200)
    except TimeoutError:
        return failed(f"timed out after {timeout_s:g}s")
    except (aiohttp.ClientError, OSError, ValueError) as err:
        return failed(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)


def observe(result: Scrape) -> Observation:
    """A scrape as the weight tracker's input: the parsed load, or why there is none.

    An engine without a metrics page (404: e.g. an OpenAI-compatible server that exports
    none) is up with an unknown load, not failing: it keeps a neutral weight."""
    if result.status == 404:
        return EngineLoad("unknown")
    if not result.ok or result.text is None:
        return ScrapeFailure(result.error or "no answer")
    try:
        return parse_engine_metrics(result.text)
    except MetricsParseError as err:
        return ScrapeFailure(f"bad exposition: {err}")


@dataclass(frozen=True, slots=True)
class EndpointState:
    """What the scraper knows of one endpoint after its latest round."""

    url: str
    observation: Observation | None = None  # this round's; None before the first round
    load: EngineLoad | None = None  # the last one parsed successfully
    consecutive_failures: int = 0
    last_success: float | None = None  # clock() time
    last_elapsed_s: float | None = None


Listener = Callable[[Mapping[K, Observation]], None]


@dataclass
class Scraper(Generic[K]):
    """Scrapes `targets` (key -> metrics URL) every `interval_s`; `listener` gets each round."""

    session: aiohttp.ClientSession
    targets: Mapping[K, str]
    interval_s: float = 2.0
    timeout_s: float = 1.0
    listener: Listener[K] | None = None
    clock: Callable[[], float] = time.monotonic
    _states: dict[K, EndpointState] = field(default_factory=dict, init=False)

    def set_targets(self, targets: Mapping[K, str]) -> None:
        """Swap the endpoint set; the next round scrapes it (state of kept keys survives)."""
        self.targets = dict(targets)

    def states(self) -> dict[K, EndpointState]:
        return dict(self._states)

    async def scrape_once(self) -> dict[K, Observation]:
        """One concurrent round over the current targets; returns each endpoint's observation."""
        targets = dict(self.targets)
        results = await asyncio.gather(
            *(scrape(self.session, url, self.timeout_s) for url in targets.values())
        )
        now = self.clock()
        round_: dict[K, Observation] = {}
        states: dict[K, EndpointState] = {}
        for index, ((key, url), result) in enumerate(zip(targets.items(), results, strict=True)):
            if index:
                # Each exposition takes ~0.4 ms to parse (a vLLM's, 17 KiB): the request loop
                # gets a turn between two, not one stall for all (40 engines: 11 ms).
                await asyncio.sleep(0)
            observation = observe(result)
            before = self._states.get(key)
            if before is None or before.url != url:
                before = EndpointState(url)
            if isinstance(observation, EngineLoad):
                states[key] = EndpointState(url, observation, observation, 0, now, result.elapsed_s)
            else:
                states[key] = EndpointState(
                    url,
                    observation,
                    before.load,
                    before.consecutive_failures + 1,
                    before.last_success,
                    result.elapsed_s,
                )
                log.debug("scrape %s failed: %s", url, observation.reason)
            round_[key] = observation
        self._states = states
        return round_

    async def run(self) -> None:
        """Scrape every `interval_s` until cancelled; a failing listener is logged, not fatal."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            round_ = await self.scrape_once()
            if self.listener is not None:
                try:
                    self.listener(round_)
                except Exception:
                    log.exception("load listener failed; scraping goes on")
            await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - started)))
