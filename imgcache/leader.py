"""Leader election through a coordination.k8s.io Lease, so two replicas are safe.

Only the leader writes. A follower treats the Lease as expired when its record has not
changed for a whole lease duration by the follower's own clock, so clock skew between
nodes cannot hand leadership to two replicas. A leader that cannot renew within the
renew deadline steps down by ending the process; Kubernetes restarts it as a follower.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from imgcache.kube import LEASES, ApiError, Kube
from imgcache.model import JSON

log = structlog.get_logger(__name__)


class LostLeadership(Exception):
    """This replica could not renew its Lease in time and must stop writing."""


@dataclass(frozen=True)
class ElectionSettings:
    namespace: str
    name: str
    identity: str
    lease_duration: float
    renew_deadline: float
    retry_period: float


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Acquires and renews one Lease; see the module docstring."""

    def __init__(
        self,
        kube: Kube,
        settings: ElectionSettings,
        on_change: Callable[[bool], None],
        annotations: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.on_change = on_change
        # Written onto the Lease at each renewal, so state such as the registries' rates
        # reaches `imgcache status` without extra API requests.
        self.annotations = annotations
        self._lease: JSON | None = None
        self.leading = False
        self._observed: tuple[str, str] | None = None
        self._observed_at = 0.0

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Wait for the Lease, then run ``lead`` while renewing; raise LostLeadership on loss."""
        await self._acquire()
        self.leading = True
        self.on_change(True)
        log.info("leader.elected", identity=self.settings.identity, lease=self.settings.name)
        async with anyio.create_task_group() as group:
            group.start_soon(lead)
            await self._renew_until_lost()
            group.cancel_scope.cancel()

    async def _acquire(self) -> None:
        while True:
            try:
                if await self._try_acquire_or_renew():
                    return
            except ApiError as error:
                log.warning("leader.acquire_failed", status=error.status, error=error.message)
            await anyio.sleep(self.settings.retry_period)

    async def _renew_until_lost(self) -> None:
        last_renewed = time.monotonic()
        while True:
            await anyio.sleep(self.settings.retry_period)
            # A request that hangs must not keep this replica leading past the renew
            # deadline, because a follower takes the Lease once it expires.
            remaining = self.settings.renew_deadline - (time.monotonic() - last_renewed)
            reason = f"no response from the API server within {self.settings.renew_deadline:g} s"
            with anyio.move_on_after(max(remaining, 0.0)):
                try:
                    if await self._try_acquire_or_renew():
                        last_renewed = time.monotonic()
                        continue
                    reason = "held by another replica"
                except ApiError as error:
                    reason = f"{error.status} {error.message}"
                    log.warning("leader.renew_failed", status=error.status, error=error.message)
            if time.monotonic() - last_renewed >= self.settings.renew_deadline:
                self.leading = False
                self.on_change(False)
                log.error("leader.lost", identity=self.settings.identity, reason=reason)
                raise LostLeadership(
                    f"could not renew Lease {self.settings.name} within {self.settings.renew_deadline:g} s: {reason}"
                )

    async def _try_acquire_or_renew(self) -> bool:
        # A renewal writes the Lease read last time. A conflict means another writer
        # changed it, and the full read-check-write below decides again.
        if self.leading and self._lease is not None and await self._write(self._lease, renew=True):
            return True
        s = self.settings
        try:
            lease = await self.kube.get(LEASES, s.name, s.namespace)
        except ApiError as error:
            if not error.not_found:
                raise
            return await self._create()
        spec: JSON = lease.get("spec") or {}
        holder = str(spec.get("holderIdentity") or "")
        record = (holder, str(spec.get("renewTime") or ""))
        now = time.monotonic()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or s.lease_duration)
        if holder and holder != s.identity and now - self._observed_at < duration:
            return False
        return await self._write(lease, renew=holder == s.identity)

    async def _write(self, lease: JSON, renew: bool) -> bool:
        s = self.settings
        spec: JSON = lease.get("spec") or {}
        transitions = int(spec.get("leaseTransitions") or 0)
        stamp = _now_rfc3339()
        body = {
            **lease,
            "spec": {
                "holderIdentity": s.identity,
                "leaseDurationSeconds": int(s.lease_duration),
                "renewTime": stamp,
                "acquireTime": spec.get("acquireTime") if renew else stamp,
                "leaseTransitions": transitions if renew else transitions + 1,
            },
        }
        if self.annotations is not None:
            metadata = dict(body.get("metadata") or {})
            metadata["annotations"] = {**(metadata.get("annotations") or {}), **self.annotations()}
            body["metadata"] = metadata
        try:
            self._lease = await self.kube.replace(LEASES, s.name, body, s.namespace)
        except ApiError as error:
            self._lease = None
            if error.conflict:
                return False
            raise
        self._observed, self._observed_at = (s.identity, stamp), time.monotonic()
        return True

    async def _create(self) -> bool:
        s = self.settings
        stamp = _now_rfc3339()
        body: JSON = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": s.name, "namespace": s.namespace},
            "spec": {
                "holderIdentity": s.identity,
                "leaseDurationSeconds": int(s.lease_duration),
                "acquireTime": stamp,
                "renewTime": stamp,
                "leaseTransitions": 0,
            },
        }
        try:
            self._lease = await self.kube.create(LEASES, body, s.namespace)
        except ApiError as error:
            if error.already_exists:
                return False
            raise
        return True
