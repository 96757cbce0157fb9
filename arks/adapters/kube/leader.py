"""Leader election on a coordination.k8s.io/v1 Lease, after client-go's leaderelection.

One step (`try_acquire_or_renew`) is the whole protocol; the thread only repeats it. A lease
held by someone else counts as expired when its record has not changed for its duration, as
observed on our own monotonic clock (no comparison of clocks across machines). Every write
carries the resourceVersion it read, so two candidates racing for it cannot both win: the
loser gets 409 Conflict and stays (or becomes) a follower.

Leading ends by itself: `is_leader` is true only within the renew deadline of the last
successful renewal (client-go's renewDeadline), however long an API call hangs, and every call
is bounded by that deadline. The deadline is shorter than the lease, which a follower waits out
before taking over, so two leaders never overlap (given clocks that run at the same rate).
"""

from __future__ import annotations

import datetime
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from arks.adapters.kube import rest
from arks.adapters.kube.rest import Obj
from arks.resources import LEASES

log = logging.getLogger(__name__)


def micro_time(now: datetime.datetime) -> str:
    """metav1.MicroTime: RFC 3339 with microseconds, UTC."""
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_s: float = 15.0,
        renew_deadline_s: float | None = None,  # default: two thirds of lease_s (10 of 15 s)
        renew_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        deadline = renew_deadline_s if renew_deadline_s is not None else lease_s * 2 / 3
        if not renew_s < deadline < lease_s:
            raise ValueError("need renew_s < renew_deadline_s < lease_s")
        self._deadline_s = deadline
        self.identity = identity
        self._api = api_client
        self._namespace = namespace
        self._name = name
        self._lease_s = lease_s
        self._renew_s = renew_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._leader = threading.Event()
        self._last_renewed = -math.inf
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def is_leader(self) -> bool:
        """Leading, and renewed within the deadline: a hung renewal ends leadership on time."""
        if not self._leader.is_set():
            return False
        if self._clock() - self._last_renewed < self._deadline_s:
            return True
        self._leader.clear()
        log.warning(
            "lease %s/%s not renewed within %.1f s: no longer leading",
            self._namespace,
            self._name,
            self._deadline_s,
        )
        return False

    def wait_leader(self, timeout_s: float | None = None) -> bool:
        return self._leader.wait(timeout_s)

    # --- protocol ---------------------------------------------------------------------------

    def try_acquire_or_renew(self) -> bool:
        """One round: take or keep the lease if we may; returns whether we now lead."""
        started = self._clock()
        try:
            won = self._attempt()
        except Exception as e:  # API errors, refused or timed-out calls: a failed round, no more
            log.warning("lease %s/%s: %s", self._namespace, self._name, e)
            won = False
        now = self._clock()
        if won and now - started < self._deadline_s:  # a renewal that came too late is none
            self._last_renewed = started
            self._leader.set()
        elif self.is_leader() and (
            now - self._last_renewed >= self._lease_s or self._lost_to_other
        ):
            log.warning("lost leadership of lease %s/%s", self._namespace, self._name)
            self._leader.clear()
        return self.is_leader()

    def _attempt(self) -> bool:
        self._lost_to_other = False
        path = LEASES.path(self._namespace, self._name)
        try:
            lease = rest.request(self._api, "GET", path, timeout_s=self._deadline_s)
        except ApiException as e:
            if e.status != 404:
                raise
            return self._create()
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        if holder and holder != self.identity:
            # Someone else holds it: ours only once their record stood still for its duration.
            record = (holder, spec.get("renewTime"), lease["metadata"].get("resourceVersion"))
            if record != self._observed:
                self._observed, self._observed_at = record, self._clock()
            duration = float(spec.get("leaseDurationSeconds") or self._lease_s)
            if self._clock() - self._observed_at < duration:
                self._lost_to_other = True
                return False
        now = micro_time(self._wall_clock())
        changes: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, math.ceil(self._lease_s)),
            "renewTime": now,
        }
        if holder != self.identity:
            changes["acquireTime"] = now
            changes["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        try:
            self._patch(lease, changes)
        except ApiException as e:
            if e.status == 409:
                self._lost_to_other = True
                return False
            raise
        return True

    def _patch(self, lease: Obj, spec: dict[str, Any]) -> None:
        """Merge-patch the lease's spec, only if it is still the version we read (else 409)."""
        rest.request(
            self._api,
            "PATCH",
            LEASES.path(self._namespace, self._name),
            body={
                "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                "spec": spec,
            },
            content_type=rest.MERGE_PATCH,
            timeout_s=self._deadline_s,
        )

    def _create(self) -> bool:
        now = micro_time(self._wall_clock())
        lease: Obj = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self._name, "namespace": self._namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, math.ceil(self._lease_s)),
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }
        try:
            rest.request(
                self._api,
                "POST",
                LEASES.path(self._namespace),
                body=lease,
                timeout_s=self._deadline_s,
            )
        except ApiException as e:
            if e.status == 409:  # another candidate created it first
                self._lost_to_other = True
                return False
            raise
        return True

    def release(self) -> None:
        """Give the lease up at once, so a follower need not wait for it to expire."""
        if not self.is_leader():
            return
        self._leader.clear()
        path = LEASES.path(self._namespace, self._name)
        try:
            lease = rest.request(self._api, "GET", path, timeout_s=self._deadline_s)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            self._patch(lease, {"holderIdentity": None, "leaseDurationSeconds": 1})
        except (ApiException, OSError) as e:
            log.warning("could not release lease %s/%s: %s", self._namespace, self._name, e)

    # --- thread -----------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"leader-{self.identity}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._renew_s + 10)
        self.release()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.try_acquire_or_renew()
            # Followers poll at the renew period too: the lease cannot be taken sooner anyway.
            self._stop.wait(self._renew_s)

    _lost_to_other = False
