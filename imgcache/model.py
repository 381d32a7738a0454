"""Typed views of the Kubernetes objects imgcache reads.

Watch events arrive as JSON; these constructors keep only the fields the controller uses,
so thousands of nodes cost kilobytes each instead of whole Node objects.
"""

from __future__ import annotations

import datetime
import functools
import sys
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]

# Labels and annotations imgcache puts on what it owns.
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "imgcache"
COMPONENT = "app.kubernetes.io/component"
NODE_LABEL = "imgcache.io/node"
IMAGE_HASH_LABEL = "imgcache.io/image-hash"
IMAGE_ANNOTATION = "imgcache.io/image"
NODE_NAME_ANNOTATION = "imgcache.io/node-name"
# Node annotations that record prepull results, so a restart repeats nothing.
DONE_ANNOTATION = "imgcache.io/prepulled"
FAILED_ANNOTATION = "imgcache.io/prepull-failed"
PROGRESS_ANNOTATION = "imgcache.io/prepull-progress"
# Lease annotation with each registry's adaptive rate and recent throttling.
REGISTRIES_ANNOTATION = "imgcache.io/registries"


def parse_time(text: str | None) -> float:
    """Return a Kubernetes RFC 3339 timestamp as seconds since the epoch (0 if absent)."""
    if not text:
        return 0.0
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@functools.lru_cache(maxsize=4096)
def _hash_set(annotation: str) -> frozenset[str]:
    """Parse a comma-separated hash list once; warm nodes with the same list share the set."""
    return frozenset(sys.intern(h) for h in annotation.split(",") if h)


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str


@dataclass(frozen=True)
class Node:
    """The parts of a Node that prepull and pinning decisions need."""

    name: str
    uid: str
    os: str
    arch: str
    labels: dict[str, str]
    taints: tuple[Taint, ...]
    ready: bool
    created: float
    done: frozenset[str] = frozenset()
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def platform(self) -> str:
        return f"{self.os}/{self.arch}"

    def has_taint(self, key: str) -> bool:
        return any(taint.key == key for taint in self.taints)


def slim_node(obj: JSON) -> JSON:
    """Return the parts of a Node object that ``node_from_json`` and the node watch read.

    A listed Node carries managed fields, addresses, capacity and up to 50 image entries.
    Dropping them page by page keeps a relist of thousands of nodes from holding every
    whole object in memory at once.
    """
    metadata = obj.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    status = obj.get("status") or {}
    info = status.get("nodeInfo") or {}
    read = ("name", "uid", "resourceVersion", "creationTimestamp", "labels")
    return {
        "metadata": {
            **{k: metadata[k] for k in read if k in metadata},
            "annotations": {k: v for k, v in annotations.items() if k in (DONE_ANNOTATION, FAILED_ANNOTATION)},
        },
        "spec": {"taints": (obj.get("spec") or {}).get("taints") or []},
        "status": {
            "conditions": [c for c in status.get("conditions") or [] if c.get("type") == "Ready"],
            "nodeInfo": {k: info[k] for k in ("operatingSystem", "architecture") if k in info},
        },
    }


def node_from_json(obj: JSON) -> Node:
    metadata = obj.get("metadata") or {}
    # Nodes repeat the same label keys and mostly the same values. Parsed JSON gives each
    # node its own copies, which at thousands of nodes outweigh the rest of a Node.
    labels = {sys.intern(str(k)): sys.intern(str(v)) for k, v in (metadata.get("labels") or {}).items()}
    annotations = metadata.get("annotations") or {}
    status = obj.get("status") or {}
    info = status.get("nodeInfo") or {}
    taints = tuple(
        Taint(str(t.get("key", "")), str(t.get("value", "")), str(t.get("effect", "")))
        for t in (obj.get("spec") or {}).get("taints") or []
    )
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    done = _hash_set(str(annotations.get(DONE_ANNOTATION, "")))
    failed: dict[str, str] = {}
    for item in str(annotations.get(FAILED_ANNOTATION, "")).split(","):
        image_hash, _, failure = item.partition(":")
        if image_hash:
            failed[image_hash] = failure or "other"
    return Node(
        name=sys.intern(str(metadata.get("name", ""))),
        uid=str(metadata.get("uid", "")),
        os=labels.get("kubernetes.io/os") or str(info.get("operatingSystem") or "linux"),
        arch=labels.get("kubernetes.io/arch") or str(info.get("architecture") or "amd64"),
        labels=labels,
        taints=taints,
        ready=ready,
        created=parse_time(metadata.get("creationTimestamp")),
        done=done,
        failed=failed,
    )


@dataclass(frozen=True)
class ContainerState:
    """One container's pull-relevant status."""

    name: str
    image_id: str
    waiting_reason: str
    waiting_message: str
    running: bool
    terminated: bool
    exit_code: int | None


@dataclass(frozen=True)
class Pod:
    """An imgcache-owned pod, as far as the scheduler and pinner care."""

    name: str
    namespace: str
    uid: str
    node_name: str
    node_key: str
    image_hash: str
    image: str
    component: str
    phase: str
    reason: str
    created: float
    deleting: bool
    containers: tuple[ContainerState, ...]
    init_containers: tuple[ContainerState, ...]


def _container_states(statuses: list[JSON] | None) -> tuple[ContainerState, ...]:
    states = []
    for status in statuses or []:
        state = status.get("state") or {}
        waiting = state.get("waiting") or {}
        terminated = state.get("terminated")
        states.append(
            ContainerState(
                name=str(status.get("name", "")),
                image_id=str(status.get("imageID") or ""),
                waiting_reason=str(waiting.get("reason") or ""),
                waiting_message=str(waiting.get("message") or ""),
                running="running" in state,
                terminated=terminated is not None,
                exit_code=int(terminated["exitCode"]) if terminated and "exitCode" in terminated else None,
            )
        )
    return tuple(states)


def pod_from_json(obj: JSON) -> Pod:
    metadata = obj.get("metadata") or {}
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    return Pod(
        name=str(metadata.get("name", "")),
        namespace=str(metadata.get("namespace", "")),
        uid=str(metadata.get("uid", "")),
        node_name=str(spec.get("nodeName") or annotations.get(NODE_NAME_ANNOTATION) or ""),
        node_key=str(labels.get(NODE_LABEL, "")),
        image_hash=str(labels.get(IMAGE_HASH_LABEL, "")),
        image=str(annotations.get(IMAGE_ANNOTATION, "")),
        component=str(labels.get(COMPONENT, "")),
        phase=str(status.get("phase") or "Pending"),
        reason=str(status.get("reason") or ""),
        created=parse_time(metadata.get("creationTimestamp")),
        deleting=bool(metadata.get("deletionTimestamp")),
        containers=_container_states(status.get("containerStatuses")),
        init_containers=_container_states(status.get("initContainerStatuses")),
    )
