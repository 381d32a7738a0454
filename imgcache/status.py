"""Writes ImageCache status and Events from the scheduler's per-node results.

Status records, per image, on how many nodes it is cached, pending or failed, plus Ready
and Degraded conditions. It is written only when it changes, so an idle cluster costs
no API requests. Warning Events go on the ImageCache for what a person must act on.
"""

from __future__ import annotations

import datetime
import uuid
from collections import Counter
from dataclasses import dataclass

import anyio
import structlog

from imgcache.catalogue import Catalogue, CatalogueImage, SourceReport
from imgcache.classify import FailureClass, hint
from imgcache.kube import EVENTS, IMAGECACHES, ApiError, Kube
from imgcache.model import JSON
from imgcache.scheduler import Scheduler

log = structlog.get_logger(__name__)

# Seconds from a node joining, leaving or finishing its prepull to the next status
# write. Nodes often join and finish in batches, and one write covers a whole batch.
_NODE_CHANGE_DELAY = 1.0

# Event reasons, as stable names that users can alert or filter on.
REASON_INVALID_ENTRY = "InvalidEntry"
REASON_PULL_FAILED = "PullFailed"
REASON_THROTTLED = "RegistryThrottled"


@dataclass(frozen=True)
class ImageCounts:
    cached: int = 0
    pending: int = 0
    failed: int = 0


def image_counts(scheduler: Scheduler) -> dict[str, ImageCounts]:
    """Count, for each image hash, the nodes where it is cached, pending or failed."""
    cached: Counter[str] = Counter()
    pending: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    # Warm nodes share one image list and one done set, so nodes without failures are
    # counted once per distinct pair. At thousands of nodes that is a handful of passes.
    shared: Counter[tuple[int, int]] = Counter()
    pairs: dict[tuple[int, int], tuple[list[CatalogueImage], frozenset[str]]] = {}
    for state in scheduler.nodes.values():
        images = scheduler.applicable(state)
        if state.failed:
            for image in images:
                if image.hash in state.done:
                    cached[image.hash] += 1
                elif image.hash in state.failed:
                    failed[image.hash] += 1
                else:
                    pending[image.hash] += 1
            continue
        key = (id(images), id(state.done))
        shared[key] += 1
        pairs[key] = (images, state.done)
    for key, nodes in shared.items():
        images, done = pairs[key]
        for image in images:
            (cached if image.hash in done else pending)[image.hash] += nodes
    hashes = set(cached) | set(pending) | set(failed)
    return {h: ImageCounts(cached[h], pending[h], failed[h]) for h in hashes}


def _condition(kind: str, status: bool, reason: str, message: str, generation: int, previous: list[JSON]) -> JSON:
    value = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    changed = old is None or old.get("status") != value
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": stamp if changed else old.get("lastTransitionTime", stamp),  # type: ignore[union-attr]
    }


def build_status(report: SourceReport, counts: dict[str, ImageCounts], previous: list[JSON]) -> JSON:
    images = []
    invalid = 0
    pending = failed = 0
    counted: set[str] = set()
    for entry in report.entries:
        item: JSON = {"image": entry.image}
        if entry.error:
            invalid += 1
            item["error"] = entry.error
        if entry.resolved:
            item["resolved"] = entry.resolved
        if entry.hash:
            c = counts.get(entry.hash, ImageCounts())
            item.update(cached=c.cached, pending=c.pending, failed=c.failed)
            if entry.hash not in counted:
                # The same image listed twice counts once in the totals.
                counted.add(entry.hash)
                pending += c.pending
                failed += c.failed
        images.append(item)
    valid = len({entry.hash for entry in report.entries if entry.hash and not entry.error})
    if pending:
        ready = (False, "Pulling", f"{pending} image pulls pending across nodes")
    elif valid == 0:
        ready = (False, "NoValidImages", "no entry of spec.images is valid")
    else:
        ready = (True, "Cached", f"{valid} images cached on every matching node")
    if invalid:
        degraded = (True, "InvalidEntries", f"{invalid} entries are invalid; see status.images[].error")
    elif failed:
        degraded = (True, "PullFailures", f"{failed} image pulls failed; see status.images[].failed and imgcache logs")
    else:
        degraded = (False, "AsExpected", "no invalid entries and no failed pulls")
    g = report.generation
    return {
        "observedGeneration": g,
        "imageCount": valid,
        "images": images,
        "conditions": [
            _condition("Ready", *ready, generation=g, previous=previous),
            _condition("Degraded", *degraded, generation=g, previous=previous),
        ],
    }


