"""The prepull worker's run loop, driven with a scheduler, a fake clock and a recording API."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from imgcache.kube import PODS, Resource
from imgcache.metrics import Metrics
from imgcache.prepull import PrepullWorker
from imgcache.scheduler import DeletePod, Launch, Scheduler
from unit.factories import (
    FakeClock,
    catalogue_of,
    imagecache_json,
    launched_pod,
    node,
    registry_images,
    scheduler_for,
)

REGISTRY = "registry.example.test"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RecordingKube:
    """Records creates and deletes and accepts every one."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.first_create = anyio.Event()
        self.first_delete = anyio.Event()

    async def create(self, resource: Resource, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        self.created.append(body["metadata"]["name"])
        self.first_create.set()
        return body

    async def delete(self, resource: Resource, name: str, namespace: str | None = None, **options: Any) -> bool:
        assert resource == PODS
        self.deleted.append(name)
        self.first_delete.set()
        return True


def make_worker(pod_deadline: float) -> tuple[PrepullWorker, Scheduler, FakeClock, RecordingKube]:
    catalogue = catalogue_of(imagecache_json("images", registry_images(REGISTRY, 1), namespace="platform"))
    scheduler, clock = scheduler_for(catalogue, pod_deadline=pod_deadline)
    kube = RecordingKube()
    worker = PrepullWorker(
        kube,  # type: ignore[arg-type]
        scheduler,
        catalogue,
        Metrics(),
        namespace="cache",
        helper_image="registry.example.test/imgcache:1",
        host_network=True,
        pod_deadline=int(pod_deadline),
        progress_interval=60.0,
        clock=clock,
    )
    return worker, scheduler, clock, kube


async def wait_for(event: anyio.Event, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        await event.wait()


@pytest.mark.anyio
async def test_expiry_searches_rate_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    worker, scheduler, _, kube = make_worker(pod_deadline=600.0)
    searches: list[None] = []
    search = scheduler.expired_pods

    def counted() -> list[DeletePod]:
        searches.append(None)
        return search()

    monkeypatch.setattr(scheduler, "expired_pods", counted)

    async with anyio.create_task_group() as group:
        group.start_soon(worker.run)
        worker.node_upserted(node("n1"), "1")
        await wait_for(kube.first_create)
        for _ in range(50):
            worker.wake()
            await anyio.sleep(0.001)
        group.cancel_scope.cancel()

    assert len(searches) == 1


@pytest.mark.anyio
async def test_expired_pod_deleted_by_worker() -> None:
    worker, scheduler, clock, kube = make_worker(pod_deadline=600.0)

    async with anyio.create_task_group() as group:
        group.start_soon(worker.run)
        worker.node_upserted(node("n1"), "1")
        await wait_for(kube.first_create)
        ((pod_name, launch),) = [(name, launch) for name, launch in _launches(scheduler) if name == kube.created[0]]
        worker.pod_upserted(launched_pod(launch))
        clock.advance(601)
        # The next search runs on the first wake-up one second or more after the last one.
        await anyio.sleep(1.05)
        worker.wake()
        await wait_for(kube.first_delete)
        group.cancel_scope.cancel()

    assert kube.deleted == [pod_name]
    expired = worker.metrics.registry.get_sample_value("imgcache_prepull_pods_total", {"outcome": "deadline_exceeded"})
    assert expired == 1


def _launches(scheduler: Scheduler) -> list[tuple[str, Launch]]:
    """Return (pod name, Launch) of every in-flight pod, rebuilt from the scheduler's state."""
    found = []
    for state in scheduler.nodes.values():
        for image_hash, name in state.inflight.items():
            image = scheduler.catalogue.images[image_hash]
            found.append((name, Launch(state.node, state.key, image, name)))
    return found
