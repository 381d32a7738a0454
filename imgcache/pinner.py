"""Pinner: DaemonSets that keep one sleeping container per cached image on every node.

The kubelet's image GC never removes an image that a container on the node still uses,
so a running pin keeps the image. There is one DaemonSet per node platform and node
selector, each container visible in the template so Karpenter and the scheduler count it.
Updates roll out with ``maxSurge`` and ``maxUnavailable: 0``: a node keeps its old pins
until the new pod runs, so nothing is ever unpinned during a change.

When the prepuller brings an image to every node that pins it, the pin's pull policy is
``Never``. The pin then waits for the prepulled image instead of pulling it, because a
pinner pod on each of a hundred new nodes would otherwise pull every image at once,
outside the prepuller's registry rate limit. The kubelet retries a ``Never`` container
about every 10 s, so the pin starts soon after its image arrives.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from imgcache.catalogue import SUPPORTED_OS, Catalogue, CatalogueImage, Scope
from imgcache.model import JSON, Node
from imgcache.podspec import (
    HELPER,
    helper_init_container,
    helper_volume,
    image_container,
    labels,
    pod_security,
    tolerate_everything,
)

PINNER_COMPONENT = "pinner"
DAEMONSET_LABEL = "imgcache.io/pinner"
SPEC_HASH_ANNOTATION = "imgcache.io/spec-hash"
IMAGES_HASH_ANNOTATION = "imgcache.io/images-hash"
# Maximum sleep that busybox accepts on every architecture (2^31 - 1 seconds, 68 years).
SLEEP_SECONDS = "2147483647"


@dataclass(frozen=True)
class PinnerOptions:
    namespace: str
    helper_image: str
    priority_class: str | None
    host_network: bool
    max_surge: str = "25%"
    # Whether imgcache prepulls; pins of prepulled images then never pull themselves.
    prepull: bool = False


@dataclass(frozen=True)
class Group:
    """Images pinned together: one platform and one node selector."""

    os: str
    arch: str
    selector: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        name = f"imgcache-pinner-{self.os}-{self.arch}"
        if self.selector:
            digest = hashlib.sha256(json.dumps(self.selector).encode()).hexdigest()[:8]
            name += f"-{digest}"
        return name


def _platforms(nodes: Iterable[Node]) -> set[tuple[str, str]]:
    return {(node.os, node.arch) for node in nodes if node.os == SUPPORTED_OS}


def _fits_platform(selector: tuple[tuple[str, str], ...], os: str, arch: str) -> bool:
    """Return False when a selector names another OS or architecture than the platform."""
    labels = dict(selector)
    return labels.get("kubernetes.io/os", os) == os and labels.get("kubernetes.io/arch", arch) == arch


def group_images(catalogue: Catalogue, nodes: Iterable[Node]) -> dict[Group, list[CatalogueImage]]:
    """Assign every pinned image to the DaemonSets whose nodes need it.

    Groups exist for every platform that has nodes, also where no node matches a selector
    yet, so that a matching node that joins later is pinned by the DaemonSet controller at
    once. An image pinned with a broader selector on a platform is left out of narrower
    selectors' DaemonSets on that platform, so a node does not run two pins of one image.
    """
    platforms = _platforms(nodes)
    groups: dict[Group, dict[str, CatalogueImage]] = {}
    for image in catalogue.pinned():
        scopes: list[Scope] = [s for s in image.scopes if s.pin]
        for os, arch in sorted(platforms):
            selectors = {
                s.node_selector
                for s in scopes
                if s.allows_platform(os, arch) and _fits_platform(s.node_selector, os, arch)
            }
            for selector in selectors:
                if any(set(other) < set(selector) for other in selectors):
                    continue
                groups.setdefault(Group(os, arch, selector), {})[image.hash] = image
    return {group: sorted(images.values(), key=lambda i: i.hash) for group, images in groups.items()}


def prepulled_on_group(image: CatalogueImage, group: Group) -> bool:
    """Return whether some prepull declaration of ``image`` covers every node of ``group``."""
    return any(
        scope.prepull
        and scope.allows_platform(group.os, group.arch)
        and set(scope.node_selector) <= set(group.selector)
        for scope in image.scopes
    )


def pull_policy(image: CatalogueImage, group: Group, options: PinnerOptions) -> str:
    return "Never" if options.prepull and prepulled_on_group(image, group) else "IfNotPresent"


def images_hash(images: list[CatalogueImage]) -> str:
    return hashlib.sha256("\n".join(str(i.resolved) for i in images).encode()).hexdigest()[:16]


def daemonset(group: Group, images: list[CatalogueImage], options: PinnerOptions) -> JSON:
    """Build the desired DaemonSet for one group, with a hash of its spec in an annotation."""
    selector_labels = {DAEMONSET_LABEL: group.name}
    pod_labels = labels(PINNER_COMPONENT, **selector_labels)
    node_selector = {"kubernetes.io/os": group.os, "kubernetes.io/arch": group.arch, **dict(group.selector)}
    pod_spec: JSON = {
        "nodeSelector": node_selector,
        "tolerations": tolerate_everything(),
        "hostNetwork": options.host_network,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # busybox sleep as PID 1 ignores SIGTERM, so a short grace period ends it quickly.
        "terminationGracePeriodSeconds": 2,
        "securityContext": pod_security(),
        "initContainers": [helper_init_container(options.helper_image)],
        "containers": [
            image_container(
                f"pin-{image.hash}",
                str(image.resolved),
                [HELPER, "sleep", SLEEP_SECONDS],
                pull_policy(image, group, options),
            )
            for image in images
        ],
        "volumes": [helper_volume()],
    }
    if options.priority_class:
        pod_spec["priorityClassName"] = options.priority_class
    digest = images_hash(images)
    spec: JSON = {
        "selector": {"matchLabels": {**selector_labels}},
        "updateStrategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": options.max_surge, "maxUnavailable": 0},
        },
        "template": {
            "metadata": {"labels": pod_labels, "annotations": {IMAGES_HASH_ANNOTATION: digest}},
            "spec": pod_spec,
        },
    }
    spec_hash = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": group.name,
            "namespace": options.namespace,
            "labels": labels(PINNER_COMPONENT, **selector_labels),
            "annotations": {SPEC_HASH_ANNOTATION: spec_hash, IMAGES_HASH_ANNOTATION: digest},
        },
        "spec": spec,
    }


def desired_daemonsets(catalogue: Catalogue, nodes: Iterable[Node], options: PinnerOptions) -> dict[str, JSON]:
    return {
        group.name: daemonset(group, images, options)
        for group, images in group_images(catalogue, nodes).items()
        if images
    }
