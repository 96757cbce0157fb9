"""What engines publish about their models, for the gateway's `GET /v1/models`: vLLM's (and the
simulator's) `/v1/models` entries carry `max_model_len`, the context the engine serves.

Fetched rarely (every `interval_s`, 60 s: it changes only when an engine restarts with another
setting), from one engine per endpoint that answers, and kept per (namespace, model). A model
no engine answered for (none reachable yet, Services that Envoy Gateway balances, an engine that
does not publish it) has no value: `/v1/models` leaves the field out rather than guess.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

import aiohttp

from arks.policy import Policy, PolicySource
from extproc.picking.scraping import backend_hosts
from extproc.picking.state import EndpointKey

log = logging.getLogger(__name__)

ModelLens = Mapping[EndpointKey, int]
"""(namespace, model) -> the max_model_len its engines publish."""


def endpoint_engines(policy: Policy) -> dict[EndpointKey, list[str]]:
    """(namespace, model) -> the addresses of its Backends, for every endpoint."""
    return {
        (endpoint.key.namespace, endpoint.model): backend_hosts(endpoint, policy)
        for endpoint in policy.endpoints.values()
    }


def max_model_len(listing: Any, model: str) -> int | None:
    """The `max_model_len` of `model`'s entry in an engine's `/v1/models` answer (pure); None
    when the entry or the field is missing or not a positive integer."""
    data = listing.get("data") if isinstance(listing, dict) else None
    for entry in data if isinstance(data, list) else ():
        if isinstance(entry, dict) and entry.get("id") == model:
            value = entry.get("max_model_len")
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


async def _fetch(session: aiohttp.ClientSession, address: str, timeout_s: float) -> Any:
    try:
        async with session.get(
            f"http://{address}/v1/models", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as answer:
            return await answer.json(content_type=None) if answer.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def fetch_lens(
    session: aiohttp.ClientSession,
    engines: Mapping[EndpointKey, Iterable[str]],
    timeout_s: float = 2.0,
) -> dict[EndpointKey, int]:
    """One round: each endpoint's value from the first of its engines that publishes one."""
    listings: dict[str, Any] = {}
    addresses = sorted({a for hosts in engines.values() for a in hosts})
    for address, listing in zip(
        addresses,
        await asyncio.gather(*(_fetch(session, a, timeout_s) for a in addresses)),
        strict=True,
    ):
        listings[address] = listing
    lens: dict[EndpointKey, int] = {}
    for key, hosts in engines.items():
        for address in hosts:
            value = max_model_len(listings.get(address), key[1])
            if value is not None:
                lens[key] = value
                break
    return lens


async def fetch_forever(
    lens: MutableMapping[EndpointKey, int],
    source: PolicySource,
    engines: Callable[[Policy], Mapping[EndpointKey, Iterable[str]]] = endpoint_engines,
    interval_s: float = 60.0,
) -> None:
    """Refresh `lens` in place every `interval_s` (the first round at once); a failing round
    keeps the last values."""
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                fresh = await fetch_lens(session, engines(source.current()))
                for gone in set(lens) - set(fresh):
                    del lens[gone]
                lens.update(fresh)
            except Exception:
                log.exception("fetching the engines' /v1/models failed; retrying")
            await asyncio.sleep(interval_s)
