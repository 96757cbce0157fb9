"""Settlement: an admitted request ends, or never says that it did.

A forwarded request is noted in flight. Its access-log entry charges its usage (metrics), settles
its budgets (tpm/tpd, quota, concurrency) and frees its pick. One still in flight after the
longest possible answer is charged what the gateway knew when it admitted it (`inflight`), unless
another replica received its entry (`reported`). Each settled request, entry or expiry, becomes
one usage record handed to the ledger writer (`extproc.ledger`; nothing waits for it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from arks.api import ObjectKey
from arks.ledger import UsageRecord
from arks.limits.model import BackendUnavailable
from arks.policy import Policy
from arks.wire import METADATA_NAMESPACE
from extproc import quota
from extproc.admission import Ended, prompt_reservation
from extproc.context import Context
from extproc.decision import Forward, Identity
from extproc.inflight import Admitted
from extproc.request import RequestInfo
from extproc.reservation import Reservation
from extproc.response_homes import ResponseHome
from extproc.usage import Finished, Usage, usage_of

log = logging.getLogger(__name__)


def admitted(ctx: Context, info: RequestInfo, decision: Forward) -> None:
    """Note a forwarded request, with what settling it needs if its entry never comes (its
    prompt as admission reserved it: a lost entry is charged that, not nothing)."""
    ours = decision.metadata[METADATA_NAMESPACE]
    replaced = ctx.inflight.add(
        Admitted(
            info.request_id,
            decision.identity,
            prompt_reservation(info, decision),
            None if decision.max_tokens is None else decision.max_tokens * decision.choices,
            ctx.monotonic(),
            reservation=decision.reservation,
            limits=ours.get("limits", {}),
            path=info.path,
        )
    )
    if replaced is not None:
        ctx.metrics.in_flight_changed(replaced.identity, -1)
    if info.request_id:  # InFlight keeps no entry without an id
        ctx.metrics.in_flight_changed(decision.identity, +1)


async def _remember_home(ctx: Context, done: Finished) -> None:
    """A stored response's engine, for the requests that must reach it (`response_homes`)."""
    if not done.response_id or done.status != 200 or not done.upstream_host:
        return
    home = ResponseHome(done.namespace, done.model, done.upstream_host)
    try:
        await ctx.homes.remember(done.response_id, home)
    except BackendUnavailable as err:
        log.warning("could not record the engine of response %s: %s", done.response_id, err)


def _strike_off(ctx: Context, request_id: str) -> Admitted | None:
    """The request ended: its pick is free, it is no longer in flight here (the entry it had
    here, if this process admitted it)."""
    if ctx.picking is not None:
        ctx.picking.finished(request_id)
    entry = ctx.inflight.finish(request_id)
    if entry is not None:
        ctx.metrics.in_flight_changed(entry.identity, -1)
    return entry


async def finished(ctx: Context, entries: Iterable[Finished]) -> None:
    """One access-log batch: charge and settle each request, strike it off. The budgets of the
    whole batch are settled in one round trip to their store."""
    foreign: list[str] = []  # admitted by another replica, which is waiting for them
    ended: list[Ended] = []
    spent: list[float] = []  # each entry's own work; the batch's settlement is shared out
    for done in entries:
        started = ctx.timer()
        if _strike_off(ctx, done.request_id) is None and done.request_id:
            foreign.append(done.request_id)
        usage = usage_of(done)
        if usage is None:
            ctx.metrics.requests.labels(
                done.namespace, done.user, done.model, str(done.status)
            ).inc()
        else:
            ctx.metrics.charge(usage, done.status)
        ctx.metrics.latency(done)
        who = Identity(done.namespace, done.user, done.model)
        charge = _charge(ctx, who, done.reservation, usage)
        if ctx.ledger is not None:
            ctx.ledger.submit(finished_record(done, usage, charge, ctx.now()))
        ended.append(
            Ended(
                done.request_id,
                who,
                done.reservation,
                done.limits,
                usage.prompt_tokens if usage else 0,
                usage.completion_tokens if usage else 0,
                usage.seconds if usage else 0.0,
            )
        )
        await _remember_home(ctx, done)
        spent.append(ctx.timer() - started)
    started = ctx.timer()
    await ctx.admission.settle_many(ended)
    share = (ctx.timer() - started) / len(spent) if spent else 0.0
    for own in spent:
        ctx.metrics.decided("settlement", own + share)
    try:
        await ctx.reported.mark(foreign)
    except BackendUnavailable as err:
        log.warning(
            "could not tell other replicas about %d reported requests: %s", len(foreign), err
        )


async def release_reported_elsewhere(ctx: Context) -> int:
    """Strike off the requests in flight whose access-log entry another replica received and
    charged (`InFlight.due`: each looked at a few times, further apart); how many there were.
    Their budgets that replica settled; here they free their pick and stop being renewed."""
    now = ctx.monotonic()
    due = ctx.inflight.due(now)
    if not due:
        return 0
    try:
        elsewhere = await ctx.reported.seen([request_id for request_id, _ in due])
    except BackendUnavailable as err:
        log.warning("cannot tell whether %d requests were reported elsewhere: %s", len(due), err)
        ctx.inflight.again(due, now)
        return 0
    for request_id in elsewhere:
        if _strike_off(ctx, request_id) is not None:
            ctx.admission.forget(request_id)
    ctx.metrics.reported_elsewhere.inc(len(elsewhere))
    ctx.inflight.again([d for d in due if d[0] not in elsewhere], now)
    return len(elsewhere)


