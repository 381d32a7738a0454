"""Builders of Node, Pod and ImageCache JSON, and of the typed objects made from them.

The JSON has the fields the API server returns for these objects, so tests go through
``node_from_json`` and ``pod_from_json`` as the controller does.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Iterable, Mapping
from typing import Any

from imgcache.catalogue import Catalogue, CatalogueImage
from imgcache.model import (
    COMPONENT,
    DONE_ANNOTATION,
    FAILED_ANNOTATION,
    IMAGE_ANNOTATION,
    IMAGE_HASH_LABEL,
    JSON,
    MANAGED_BY,
    MANAGER,
    NODE_LABEL,
    NODE_NAME_ANNOTATION,
    Node,
    Pod,
    node_from_json,
    pod_from_json,
)
from imgcache.scheduler import PREPULL_COMPONENT, PREPULL_CONTAINER, Launch, Limits, Scheduler

# 2023-11-14T22:13:20Z, a whole second so that RFC 3339 text round-trips exactly.
EPOCH = 1_700_000_000.0
HELPER_CONTAINER = "install-helper"


def rfc3339(seconds: float) -> str:
    """Format seconds since the epoch as the API server writes timestamps."""
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeClock:
    """Clock for the scheduler and buckets that moves only when a test advances it."""

    def __init__(self, now: float = EPOCH) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- ImageCache --------------------------------------------------------------


def _entry(item: Any) -> Any:
    if isinstance(item, str):
        return {"image": item}
    if isinstance(item, Mapping):
        return dict(item)
    # Anything else goes in as it is, to test malformed entries.
    return item


def imagecache_json(
    name: str,
    images: Iterable[Any],
    namespace: str = "team-a",
    node_selector: Mapping[str, Any] | None = None,
    pull_through_cache: bool | None = None,
    generation: int = 1,
) -> JSON:
    """Build an ImageCache object, where a plain string in ``images`` becomes ``{"image": text}``.

    Items that are neither strings nor maps are kept as they are.
    """
    entries = [_entry(item) for item in images]
    spec: JSON = {"images": entries}
    if node_selector is not None:
        spec["nodeSelector"] = dict(node_selector)
    if pull_through_cache is not None:
        spec["pullThroughCache"] = pull_through_cache
    return {
        "apiVersion": "imgcache.io/v1alpha1",
        "kind": "ImageCache",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{namespace}-{name}",
            "generation": generation,
        },
        "spec": spec,
    }


def catalogue_of(*objects: JSON) -> Catalogue:
    """Return a catalogue without pull-through rules that contains ``objects``."""
    catalogue = Catalogue()
    catalogue.replace(list(objects))
    return catalogue


def image_named(catalogue: Catalogue, resolved: str) -> CatalogueImage:
    """Return the catalogue image whose resolved reference is ``resolved``."""
    for image in catalogue.images.values():
        if str(image.resolved) == resolved:
            return image
    raise KeyError(f"{resolved} is not in the catalogue, which has {sorted(map(str, catalogue.images))}")


# -- Node --------------------------------------------------------------------


def node_json(
    name: str,
    uid: str | None = None,
    os: str = "linux",
    arch: str = "amd64",
    labels: Mapping[str, str] | None = None,
    done: Iterable[str] = (),
    failed: Mapping[str, str] | None = None,
    taints: Iterable[Mapping[str, str]] = (),
    ready: bool = True,
    created: float = EPOCH,
) -> JSON:
    """Build a Node whose imgcache result annotations record ``done`` and ``failed``."""
    annotations: dict[str, str] = {}
    if done:
        annotations[DONE_ANNOTATION] = ",".join(done)
    if failed:
        annotations[FAILED_ANNOTATION] = ",".join(f"{h}:{c}" for h, c in failed.items())
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": uid or f"uid-{name}",
            "creationTimestamp": rfc3339(created),
            "labels": {"kubernetes.io/os": os, "kubernetes.io/arch": arch, **(labels or {})},
            "annotations": annotations,
        },
        "spec": {"taints": [dict(t) for t in taints]},
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "nodeInfo": {"operatingSystem": os, "architecture": arch},
        },
    }


def node(name: str, **fields: Any) -> Node:
    """Return the typed Node of ``node_json(name, **fields)``."""
    return node_from_json(node_json(name, **fields))


# -- prepull Pod -------------------------------------------------------------


def _waiting(reason: str, message: str) -> JSON:
    return {"waiting": {"reason": reason, "message": message}}


def pod_json(
    node_name: str,
    key: str,
    image_hash: str,
    image: str = "",
    name: str | None = None,
    uid: str | None = None,
    phase: str = "Pending",
    created: float = EPOCH,
    deleting: bool = False,
    container_state: JSON | None = None,
    image_id: str = "",
    helper_state: JSON | None = None,
) -> JSON:
    """Build a prepull pod as the prepull worker creates it, with the given status."""
    pod_name = name or f"imgcache-prepull-{key}-{image_hash}"
    metadata: JSON = {
        "name": pod_name,
        "namespace": "imgcache-system",
        "uid": uid or f"uid-{pod_name}",
        "creationTimestamp": rfc3339(created),
        "labels": {
            MANAGED_BY: MANAGER,
            COMPONENT: PREPULL_COMPONENT,
            NODE_LABEL: key,
            IMAGE_HASH_LABEL: image_hash,
        },
        "annotations": {IMAGE_ANNOTATION: image, NODE_NAME_ANNOTATION: node_name},
    }
    if deleting:
        metadata["deletionTimestamp"] = rfc3339(created + 1)
    status: JSON = {"phase": phase}
    if container_state is not None or image_id:
        status["containerStatuses"] = [{"name": PREPULL_CONTAINER, "imageID": image_id, "state": container_state or {}}]
    if helper_state is not None:
        status["initContainerStatuses"] = [{"name": HELPER_CONTAINER, "imageID": "", "state": helper_state}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"nodeName": node_name},
        "status": status,
    }


def launched_pod(launch: Launch, **state: Any) -> Pod:
    """Return the pod that ``launch`` creates, in the state that the ``pod_in_state`` keywords describe."""
    return pod_from_json(
        pod_in_state(launch.node.name, launch.key, launch.image.hash, str(launch.image.resolved), **state)
    )


def pod_in_state(
    node_name: str,
    key: str,
    image_hash: str,
    image: str,
    state: str = "pending",
    reason: str = "ErrImagePull",
    message: str = "",
    created: float = EPOCH,
    uid: str | None = None,
    deleting: bool = False,
) -> JSON:
    """Build a prepull pod in one state: pending, running, succeeded, pull_error or failed.

    ``reason`` and ``message`` are the prepull container's waiting reason and message
    in the pull_error state.
    """
    common: dict[str, Any] = {"image": image, "created": created, "uid": uid, "deleting": deleting}
    if state == "pending":
        return pod_json(node_name, key, image_hash, **common)
    if state == "running":
        return pod_json(
            node_name,
            key,
            image_hash,
            phase="Running",
            container_state={"running": {}},
            image_id=f"{image}@sha256:{'a' * 64}",
            **common,
        )
    if state == "succeeded":
        return pod_json(
            node_name,
            key,
            image_hash,
            phase="Succeeded",
            container_state={"terminated": {"exitCode": 0, "reason": "Completed"}},
            image_id=f"{image}@sha256:{'a' * 64}",
            **common,
        )
    if state == "pull_error":
        return pod_json(node_name, key, image_hash, container_state=_waiting(reason, message), **common)
    if state == "failed":
        return pod_json(node_name, key, image_hash, phase="Failed", **common)
    raise ValueError(f"unknown pod state {state!r}")


# -- Scheduler ---------------------------------------------------------------


def scheduler_for(
    catalogue: Catalogue, clock: FakeClock | None = None, seed: int = 7, **limits: Any
) -> tuple[Scheduler, FakeClock]:
    """Return a scheduler with a fake clock, a seeded random source and ``Limits(**limits)``."""
    clock = clock or FakeClock()
    return Scheduler(catalogue, Limits(**limits), clock=clock, rng=random.Random(seed)), clock


def registry_images(registry: str, count: int, prefix: str = "app") -> list[str]:
    """Return ``count`` distinct image references on ``registry``."""
    return [f"{registry}/{prefix}{index}:v1" for index in range(count)]
