"""The prepull scheduler against the real control plane, with imgcache as its ServiceAccount."""

from __future__ import annotations

import json

import anyio
import pytest
from kubernetes_asyncio import client as k8s_client

from cluster.helpers import PrepullObserver, eventually, image_cache
from imgcache.reference import parse
from testbed.controller import HELPER_IMAGE, NAMESPACE
from testbed.kubelet import FailureKind, FailureRule, ImageProfile, RegistryProfile

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

FAST = (
    "--pinner=false",
    "--pin-debounce=0.5",
    "--status-interval=1",
    "--progress-interval=0.5",
    "--retry-initial=0.5",
    "--retry-max=2",
)


def images_of(registry: str, count: int) -> list[str]:
    return [f"{registry}/team/app{i}:v1" for i in range(count)]


async def create_cache(custom, namespace: str, name: str, images: list[dict[str, object]], **spec: object) -> None:
    body = image_cache(name, images, **spec)
    await custom.create_namespaced_custom_object("imgcache.io", "v1alpha1", namespace, "imagecaches", body)


async def node_progress(api, name: str) -> dict[str, int] | None:
    node = await k8s_client.CoreV1Api(api).read_node(name)
    raw = (node.metadata.annotations or {}).get("imgcache.io/prepull-progress")
    return json.loads(raw) if raw else None


async def warm(api, name: str, done: int) -> bool:
    progress = await node_progress(api, name)
    return progress is not None and progress["done"] == done and progress["pending"] == 0


async def prepull_pods(api) -> list[k8s_client.V1Pod]:
    core = k8s_client.CoreV1Api(api)
    return (await core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/component=prepull")).items


def held(kubelet, node: str) -> set[str]:
    """Return the catalogue images a node holds, without the helper image every pod pulls."""
    return {str(parse(i)) for i in kubelet.images(node)} - {HELPER_IMAGE}


async def test_new_node_gets_all_images_within_caps(api_client, custom, namespace, nodes, kubelet, start_controller):
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=0.6)))
    kubelet.set_registry("ghcr.io", RegistryProfile(images=ImageProfile(pull_seconds=0.6)))
    images = images_of("quay.io", 12) + images_of("ghcr.io", 12)
    observer = PrepullObserver(api_client, NAMESPACE)
    async with anyio.create_task_group() as group:
        group.start_soon(observer.run)
        await start_controller(
            *FAST, "--max-inflight=6", "--max-inflight-per-node=4", "--registry-qps=3", "--registry-burst=3"
        )
        await create_cache(custom, namespace, "caps", [{"image": i} for i in images])
        names = await nodes.create(2, arch="amd64")
        for name in names:
            await eventually(lambda name=name: warm(api_client, name, len(images)), timeout=120)
        group.cancel_scope.cancel()
    for name in names:
        assert {str(parse(i)) for i in images} <= held(kubelet, name)
    assert observer.max_total <= 6
    assert max(observer.max_per_node.values()) <= 4
    # Burst 3 plus 3 per second: at most 3 + 3 * 2 starts in any 2-second window.
    assert observer.max_starts_per_window("quay.io", 2.0) <= 9
    assert observer.max_starts_per_window("ghcr.io", 2.0) <= 9
    assert observer.simultaneous_same_image == 0
    assert await eventually(lambda: _no_prepull_pods(api_client))


async def _no_prepull_pods(api) -> bool:
    return not await prepull_pods(api)


async def test_second_node_not_behind_backlog(api_client, custom, namespace, nodes, kubelet, start_controller):
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=1.0)))
    images = images_of("quay.io", 30)
    observer = PrepullObserver(api_client, NAMESPACE)
    async with anyio.create_task_group() as group:
        group.start_soon(observer.run)
        await start_controller(*FAST, "--max-inflight=3", "--max-inflight-per-node=3", "--registry-qps=50")
        await create_cache(custom, namespace, "fair", [{"image": i} for i in images])
        (first,) = await nodes.create(1, arch="amd64")
        await eventually(lambda: _started_on(observer, first, 4), timeout=60)
        (second,) = await nodes.create(1, arch="amd64")
        await eventually(lambda: _started_on(observer, second, 1), timeout=60)
        first_done_before = sum(1 for _, node, _, _ in observer.created if node == first)
        group.cancel_scope.cancel()
    # The second node started while the first still had most of its 30 images left.
    assert first_done_before < 12


