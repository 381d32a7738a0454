"""Pod template parts shared by pinner and prepull pods.

Cached images may be scratch or distroless images with no shell and no ``sleep``. An init
container therefore copies a static busybox from imgcache's own image into an emptyDir,
and the image's container runs that copy. Every container is locked down the same way.
"""

from __future__ import annotations

from typing import Any

from imgcache.model import COMPONENT, MANAGED_BY, MANAGER

# Path of Debian's statically linked busybox inside the imgcache image.
HELPER_SOURCE = "/usr/local/lib/imgcache/busybox"
HELPER_DIR = "/imgcache"
HELPER = f"{HELPER_DIR}/busybox"
HELPER_VOLUME = "imgcache-helper"
RUN_AS = 65532

JSON = dict[str, Any]


def labels(component: str, **extra: str) -> dict[str, str]:
    return {MANAGED_BY: MANAGER, COMPONENT: component, "app.kubernetes.io/name": "imgcache", **extra}


def container_security() -> JSON:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security() -> JSON:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def helper_init_container(helper_image: str) -> JSON:
    return {
        "name": "install-helper",
        "image": helper_image,
        "imagePullPolicy": "IfNotPresent",
        "command": [HELPER_SOURCE, "cp", HELPER_SOURCE, HELPER],
        "volumeMounts": [{"name": HELPER_VOLUME, "mountPath": HELPER_DIR}],
        "resources": _tiny_resources(),
        "securityContext": container_security(),
    }


def helper_volume() -> JSON:
    return {"name": HELPER_VOLUME, "emptyDir": {"sizeLimit": "16Mi"}}


def image_container(name: str, image: str, command: list[str], pull_policy: str = "IfNotPresent") -> JSON:
    return {
        "name": name,
        "image": image,
        # IfNotPresent or Never even for :latest, so that a pin never pulls again by itself.
        "imagePullPolicy": pull_policy,
        "command": command,
        "volumeMounts": [{"name": HELPER_VOLUME, "mountPath": HELPER_DIR, "readOnly": True}],
        "resources": _tiny_resources(),
        "securityContext": container_security(),
    }


def _tiny_resources() -> JSON:
    # busybox sleep needs well under 1 MiB; the limits only guard against a surprise.
    return {
        "requests": {"cpu": "1m", "memory": "4Mi"},
        "limits": {"cpu": "10m", "memory": "16Mi"},
    }


def tolerate_everything() -> list[JSON]:
    return [{"operator": "Exists"}]
