"""envoyproxy/ratelimit's two HTTP ports beside gRPC (its `src/server/server_impl.go`).

The service port (PORT): `/healthcheck` (200 "OK" while healthy, else 500 and no body) and
`/json` (a RateLimitRequest as protojson, answered by the gRPC service's own `answer`: 200 OK,
429 OVER_LIMIT, 400 for a body that is not one or a request the service refuses). The debug port
(DEBUG_PORT): `/rlconfig` (the loaded configuration, a line per limit as upstream's `Dump()`),
`/stats` (our Prometheus text exposition: upstream prints Go's expvar there, which we have not),
and, on any other path, the list of them. No pprof: it is Go's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import aiohttp.web
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from arks.limits.config import DescriptorNode, RateLimitConfig
from ratelimit.health import Health
from ratelimit.servicer import InvalidRequest

log = logging.getLogger(__name__)

Answer = Callable[[rls_pb2.RateLimitRequest], Awaitable[rls_pb2.RateLimitResponse]]

_Response = rls_pb2.RateLimitResponse


def config_dump(config: RateLimitConfig) -> str:
    """Upstream's `Dump()`: per limit, `<domain.key_value…>: unit=<UNIT> requests_per_unit=<n>,
    shadow_mode: <bool>, quota_mode: <bool>` and a newline (an unlimited one's unit is UNKNOWN),
    depth first; upstream's order is Go's map order, ours the configuration's."""
    lines: list[str] = []

    def walk(node: DescriptorNode) -> None:
        limit = node.limit
        if limit is not None:
            unit = "UNKNOWN" if limit.unlimited else limit.unit.name
            lines.append(
                f"{limit.stats_key}: unit={unit} requests_per_unit={limit.requests_per_unit}, "
                f"shadow_mode: {str(limit.shadow_mode).lower()}, "
                f"quota_mode: {str(limit.quota_mode).lower()}\n"
            )
        for child in node.children():
            walk(child)

    for tree in config.domains.values():
        walk(tree)
    return "".join(lines)


def protojson(message: rls_pb2.RateLimitResponse) -> bytes:
    """Go's protojson.Marshal: lowerCamelCase names, fields at their zero value left out, enums by
    name, compact."""
    return json.dumps(json_format.MessageToDict(message), separators=(",", ":")).encode()


def _error(status: int, reason: str) -> aiohttp.web.Response:
    """Go's http.Error: the status text and a newline, as plain text."""
    return aiohttp.web.Response(
        status=status,
        text=f"{reason}\n",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


def service_app(health: Health, answer: Answer) -> aiohttp.web.Application:
    """The service port's routes; any method, as upstream's router."""

    async def healthcheck(_: aiohttp.web.Request) -> aiohttp.web.Response:
        if health.ok:
            return aiohttp.web.Response(text="OK", charset="utf-8")
        return aiohttp.web.Response(status=500)

    async def json_handler(request: aiohttp.web.Request) -> aiohttp.web.Response:
        message = rls_pb2.RateLimitRequest()
        try:
            json_format.Parse((await request.read()).decode("utf-8"), message)
        except (json_format.ParseError, UnicodeDecodeError) as err:
            log.warning("/json: %s", err)
            return _error(400, "Bad Request")
        try:
            response = await answer(message)
        except InvalidRequest as err:  # upstream: every error of ShouldRateLimit is a 400
            log.warning("/json: %s", err)
            return _error(400, "Bad Request")
        except Exception:
            log.exception("/json failed")
            return _error(500, "Internal Server Error")
        status = {_Response.OK: 200, _Response.OVER_LIMIT: 429}.get(response.overall_code, 500)
        return aiohttp.web.Response(
            status=status, body=protojson(response), content_type="application/json"
        )

    async def not_found(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return _error(404, "404 page not found")

    app = aiohttp.web.Application()
    app.router.add_route("*", "/healthcheck", healthcheck)
    app.router.add_route("*", "/json", json_handler)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


DEBUG_ENDPOINTS = {
    "/rlconfig": "print out the currently loaded configuration for debugging",
    "/stats": "print out stats",
}


def debug_app(
    config: Callable[[], RateLimitConfig], registry: CollectorRegistry
) -> aiohttp.web.Application:
    async def rlconfig(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(text=config_dump(config()), charset="utf-8")

    async def stats(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def index(_: aiohttp.web.Request) -> aiohttp.web.Response:
        listing = "".join(f"{path}: {DEBUG_ENDPOINTS[path]}\n" for path in sorted(DEBUG_ENDPOINTS))
        return aiohttp.web.Response(text=listing, charset="utf-8")

    app = aiohttp.web.Application()
    app.router.add_route("*", "/rlconfig", rlconfig)
    app.router.add_route("*", "/stats", stats)
    app.router.add_route("*", "/{tail:.*}", index)
    return app


async def start_http(
    app: aiohttp.web.Application, host: str, port: int, *, reuse_port: bool = False
) -> aiohttp.web.AppRunner:
    """Serve `app` on host:port (SO_REUSEPORT only for a service's workers, as its gRPC port)."""
    runner = aiohttp.web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await aiohttp.web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