async def _started_on(observer: PrepullObserver, node: str, count: int) -> bool:
    return sum(1 for _, n, _, _ in observer.created if n == node) >= count


async def test_prepull_false_and_filters(api_client, custom, namespace, nodes, kubelet, start_controller):
    await start_controller(*FAST)
    await create_cache(
        custom,
        namespace,
        "filters",
        [
            {"image": "quay.io/team/everywhere:v1"},
            {"image": "quay.io/team/pin-only:v1", "prepull": False},
            {"image": "quay.io/team/arm-only:v1", "platforms": ["linux/arm64"]},
        ],
    )
    await create_cache(custom, namespace, "gpu", [{"image": "quay.io/team/cuda:v1"}], nodeSelector={"pool": "gpu"})
    (amd,) = await nodes.create(1, arch="amd64")
    (arm,) = await nodes.create(1, arch="arm64", labels={"pool": "gpu"})
    (win,) = await nodes.create(1, arch="amd64", os="windows")
    await eventually(lambda: warm(api_client, amd, 1))
    await eventually(lambda: warm(api_client, arm, 3))
    assert held(kubelet, amd) == {"quay.io/team/everywhere:v1"}
    assert held(kubelet, arm) == {"quay.io/team/everywhere:v1", "quay.io/team/arm-only:v1", "quay.io/team/cuda:v1"}
    assert held(kubelet, win) == set()
    assert await node_progress(api_client, win) is None


async def test_permanent_stop_transient_retry(api_client, custom, namespace, nodes, kubelet, start_controller):
    kubelet.add_failure(FailureRule(FailureKind.NOT_FOUND, image="quay.io/team/missing:v1"))
    kubelet.add_failure(FailureRule(FailureKind.TIMEOUT, image="quay.io/team/flaky:v1", attempts=2))
    controller = await start_controller(*FAST)
    await create_cache(
        custom,
        namespace,
        "failures",
        [
            {"image": "quay.io/team/missing:v1"},
            {"image": "quay.io/team/flaky:v1"},
            {"image": "quay.io/team/fine:v1"},
        ],
    )
    (name,) = await nodes.create(1, arch="amd64")

    async def settled() -> dict[str, int] | None:
        progress = await node_progress(api_client, name)
        return progress if progress and progress["pending"] == 0 else None

    progress = await eventually(settled, timeout=90)
    assert progress["done"] == 2
    assert progress["failed"] == 1
    assert held(kubelet, name) == {"quay.io/team/flaky:v1", "quay.io/team/fine:v1"}
    node = await k8s_client.CoreV1Api(api_client).read_node(name)
    assert node.metadata.annotations["imgcache.io/prepull-failed"].endswith(":not_found")
    missing_attempts = kubelet.node_requests[name].failed
    await anyio.sleep(3)
    assert kubelet.node_requests[name].failed == missing_attempts
    failures = [e for e in controller.logs() if e.get("event") == "pull.failed"]
    classes = {(e["image"], e["failure_class"], e["permanent"]) for e in failures}
    assert ("quay.io/team/missing:v1", "not_found", True) in classes
    assert ("quay.io/team/flaky:v1", "network", False) in classes
    assert all("hint" in e and e["hint"] for e in failures)


