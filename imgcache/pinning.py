"""Keeps the pinner DaemonSets in the cluster equal to what the catalogue requests.

Changes are debounced, so a burst of ImageCache edits causes one rollout. A DaemonSet
that someone edits or deletes is restored, and one with no images left is deleted.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import structlog

from imgcache.catalogue import Catalogue
from imgcache.kube import DAEMONSETS, ApiError, Kube
from imgcache.metrics import Metrics
from imgcache.model import COMPONENT, JSON, MANAGED_BY, MANAGER, Node
from imgcache.pinner import PINNER_COMPONENT, SPEC_HASH_ANNOTATION, PinnerOptions, desired_daemonsets

log = structlog.get_logger(__name__)

SELECTOR = f"{MANAGED_BY}={MANAGER},{COMPONENT}={PINNER_COMPONENT}"


def _name(obj: JSON) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


class PinnerReconciler:
    """Applies desired pinner DaemonSets with server-side apply; see the module docstring."""

    def __init__(
        self,
        kube: Kube,
        catalogue: Catalogue,
        nodes: Callable[[], list[Node]],
        options: PinnerOptions,
        metrics: Metrics,
        debounce: float,
    ) -> None:
        self.kube = kube
        self.catalogue = catalogue
        self.nodes = nodes
        self.options = options
        self.metrics = metrics
        self.debounce = debounce
        self.existing: dict[str, JSON] = {}
        # Generation of each DaemonSet right after imgcache applied it; any other
        # value means someone else changed the spec.
        self.applied_generation: dict[str, int] = {}
        self.applies = 0
        self._changed = anyio.Event()

    # -- triggers ----------------------------------------------------------

    def request(self) -> None:
        self._changed.set()

    # -- watch Handler for DaemonSets --------------------------------------

    def replace(self, objects: list[JSON]) -> None:
        self.existing = {_name(obj): obj for obj in objects}
        self.request()

    def upsert(self, obj: JSON) -> None:
        name = _name(obj)
        self.existing[name] = obj
        generation = int((obj.get("metadata") or {}).get("generation") or 0)
        applied = self.applied_generation.get(name)
        if applied is not None and generation != applied:
            log.info("pinner.drift", daemonset=name, generation=generation, applied_generation=applied)
            self.request()

    def remove(self, obj: JSON) -> None:
        name = _name(obj)
        self.existing.pop(name, None)
        if name in self.applied_generation:
            log.info("pinner.drift", daemonset=name, deleted=True)
            self.applied_generation.pop(name, None)
            self.request()

    # -- loop --------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile after each quiet period following a change, until cancelled."""
        while True:
            await self._changed.wait()
            await self._quiet()
            await self.reconcile()

    async def _quiet(self) -> None:
        # Wait until no change arrived for one debounce period, but at most four.
        with anyio.move_on_after(self.debounce * 4):
            while True:
                self._changed = anyio.Event()
                with anyio.move_on_after(self.debounce):
                    await self._changed.wait()
                    continue
                break
        self._changed = anyio.Event()

    async def reconcile(self) -> None:
        desired = desired_daemonsets(self.catalogue, self.nodes(), self.options)
        self.metrics.pinner_daemonsets.set(len(desired))
        for name, body in desired.items():
            if self._up_to_date(name, body):
                continue
            await self._apply(name, body)
        for name in sorted(set(self.existing) - set(desired)):
            await self._delete(name)

    def _up_to_date(self, name: str, body: JSON) -> bool:
        current = self.existing.get(name)
        if current is None:
            return False
        metadata = current.get("metadata") or {}
        wanted = body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        if (metadata.get("annotations") or {}).get(SPEC_HASH_ANNOTATION) != wanted:
            return False
        generation = int(metadata.get("generation") or 0)
        applied = self.applied_generation.setdefault(name, generation)
        return applied == generation

    async def _apply(self, name: str, body: JSON) -> None:
        try:
            result = await self.kube.apply(DAEMONSETS, name, body, self.options.namespace)
        except ApiError as error:
            log.error("pinner.apply_failed", daemonset=name, status=error.status, error=error.message)
            self.request()
            return
        self.applies += 1
        metadata = result.get("metadata") or {}
        self.applied_generation[name] = int(metadata.get("generation") or 0)
        self.existing[name] = result
        containers = len(body["spec"]["template"]["spec"]["containers"])
        log.info("pinner.applied", daemonset=name, images=containers, generation=self.applied_generation[name])

    async def _delete(self, name: str) -> None:
        try:
            await self.kube.delete(DAEMONSETS, name, self.options.namespace)
        except ApiError as error:
            log.error("pinner.delete_failed", daemonset=name, status=error.status, error=error.message)
            self.request()
            return
        self.existing.pop(name, None)
        self.applied_generation.pop(name, None)
        log.info("pinner.deleted", daemonset=name)
