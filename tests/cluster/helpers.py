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
