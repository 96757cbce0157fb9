"""An ArksToken's request rate limits (rpm, rpd) as rate-limit requests for the limiter.

Requests per minute/day are counted when a request is admitted, in fixed windows, in the
limiter's store (Redis, or memory locally), keyed by namespace, user, model and limit type.
Token rates (tpm, tpd) are budgets with reservations instead (`quota.py`), so that concurrent
requests cannot overshoot them: only their values are read here.
"""

from __future__ import annotations

from arks.api import Qos
from arks.limits.decision import DescriptorRequest, LimitRequest, hits_for
from arks.limits.model import Hit, RateLimit, Unit
from extproc.decision import Identity

DOMAIN = "arks"
REQUEST_LIMITS = {"rpm": Unit.MINUTE, "rpd": Unit.DAY}
TOKEN_LIMITS = ("tpm", "tpd")


def _descriptor(identity: Identity, kind: str, value: int, hits: int) -> DescriptorRequest:
    unit = REQUEST_LIMITS[kind]
    entries = (
        ("namespace", identity.namespace),
        ("user", identity.user),
        ("model", identity.model),
        ("limit", kind),
    )
    return DescriptorRequest(
        entries, RateLimit(value, unit, name=kind, stats_key=f"{DOMAIN}.{kind}"), hits
    )


def admission(identity: Identity, qos: Qos | None) -> LimitRequest | None:
    """What to ask the limiter before forwarding; None when the grant has no such limits."""
    if qos is None:
        return None
    descriptors = [
        _descriptor(identity, limit.type, limit.value, 1)
        for limit in qos.rate_limits
        if limit.type in REQUEST_LIMITS
    ]
    return LimitRequest(DOMAIN, tuple(descriptors)) if descriptors else None


def token_limits(qos: Qos | None) -> dict[str, int]:
    """The token budgets to charge when the answer ends (carried in the request's metadata)."""
    if qos is None:
        return {}
    return {limit.type: limit.value for limit in qos.rate_limits if limit.type in TOKEN_LIMITS}


def peek(identity: Identity, kind: str, value: int) -> Hit:
    """The counter of a request limit (rpm, rpd) as a hit that reads without counting: what the
    budget gauges ask the counter store for the remaining allowance."""
    descriptor = _descriptor(identity, kind, value, 0)
    (hit,) = hits_for(LimitRequest(DOMAIN, (descriptor,)), [descriptor.override])
    assert hit is not None  # an override always applies
    return hit
