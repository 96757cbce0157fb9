"""The picker's eyes: every `interval_s`, the engines of the picking endpoints in the current
policy, their `/metrics` scraped (`arks.adapters.scrape`: fetch and parse live there) and
folded into the datastore. A failing round is logged, never fatal.

Which engines an endpoint has is a function of the policy (`EngineSets`): its Backends'
addresses here (`picking_endpoints`), its HTTPRoute's hosts in a cluster
(`cluster.ClusterEngines.picking_endpoints`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping

import aiohttp

from arks.adapters.scrape import Scraper
from arks.api import ArksEndpoint
from arks.envoy_config import PICKED_WEIGHTINGS, routed_backends
from arks.policy import Policy, PolicySource
from extproc.picking.service import Picking
from extproc.picking.state import EndpointKey, host

log = logging.getLogger(__name__)

EngineSets = Callable[[Policy], Mapping[EndpointKey, Iterable[str]]]
"""The policy -> (namespace, model) -> engine hosts of every endpoint that picks per request."""


def backend_hosts(endpoint: ArksEndpoint, policy: Policy) -> list[str]:
    """The addresses of the Backends the endpoint routes to (weight > 0)."""
    return [
        host(address)
        for _ref, backend in routed_backends(endpoint, policy)
        for address in backend.endpoints
    ]


def picking_endpoints(policy: Policy) -> dict[EndpointKey, list[str]]:
    """(namespace, model) -> engine hosts, for every endpoint whose weighting picks per request."""
    return {
        (endpoint.key.namespace, endpoint.model): backend_hosts(endpoint, policy)
        for endpoint in policy.endpoints.values()
        if endpoint.weighting in PICKED_WEIGHTINGS
    }


async def refresh(
    picking: Picking, scraper: Scraper[str], policy: Policy, engines: EngineSets = picking_endpoints
) -> None:
    """One round: the engine set from the policy, one scrape of each, the picks too old to count."""
    picking.store.set_endpoints(engines(policy))
    scraper.set_targets(
        {address: f"http://{address}/metrics" for address in picking.store.addresses()}
    )
    picking.store.observe(await scraper.scrape_once())
    if expired := picking.store.expire(picking.clock()):
        log.warning("%d picks had no access-log entry; no longer counted as in flight", expired)


async def scrape_forever(
    picking: Picking, source: PolicySource, engines: EngineSets = picking_endpoints
) -> None:
    s = picking.settings
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        scraper: Scraper[str] = Scraper(
            session, {}, interval_s=s.interval_s, timeout_s=s.scrape_timeout_s
        )
        while True:
            started = loop.time()
            try:
                await refresh(picking, scraper, source.current(), engines)
            except Exception:
                log.exception("engine scrape round failed; retrying")
            await asyncio.sleep(max(0.0, s.interval_s - (loop.time() - started)))
