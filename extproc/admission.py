"""Admission control around a routing decision: the token's rate limits, its quota and its
concurrency limit; and the settlement of all three when the answer ends.

The decisions are pure (`qos.py`, `quota.py`); this module does their I/O, against the limiter's
counter store and the budget store (memory locally, Redis when shared).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson

from arks.api import ArksQuota, ObjectKey, Qos
from arks.limits.backends import BackendUnavailable
from arks.limits.budgets import BudgetStore, Charge, Lease
from arks.limits.decision import LimitRequest
from arks.limits.limiter import Limiter
from arks.policy import Policy, PolicySource
from arks.tokens import BYTES_PER_TOKEN
from extproc import qos, quota
from extproc.decision import Decision, Deny, Forward, Identity
from extproc.request import RequestInfo
from extproc.reservation import Reservation

log = logging.getLogger(__name__)

MAX_PLANS = 100_000  # admission plans kept (one per tenant, model and grant); then made afresh


def _concurrency(grant: Qos | None) -> int | None:
    for limit in grant.rate_limits if grant else ():
        if limit.type == "concurrency":
            return limit.value
    return None


@dataclass(frozen=True)
class _Plan:
    """What admission derives from a grant alone, the same for every request of one tenant and
    model under one policy: worked out once, not per request."""

    grant: Qos | None  # the grant it was made for (plans are found by its identity)
    rate_limits: LimitRequest | None  # rpm/rpd for the limiter
    token_limits: Mapping[str, int]  # tpm/tpd budgets (empty when the path is not charged)
    concurrency: int | None
    concurrency_key: str
    quota: ArksQuota | None  # the grant's quota, when the path is charged


def _plan(policy: Policy, identity: Identity, grant: Qos | None, charged: bool) -> _Plan:
    found = (
        policy.quotas.get(ObjectKey(identity.namespace, grant.quota))
        if grant and grant.quota and charged
        else None
    )
    return _Plan(
        grant,
        qos.admission(identity, grant),
        qos.token_limits(grant) if charged else {},
        _concurrency(grant),
        quota.concurrency_key(identity),
        found,
    )


@dataclass
class AdmissionControl:
    limiter: Limiter
    budgets: BudgetStore
    policy: PolicySource
    clock: Callable[[], float]  # epoch seconds
    # A lease lives this long unless renewed (`renew_leases`, while the request is in flight): the
    # leases of a gateway process that died are free again within this, not after the longest
    # answer (630 s).
    lease_ttl_s: float = 60.0
    hold_max_s: float = 630.0  # the longest answer, plus the access log's delay: renewed no longer
    default_max_tokens: int = 1024  # reserved for an answer whose request sets no max_tokens
    # The budget keys leased for each request in flight, and when: what `renew_leases` renews.
    held: dict[str, tuple[float, tuple[str, ...]]] = field(default_factory=dict)
    # Settlements that found the store away, applied when it is back (bounded: the oldest go).
    unsettled: deque[tuple[str, list[Charge]]] = field(
        default_factory=lambda: deque(maxlen=100_000)
    )
    # Told the totals after every settlement the store took into the generation it last
    # restored (the quota snapshots follow each one; a charge made in a wiped store is in the
    # store's own figure, which the restore adds the snapshot to).
    on_settled: Callable[[Mapping[str, int]], None] = lambda totals: None
    # Plans by tenant and model, grant (by identity: hashing one walks all its limits) and path
    # charging, for the policy they were made under.
    _plans: dict[tuple[Identity, int, bool], _Plan] = field(
        default_factory=dict, init=False, repr=False
    )
    _plans_policy: Policy | None = field(default=None, init=False, repr=False)

    def _plan_for(self, decision: Forward) -> _Plan:
        policy = self.policy.current()
        if policy is not self._plans_policy or len(self._plans) > MAX_PLANS:
            self._plans.clear()
            self._plans_policy = policy
        grant = decision.qos
        key = (decision.identity, id(grant), decision.charged)
        found = self._plans.get(key)
        if found is None or found.grant is not grant:
            found = self._plans[key] = _plan(policy, decision.identity, grant, decision.charged)
        return found

    async def admit(self, info: RequestInfo, decision: Decision) -> Decision:
        """Forward with what was reserved, or a refusal. All or nothing: a request refused by any
        check (budgets, then rpm/rpd) is charged by none, so refusals never use up an allowance."""
        if not isinstance(decision, Forward):
            return decision
        plan = self._plan_for(decision)
        leases, reservation = self._leases(info, decision, plan)
        admitted = await self._take_budgets(info, decision, leases, reservation)
        if not isinstance(admitted, Forward):
            return admitted
        limited = await self._rate_limits(plan.rate_limits)
        if limited is not None:
            if leases:  # give back what the budgets reserved for it
                released = [Charge(lease.key, 0, lease.expires_at) for lease in leases]
                await self._settle([(info.request_id, released)])
            return limited
        if leases and info.request_id:
            keys = tuple({lease.key for lease in leases})
            self.held[info.request_id] = (reservation.admitted_at, keys)
        return admitted

    def forget(self, request_id: str) -> None:
        """Another replica settled the request: its leases are not renewed here any more."""
        self.held.pop(request_id, None)

    async def renew_leases(self) -> int:
        """Renew the leases of the requests in flight (call it well within `lease_ttl_s`); how
        many were renewed. Requests held longer than `hold_max_s` are let go: their settlement
        (an access-log entry, or the expiry of an unreported request) is overdue."""
        now = self.clock()
        by_key: dict[str, list[str]] = {}
        for request_id, (since, keys) in list(self.held.items()):
            if now - since > self.hold_max_s:
                del self.held[request_id]
                continue
            for key in keys:
                by_key.setdefault(key, []).append(request_id)
        if not by_key:
            return 0
        try:
            return await self.budgets.renew(by_key, self.lease_ttl_s, now)
        except BackendUnavailable as err:
            log.warning("budget store unavailable; leases not renewed: %s", err)
            return 0

    async def _take_budgets(
        self, info: RequestInfo, decision: Forward, leases: list[Lease], reservation: Reservation
    ) -> Decision:
        if leases:
            try:
                taken = await self.budgets.admit(
                    info.request_id, leases, self.lease_ttl_s, reservation.admitted_at
                )
            except BackendUnavailable as err:
                return self._without_store(decision, reservation, err)
            if not taken.admitted:
                now = datetime.fromtimestamp(reservation.admitted_at, UTC)
                why = quota.refusal(taken.key, taken.used, taken.leased, taken.limit, now)
                headers = (("retry-after", str(why.retry_after_s)),) if why.retry_after_s else ()
                kind = (
                    "insufficient_quota" if why.code == "insufficient_quota" else "rate_limit_error"
                )
                return Deny(
                    why.status,
                    why.code,
                    why.message,
                    type=kind,
                    headers=headers,
                    reason=why.reason,
                )
        return dataclasses.replace(decision, reservation=reservation)

    def _without_store(
        self, decision: Forward, reservation: Reservation, err: Exception
    ) -> Decision:
        """The budget store is unreachable: fail open (settle later) or closed, as configured."""
        policy = "fail_open" if self.limiter.enforcement.fail_open else "fail_closed"
        self.limiter.metrics.backend_errors.labels(policy).inc()
        log.warning("budget store unavailable (%s): %s", policy, err)
        if not self.limiter.enforcement.fail_open:
            return Deny(
                503,
                "quota_unavailable",
                "Quotas cannot be checked right now; try again shortly.",
                type="service_unavailable",
                headers=(("retry-after", "1"),),
            )
        return dataclasses.replace(decision, reservation=reservation)

    async def _rate_limits(self, request: LimitRequest | None) -> Deny | None:
        if request is None:
            return None
        answer = await self.limiter.decide(request, all_or_nothing=True)
        if not answer.over_limit:
            return None
        message = (
            orjson.loads(answer.body)["error"]["message"] if answer.body else "Rate limit reached."
        )
        headers = tuple((k, v) for k, v in answer.headers if k != "content-type")
        over = [s.limit.name for s in answer.statuses if s.over_limit and s.limit is not None]
        return Deny(
            429,
            "rate_limit_exceeded",
            message,
            type="rate_limit_error",
            headers=headers,
            reason=over[0] if over and over[0] in qos.REQUEST_LIMITS else "",
        )

    def _leases(
        self, info: RequestInfo, decision: Forward, plan: _Plan
    ) -> tuple[list[Lease], Reservation]:
        identity = decision.identity
        now = self.clock()
        leases: list[Lease] = []
        quota_name = None
        found = plan.quota
        if found is not None:
            prompt, completion = (
                prompt_reservation(info, decision),
                self._completion_estimate(decision),
            )
            leases += quota.quota_leases(
                found, identity.model, prompt, completion, datetime.fromtimestamp(now, UTC)
            )
            quota_name = found.key.name
        if plan.token_limits:
            estimate = prompt_reservation(info, decision) + self._completion_estimate(decision)
            leases += quota.token_rate_leases(identity, plan.token_limits, estimate, now)
        concurrency = plan.concurrency
        if concurrency is not None:
            leases.append(Lease(plan.concurrency_key, concurrency, 1))
        return leases, Reservation(now, quota_name, concurrency is not None)

    def _completion_estimate(self, decision: Forward) -> int:
        """The most the answers can hold: each up to the request's max_tokens, else the
        endpoint's maxTokens (its context length), else the gateway's default; never more than
        the endpoint's maxTokens (the engine refuses or stops there)."""
        limit = decision.answer_limit
        each = decision.max_tokens if decision.max_tokens is not None else limit
        if each is None:
            each = self.default_max_tokens
        if limit is not None:
            each = min(each, limit)
        return each * decision.choices

    async def settle(
        self,
        request_id: str,
        identity: Identity,
        reservation: Reservation | None,
        limits: Mapping[str, int],
        prompt: int,
        completion: int,
        seconds: float = 0.0,
    ) -> None:
        """The answer ended: charge its tokens to tpm/tpd, its cost (tokens, and seconds of
        audio) to the quota, free its slot."""
        await self.settle_many(
            [Ended(request_id, identity, reservation, limits, prompt, completion, seconds)]
        )

    async def settle_many(self, ended: Sequence[Ended]) -> None:
        """`settle` for each, in one round trip to the budget store."""
        due: list[tuple[str, list[Charge]]] = []
        for one in ended:
            self.held.pop(one.request_id, None)
            charges = self._charges(one)
            if charges:
                due.append((one.request_id, charges))
        await self._settle(due)

    def _charges(self, ended: Ended) -> list[Charge]:
        identity, reservation = ended.identity, ended.reservation
        if reservation is None:
            return []
        prompt, completion = ended.prompt, ended.completion
        limits, seconds = ended.limits, ended.seconds
        charges: list[Charge] = quota.token_rate_charges(
            identity, limits, prompt + completion, reservation.admitted_at
        )
        if reservation.quota:
            found = self.policy.current().quotas.get(
                ObjectKey(identity.namespace, reservation.quota)
            )
            if found is not None:
                admitted = datetime.fromtimestamp(reservation.admitted_at, UTC)
                charges += quota.quota_charges(
                    found, identity.model, prompt, completion, admitted, seconds
                )
        if reservation.concurrency:
            charges.append(Charge(quota.concurrency_key(identity), 0))
        return charges

    async def _settle(self, due: list[tuple[str, list[Charge]]]) -> None:
        """Apply these settlements in one round trip, or keep them for `retry_unsettled`."""
        if not due:
            return
        try:
            all_totals = await self.budgets.settle_many(due, self.clock())
        except BackendUnavailable as err:
            # The store may have applied them before the reply was lost: a retry counts once
            # (a budget remembers the requests it settled, see BudgetStore.settle).
            for settlement in due:
                if len(self.unsettled) == self.unsettled.maxlen:
                    self.limiter.metrics.backend_errors.labels("settlement_dropped").inc()
                self.unsettled.append(settlement)
            log.warning(
                "budget store unavailable; %d settlements wait for it: %s", len(self.unsettled), err
            )
            return
        for totals in all_totals:
            if totals is not None:
                self.on_settled(totals)

    async def retry_unsettled(self) -> int:
        """Apply the settlements that waited for the store; how many went through."""
        done = 0
        while self.unsettled:
            request_id, charges = self.unsettled[0]
            try:
                totals = await self.budgets.settle(request_id, charges, self.clock())
            except BackendUnavailable:
                break
            self.unsettled.popleft()
            if totals is not None:
                self.on_settled(totals)
            done += 1
        return done


@dataclass(frozen=True)
class Ended:
    """A request whose answer ended, as its settlement needs it."""

    request_id: str
    identity: Identity
    reservation: Reservation | None
    limits: Mapping[str, int]
    prompt: int
    completion: int
    seconds: float = 0.0


def prompt_reservation(info: RequestInfo, decision: Forward) -> int:
    """The prompt's tokens as admission can know them: counted when the body was parsed, else
    the body's size over BYTES_PER_TOKEN (an upper bound for text; no tokenizer pass)."""
    if decision.prompt_estimate is not None:
        return decision.prompt_estimate
    return math.ceil(_int(info.headers.get("content-length")) / BYTES_PER_TOKEN)


def _int(text: str | None) -> int:
    try:
        return max(0, int(text or 0))
    except ValueError:
        return 0