def _comparable(status: JSON) -> JSON:
    return {
        **status,
        "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions", [])],
    }


class StatusWriter:
    """Periodically writes changed ImageCache statuses and raises Warning Events."""

    def __init__(self, kube: Kube, catalogue: Catalogue, scheduler: Scheduler, interval: float, component: str) -> None:
        self.kube = kube
        self.catalogue = catalogue
        self.scheduler = scheduler
        self.interval = interval
        self.component = component
        self.written: dict[str, JSON] = {}
        self.previous_conditions: dict[str, list[JSON]] = {}
        self._warned: set[tuple[str, str, str]] = set()
        self._nodes_changed = False
        self._wake: anyio.Event | None = None

    def seed(self, obj: JSON) -> None:
        """Remember an object's current status, so an unchanged status is not rewritten."""
        metadata = obj.get("metadata") or {}
        key = f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"
        status = obj.get("status") or {}
        if status:
            self.written.setdefault(key, _comparable(status))
            self.previous_conditions.setdefault(key, list(status.get("conditions") or []))

    def poke(self) -> None:
        """Request a write soon, because a node joined, left or finished its prepull.

        Without it, an ImageCache would stay Ready for up to one interval while a new
        node has none of its images, and turn Ready up to one interval late.
        """
        self._nodes_changed = True
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        while True:
            self._nodes_changed = False
            self._wake = anyio.Event()
            await self.write_all()
            if not self._nodes_changed:
                with anyio.move_on_after(self.interval):
                    await self._wake.wait()
            if self._nodes_changed:
                await anyio.sleep(min(_NODE_CHANGE_DELAY, self.interval))

    async def write_all(self) -> None:
        counts = image_counts(self.scheduler)
        for key, report in list(self.catalogue.reports.items()):
            status = build_status(report, counts, self.previous_conditions.get(key, []))
            if self.written.get(key) == _comparable(status):
                continue
            try:
                await self.kube.merge_patch(
                    IMAGECACHES, report.name, {"status": status}, report.namespace, subresource="status"
                )
            except ApiError as error:
                if not error.not_found:
                    log.warning("status.write_failed", imagecache=key, status=error.status, error=error.message)
                continue
            self.written[key] = _comparable(status)
            self.previous_conditions[key] = status["conditions"]
            await self._warn(key, report, status)

    async def _warn(self, key: str, report: SourceReport, status: JSON) -> None:
        for entry in report.entries:
            if entry.error and (key, entry.image, REASON_INVALID_ENTRY) not in self._warned:
                self._warned.add((key, entry.image, REASON_INVALID_ENTRY))
                await self.event(
                    report,
                    "Warning",
                    REASON_INVALID_ENTRY,
                    f"spec.images entry {entry.image!r} is invalid: {entry.error}",
                )
        for item in status["images"]:
            if item.get("failed") and (key, item["image"], REASON_PULL_FAILED) not in self._warned:
                self._warned.add((key, item["image"], REASON_PULL_FAILED))
                classes = self._failure_classes(item.get("resolved", ""))
                registry = str(item.get("resolved", "")).split("/", 1)[0]
                advice = " ".join(hint(FailureClass(c), registry) for c in sorted(classes))
                await self.event(
                    report,
                    "Warning",
                    REASON_PULL_FAILED,
                    f"{item['image']} failed on {item['failed']} nodes ({', '.join(sorted(classes))}). {advice}",
                )

    def _failure_classes(self, resolved: str) -> set[str]:
        classes: set[str] = set()
        image = next((i for i in self.catalogue.images.values() if str(i.resolved) == resolved), None)
        if image is None:
            return classes
        for state in self.scheduler.nodes.values():
            if image.hash in state.failed:
                value = state.failed[image.hash]
                classes.add(value if value in FailureClass._value2member_map_ else FailureClass.OTHER.value)
        return classes

    async def event(self, report: SourceReport, kind: str, reason: str, message: str) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body: JSON = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{report.name}.{uuid.uuid4().hex[:12]}", "namespace": report.namespace},
            "involvedObject": {
                "apiVersion": "imgcache.io/v1alpha1",
                "kind": "ImageCache",
                "name": report.name,
                "namespace": report.namespace,
                "uid": report.uid,
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "imgcache"},
            "reportingComponent": "imgcache.io/controller",
            "reportingInstance": self.component,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self.kube.create(EVENTS, body, report.namespace)
        except ApiError as error:
            log.warning(
                "event.create_failed",
                imagecache=f"{report.namespace}/{report.name}",
                reason=reason,
                error=error.message,
            )