async def expire_unreported(ctx: Context) -> int:
    """Charge the admitted requests whose access-log entry never came; how many there were.

    An entry that went to another replica is not lost: that replica charged the request.
    If the shared store cannot say, the request is charged (a lost entry must cost something).
    """
    expired = ctx.inflight.expire(ctx.monotonic())
    for gone in expired:
        ctx.metrics.in_flight_changed(gone.identity, -1)
    if not expired:
        return 0
    try:
        elsewhere = await ctx.reported.seen([e.request_id for e in expired])
    except BackendUnavailable as err:
        log.warning(
            "cannot tell whether %d requests were reported elsewhere: %s", len(expired), err
        )
        elsewhere = set()
    ctx.metrics.reported_elsewhere.inc(len(elsewhere))
    lost = [e for e in expired if e.request_id not in elsewhere]
    for entry in lost:
        usage: Usage = entry.usage()
        ctx.metrics.unreported.labels(usage.namespace, usage.user, usage.model).inc()
        ctx.metrics.charge(usage, 0)
        charge = _charge(ctx, entry.identity, entry.reservation, usage)
        if ctx.ledger is not None:
            ctx.ledger.submit(unreported_record(entry, usage, charge, ctx.now()))
        await ctx.admission.settle(
            entry.request_id,
            entry.identity,
            entry.reservation,
            entry.limits,
            usage.prompt_tokens,
            usage.completion_tokens,
        )
    return len(lost)


@dataclass(frozen=True, slots=True)
class QuotaCharge:
    """What settling a request charges the quota its admission reserved against, as
    `AdmissionControl.settle` charges it: the ArksQuota ("namespace/name"), the admission's time
    (the periods charged), the cost in the price table's currency (exact; None when no price
    applies) and in the micro-units a cost item counts (rounded up). The usage record keeps them,
    so the budgets can be rebuilt from the ledger exactly (extproc/rebuild.py)."""

    quota: str
    admitted_at: float  # epoch seconds
    cost: float | None
    cost_micros: int


def quota_charge(
    policy: Policy,
    who: Identity,
    reservation: Reservation | None,
    prompt: int,
    completion: int,
    seconds: float = 0.0,
) -> QuotaCharge | None:
    """What `prompt` and `completion` tokens charge the quota `reservation` names, with its
    prices as that quota is now (the token's grant for the model names it); None when the
    admission reserved against no quota or that quota is gone (pure)."""
    if reservation is None or not reservation.quota:
        return None
    found = policy.quotas.get(ObjectKey(who.namespace, reservation.quota))
    if found is None:
        return None
    price = quota.price_for(found, who.model)
    return QuotaCharge(
        f"{who.namespace}/{reservation.quota}",
        reservation.admitted_at,
        None if price is None else quota.currency_cost(prompt, completion, price, seconds),
        quota.cost_micros(prompt, completion, price, seconds),
    )


def _charge(
    ctx: Context, who: Identity, reservation: Reservation | None, usage: Usage | None
) -> QuotaCharge | None:
    """The request's quota charge; its cost counted in the metrics when it has usage."""
    charge = quota_charge(
        ctx.policy.current(),
        who,
        reservation,
        usage.prompt_tokens if usage else 0,
        usage.completion_tokens if usage else 0,
        usage.seconds if usage else 0.0,
    )
    if usage is not None and charge is not None and charge.cost is not None:
        ctx.metrics.charge_cost(who, charge.cost)
    return charge


def finished_record(
    done: Finished, usage: Usage | None, charge: QuotaCharge | None, now: datetime
) -> UsageRecord:
    """The usage record of a request whose access-log entry came (pure). Its time is when it
    ended by Envoy's clock (start + duration: the same on every replica), else `now`; an error
    answer (no usage owed) is recorded with no tokens and no cost."""
    ended = now
    if done.started_at is not None:
        ended = datetime.fromtimestamp(done.started_at + (done.duration_s or 0.0), UTC)
    return UsageRecord(
        request_id=done.request_id,
        time=ended,
        namespace=done.namespace,
        user=done.user,
        model=done.model,
        engine=done.upstream_host,
        path=done.path,
        status=done.status,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        cost=charge.cost if usage is not None and charge is not None else None,
        source="reported" if usage is None or usage.estimated is None else "estimated",
        estimate_reason=usage.estimated if usage else None,
        duration_s=done.duration_s,
        ttft_s=done.first_byte_s,
        **_charged(charge),
    )


def unreported_record(
    entry: Admitted, usage: Usage, charge: QuotaCharge | None, now: datetime
) -> UsageRecord:
    """The usage record of an admitted request whose entry never came (pure): the estimate it
    was charged (reason as in `arks_usage_estimated_requests_total`), no status (0), no engine,
    no timings; its time is when it was given up on."""
    return UsageRecord(
        request_id=entry.request_id,
        time=now,
        namespace=usage.namespace,
        user=usage.user,
        model=usage.model,
        engine="",
        path=entry.path,
        status=0,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost=None if charge is None else charge.cost,
        source="estimated",
        estimate_reason=usage.estimated,
        duration_s=None,
        ttft_s=None,
        **_charged(charge),
    )


def _charged(charge: QuotaCharge | None) -> dict[str, Any]:
    """A record's quota fields."""
    if charge is None:
        return {}
    return {
        "quota": charge.quota,
        "admitted_at": datetime.fromtimestamp(charge.admitted_at, UTC),
        "cost_micros": charge.cost_micros,
    }