async def test_node_deleted_mid_prepull(api_client, custom, namespace, nodes, kubelet, start_controller):
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=5.0)))
    await start_controller(*FAST, "--max-inflight-per-node=3")
    await create_cache(custom, namespace, "churn", [{"image": i} for i in images_of("quay.io", 8)])
    (name,) = await nodes.create(1, arch="amd64")

    async def some_pods() -> bool:
        return any(p.spec.node_name == name for p in await prepull_pods(api_client))

    await eventually(some_pods)
    await nodes.delete([name])

    async def none_left() -> bool:
        return not any(p.spec.node_name == name for p in await prepull_pods(api_client))

    assert await eventually(none_left, timeout=30)
    await anyio.sleep(2)
    assert not any(p.spec.node_name == name for p in await prepull_pods(api_client))


async def test_kill_and_restart_mid_prepull(api_client, custom, namespace, nodes, kubelet, start_controller):
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=0.8)))
    images = images_of("quay.io", 16)
    observer = PrepullObserver(api_client, NAMESPACE)
    async with anyio.create_task_group() as group:
        group.start_soon(observer.run)
        first = await start_controller(*FAST, "--max-inflight-per-node=3", identity="before-crash")
        await create_cache(custom, namespace, "crash", [{"image": i} for i in images])
        names = await nodes.create(3, arch="amd64")
        await eventually(lambda: _started_on(observer, names[0], 4), timeout=60)
        await anyio.to_thread.run_sync(first.kill)
        await start_controller(
            *FAST,
            "--max-inflight-per-node=3",
            "--lease-duration=3",
            "--renew-deadline=2",
            "--retry-period=0.5",
            identity="after-crash",
        )
        for name in names:
            await eventually(lambda name=name: warm(api_client, name, len(images)), timeout=120)
        group.cancel_scope.cancel()
    assert observer.simultaneous_same_image == 0
    for name in names:
        pulls = [
            r
            for r in kubelet.pull_log
            if r.node == name and r.error is None and r.finished_at and r.image != HELPER_IMAGE
        ]
        pulled = [r.image for r in pulls]
        assert len(pulled) == len(set(pulled)), f"an image was pulled twice on {name}"
        assert {str(parse(i)) for i in images} <= held(kubelet, name)
    assert await eventually(lambda: _no_prepull_pods(api_client))


async def test_startup_taint_removed(api_client, custom, namespace, nodes, kubelet, start_controller):
    kubelet.add_failure(FailureRule(FailureKind.TIMEOUT, image="quay.io/team/never:v1"))
    taint = {"key": "imgcache.io/warming", "value": "true", "effect": "NoSchedule"}
    await start_controller(
        *FAST, "--startup-taint=imgcache.io/warming", "--startup-taint-deadline=15", "--prepull-deadline=600"
    )
    await create_cache(custom, namespace, "taint", [{"image": "quay.io/team/ok:v1"}], nodeSelector={"pool": "ok"})
    await create_cache(
        custom, namespace, "taint-bad", [{"image": "quay.io/team/never:v1"}], nodeSelector={"pool": "bad"}
    )
    (good,) = await nodes.create(1, arch="amd64", labels={"pool": "ok"}, taints=[taint])
    (bad,) = await nodes.create(1, arch="amd64", labels={"pool": "bad"}, taints=[taint])
    (other,) = await nodes.create(
        1, arch="amd64", labels={"pool": "ok"}, taints=[{"key": "other", "value": "x", "effect": "NoSchedule"}]
    )
    core = k8s_client.CoreV1Api(api_client)

    async def untainted(name: str) -> bool:
        node = await core.read_node(name)
        return not any(t.key == "imgcache.io/warming" for t in node.spec.taints or [])

    started = anyio.current_time()
    await eventually(lambda: untainted(good), timeout=30)
    assert anyio.current_time() - started < 15
    assert not await untainted(bad)
    await eventually(lambda: untainted(bad), timeout=40)
    node = await core.read_node(other)
    assert [t.key for t in node.spec.taints] == ["other"]
    node = await core.read_node(good)
    assert [t.key for t in node.spec.taints or []] == []


