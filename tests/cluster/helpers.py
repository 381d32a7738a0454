"""Helpers for cluster tests: ImageCache bodies, polling, and reading imgcache's objects."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

DATA = Path(__file__).resolve().parents[1] / "testbed" / "data" / "eks-addon-images.txt"


def addon_images() -> list[str]:
    """Return the EKS add-on image list the demo and tests use."""
    lines = (line.strip() for line in DATA.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def image_cache(name: str, images: list[dict[str, object]], **spec: object) -> dict[str, object]:
    return {
        "apiVersion": "imgcache.io/v1alpha1",
        "kind": "ImageCache",
        "metadata": {"name": name},
        "spec": {"images": images, **spec},
    }


async def eventually(check: Callable[[], Awaitable[object]], timeout: float = 60.0, interval: float = 0.2) -> object:
    """Await ``check`` until it returns a truthy value, or fail with its last result."""
    last: object = None
    with anyio.move_on_after(timeout):
        while True:
            last = await check()
            if last:
                return last
            await anyio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout:.0f} s; last result: {last!r}")


class PrepullObserver:
    """Watches prepull pods through the API and records what the caps must bound.

    In flight means created and not yet Succeeded, Failed or deleted. Starts per
    registry are counted when the API server reports each pod's creation.
    """

    def __init__(self, api, namespace: str) -> None:  # type: ignore[no-untyped-def]
        self.api = api
        self.namespace = namespace
        self.live: dict[str, tuple[str, str]] = {}
        self.max_total = 0
        self.max_per_node: dict[str, int] = {}
        self.created: list[tuple[float, str, str, str]] = []
        self.names_created: dict[str, int] = {}
        self.simultaneous_same_image = 0

    async def run(self) -> None:
        from kubernetes_asyncio import client as k8s_client
        from kubernetes_asyncio import watch as k8s_watch

        core = k8s_client.CoreV1Api(self.api)
        stream = k8s_watch.Watch()
        async for event in stream.stream(
            core.list_namespaced_pod,
            self.namespace,
            label_selector="app.kubernetes.io/component=prepull",
            timeout_seconds=3600,
        ):
            self._apply(event["type"], event["object"])

    def _apply(self, kind: str, pod) -> None:  # type: ignore[no-untyped-def]
        import time

        name = pod.metadata.name
        node = pod.spec.node_name
        image = pod.metadata.annotations.get("imgcache.io/image", "")
        finished = pod.status.phase in ("Succeeded", "Failed") or pod.metadata.deletion_timestamp is not None
        if kind == "ADDED" and name not in self.live and not finished:
            same = [n for n, (nd, im) in self.live.items() if nd == node and im == image]
            if same:
                self.simultaneous_same_image += 1
            registry = image.split("/", 1)[0]
            self.created.append((time.monotonic(), node, image, registry))
            self.names_created[name] = self.names_created.get(name, 0) + 1
        if kind == "DELETED" or finished:
            self.live.pop(name, None)
        else:
            self.live[name] = (node, image)
        self.max_total = max(self.max_total, len(self.live))
        per_node: dict[str, int] = {}
        for node_name, _ in self.live.values():
            per_node[node_name] = per_node.get(node_name, 0) + 1
        for node_name, count in per_node.items():
            self.max_per_node[node_name] = max(self.max_per_node.get(node_name, 0), count)

    def max_starts_per_window(self, registry: str, window: float) -> int:
        times = sorted(t for t, _, _, r in self.created if r == registry)
        best = 0
        start = 0
        for end, t in enumerate(times):
            while t - times[start] > window:
                start += 1
            best = max(best, end - start + 1)
        return best
