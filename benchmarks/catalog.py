"""Image sets with seeded sizes, the physical lower bound of a warm-up, and shared pod shapes."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from testbed.controller import HELPER_IMAGE
from testbed.kubelet import ImageProfile, KubeletConfig

JSON = dict[str, Any]
MB = 1_000_000

# Compressed image sizes follow a log-normal spread around a 40 MB median with
# sigma 1.2, clipped to 0.3 MB .. 1.5 GB. That spans pause-sized images to large
# application images, as in the add-on list in tests/testbed/data, whose sizes
# range from well under 1 MB (pause) to a few hundred MB (cilium, argocd).
# NOTE: the spread is a stated assumption of this suite, not a measured distribution.
SIZE_MEDIAN = 40 * MB
SIZE_SIGMA = 1.2
SIZE_MIN = 300_000
SIZE_MAX = 1_500 * MB
# The helper image (the Dockerfile's "helper" target), which every prepull and pinner
# pod runs as its init container: Debian bookworm's static busybox, 1.98 MB, or 1.03 MB
# gzip-compressed as a layer is. The image itself was not built here.
HELPER_SIZE = 1_030_000
# The kubelet's registryPullQPS and registryBurst defaults.
KUBELET_PULL_QPS = 5.0
KUBELET_PULL_BURST = 10
# Time a pull spends before its first layer byte: about five sequential requests (token,
# image index, platform manifest, config blob, layer redirect) at 60 ms each.
# NOTE: this value is an estimate, like the size spread, and the page states it.
PULL_LATENCY = 0.3


@dataclass(frozen=True)
class ImageSet:
    """``count`` images on one registry host, with sizes drawn from a seeded RNG."""

    host: str
    sizes: tuple[int, ...]

    @property
    def images(self) -> list[str]:
        return [f"{self.host}/bench/image-{index:02d}:v1" for index in range(len(self.sizes))]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    def profiles(self) -> dict[str, ImageProfile]:
        return {image: ImageProfile(size=size) for image, size in zip(self.images, self.sizes, strict=True)}


def draw_sizes(count: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    sizes = (rng.lognormvariate(math.log(SIZE_MEDIAN), SIZE_SIGMA) for _ in range(count))
    return tuple(int(min(max(size, SIZE_MIN), SIZE_MAX)) for size in sizes)


def lower_bound(
    bytes_per_node: float,
    bandwidth: float,
    requests: int,
    qps: float | None,
    burst: int,
    join_spread: float = 0.0,
) -> dict[str, float]:
    """Return the physical lower bound of a warm-up in simulated seconds, with both terms.

    A node cannot receive its bytes faster than its bandwidth, and the last node joins
    ``join_spread`` seconds after the first. A registry quota admits at most
    ``burst + qps * t`` requests by time t, so ``requests`` need (requests - burst) / qps.
    """
    bandwidth_term = join_spread + bytes_per_node / bandwidth
    quota_term = max(0, requests - burst) / qps if qps else 0.0
    return {"seconds": max(bandwidth_term, quota_term), "bandwidth_term": bandwidth_term, "quota_term": quota_term}


def kubelet_config(bandwidth: float, time_scale: float, **options: Any) -> KubeletConfig:
    """Return the simulator settings that the scenarios share.

    They are the kubelet's back-off of 10 s doubling to 300 s, its default pull limit per
    node, and each pull's round trips before its first byte.
    """
    config = KubeletConfig(
        node_bandwidth=bandwidth,
        default_image_size=50 * MB,
        backoff_initial=10.0,
        backoff_max=300.0,
        registry_pull_qps=KUBELET_PULL_QPS,
        registry_burst=KUBELET_PULL_BURST,
        pull_latency=PULL_LATENCY,
        time_scale=time_scale,
        **options,
    )
    config.images[HELPER_IMAGE] = ImageProfile(size=HELPER_SIZE)
    return config


def image_pod(name: str, node: str, images: list[str], *, keep_running: bool, labels: dict[str, str]) -> JSON:
    """Build a pod that a user would write to pull ``images`` on one node.

    With ``keep_running`` it is a pinner: containers sleep so the images stay in use.
    Otherwise its containers exit at once. The kubelet pulls a pod's images one after
    another, in container order.
    """
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Always" if keep_running else "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 0,
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": f"c{index:02d}",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sleep", "infinity"] if keep_running else ["true"],
                }
                for index, image in enumerate(images)
            ],
        },
    }