async def test_existing_nodes_completed_not_redone(api_client, custom, namespace, nodes, kubelet, start_controller):
    images = images_of("quay.io", 4)
    await create_cache(custom, namespace, "existing", [{"image": i} for i in images])
    names = await nodes.create(2, arch="amd64")
    first = await start_controller(*FAST)
    for name in names:
        await eventually(lambda name=name: warm(api_client, name, 4))
    await anyio.to_thread.run_sync(first.stop)
    attempts = sum(kubelet.node_pulls[n].attempts for n in names)
    (late,) = await nodes.create(1, arch="amd64")
    await start_controller(*FAST)
    await eventually(lambda: warm(api_client, late, 4))
    await anyio.sleep(2)
    assert sum(kubelet.node_pulls[n].attempts for n in names) == attempts


async def _run_throttled(api, custom, namespace, nodes, kubelet, start_controller, registry: str, *args: str) -> int:
    kubelet.set_registry(registry, RegistryProfile(qps=2.0, burst=2, images=ImageProfile(pull_seconds=0.2)))
    controller = await start_controller(*FAST, "--registry-qps=10", "--registry-burst=10", *args)
    images = images_of(registry, 12)
    await create_cache(custom, namespace, registry.split(".")[0], [{"image": i} for i in images])
    names = await nodes.create(2, arch="amd64", prefix=f"{registry.split('.')[0]}-{namespace[-4:]}")
    for name in names:
        await eventually(lambda name=name: warm(api, name, len(images)), timeout=180)
    await anyio.to_thread.run_sync(controller.stop)
    await custom.delete_namespaced_custom_object(
        "imgcache.io", "v1alpha1", namespace, "imagecaches", registry.split(".")[0]
    )
    return kubelet.registry_requests[registry].throttled


async def test_throttling_adapts_rate(api_client, custom, namespace, nodes, kubelet, start_controller):
    # The same demand against the same quota, once with the adaptive rate and once with
    # the rate pinned at its maximum (minimum equal to maximum).
    kubelet.config.backoff_initial = 30.0
    adaptive = await _run_throttled(api_client, custom, namespace, nodes, kubelet, start_controller, "quay.io")
    fixed = await _run_throttled(
        api_client, custom, namespace, nodes, kubelet, start_controller, "ghcr.io", "--registry-min-qps=10"
    )
    assert fixed > 0
    assert adaptive < fixed


async def _run_fast_pulls(api, custom, namespace, nodes, kubelet, start_controller, name: str, *args: str) -> int:
    """Prepull 20 quick images on one new node and return the pulls its kubelet rejected."""
    registry = f"{name}.pullqps.example"
    kubelet.set_registry(registry, RegistryProfile(images=ImageProfile(pull_seconds=0.05)))
    controller = await start_controller(*FAST, "--max-inflight-per-node=20", *args)
    images = images_of(registry, 20)
    await create_cache(custom, namespace, name, [{"image": i} for i in images])
    [node] = await nodes.create(1, arch="amd64", prefix=f"{name}-{namespace[-4:]}")
    await eventually(lambda: warm(api, node, len(images)), timeout=120)
    await anyio.to_thread.run_sync(controller.stop)
    await custom.delete_namespaced_custom_object("imgcache.io", "v1alpha1", namespace, "imagecaches", name)
    return kubelet.node_pulls[node].qps_exceeded


async def test_node_pull_limit_avoids_rejections(
    api_client, custom, namespace, nodes, kubelet, start_controller
):
    # The simulated kubelet keeps the real defaults: registryPullQPS 5, registryBurst 10.
    assert (kubelet.config.registry_pull_qps, kubelet.config.registry_burst) == (5.0, 10)
    paced = await _run_fast_pulls(api_client, custom, namespace, nodes, kubelet, start_controller, "paced")
    unpaced = await _run_fast_pulls(
        api_client, custom, namespace, nodes, kubelet, start_controller, "unpaced", "--node-pull-qps=0"
    )
    assert unpaced > 0
    assert paced == 0
