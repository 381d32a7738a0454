"""Turns the kubelet's image-pull Events into latency, size and throttling metrics.

The kubelet reports each pull's duration only in the message of its ``Pulled`` Event,
so that message is parsed (every historical format, see kubelet_events). Events are
processed once each: an Event's count grows when the kubelet repeats it, and only the
increase is counted.
"""

from __future__ import annotations

import structlog

from imgcache.classify import FailureClass, classify
from imgcache.kubelet_events import parse_pulled
from imgcache.metrics import Metrics
from imgcache.model import JSON, parse_time
from imgcache.reference import InvalidReference, parse

log = structlog.get_logger(__name__)

_IMAGE_PREFIX = 'Failed to pull image "'


def _registry(image: str) -> str:
    try:
        return parse(image).registry
    except InvalidReference:
        return "unknown"


class PullEventObserver:
    """Watch Handler for core/v1 Events; see the module docstring."""

    def __init__(self, metrics: Metrics, own_namespace: str, started: float) -> None:
        self.metrics = metrics
        self.own_namespace = own_namespace
        self.started = started
        self.seen: dict[str, int] = {}

    def replace(self, objects: list[JSON]) -> None:
        for obj in objects:
            self._observe(obj, initial=True)

    def upsert(self, obj: JSON) -> None:
        self._observe(obj, initial=False)

    def remove(self, obj: JSON) -> None:
        uid = str((obj.get("metadata") or {}).get("uid", ""))
        self.seen.pop(uid, None)

    def _observe(self, obj: JSON, initial: bool) -> None:
        reason = obj.get("reason")
        if reason not in ("Pulled", "Failed"):
            return
        uid = str((obj.get("metadata") or {}).get("uid", ""))
        count = int(obj.get("count") or 1)
        previous = self.seen.get(uid, 0)
        self.seen[uid] = count
        if count <= previous:
            return
        last = parse_time(
            obj.get("lastTimestamp") or obj.get("eventTime") or (obj.get("metadata") or {}).get("creationTimestamp")
        )
        if initial and last and last < self.started:
            return  # Already counted by the process that ran before this one.
        message = str(obj.get("message") or "")
        if reason == "Pulled":
            self._pulled(message)
        else:
            self._failed(obj, message)

    def _pulled(self, message: str) -> None:
        pulled = parse_pulled(message)
        if pulled is None:
            log.debug("events.unparsed_pulled", message=message)
            return
        registry = _registry(pulled.image)
        if pulled.already_present:
            self.metrics.pull_cached.labels(registry=registry).inc()
            return
        if pulled.pull_seconds is not None:
            self.metrics.pull_duration.labels(registry=registry).observe(pulled.pull_seconds)
        if pulled.total_seconds is not None:
            self.metrics.pull_wait_duration.labels(registry=registry).observe(pulled.total_seconds)
        if pulled.size_bytes is not None:
            self.metrics.pull_size.labels(registry=registry).observe(pulled.size_bytes)

    def _failed(self, obj: JSON, message: str) -> None:
        # imgcache's own prepull pods are classified from their container status by the
        # scheduler; here only other workloads' pulls count, for the cluster-wide view.
        involved = obj.get("involvedObject") or {}
        if involved.get("namespace") == self.own_namespace or not message.startswith(_IMAGE_PREFIX):
            return
        image = message[len(_IMAGE_PREFIX) :].split('"', 1)[0]
        registry = _registry(image)
        failure = classify(message)
        self.metrics.pull_failures.labels(registry=registry, **{"class": failure.value}).inc()
        if failure is FailureClass.THROTTLED:
            self.metrics.registry_throttled.labels(registry=registry, source="kubelet").inc()
