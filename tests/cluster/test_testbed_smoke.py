"""Smoke tests of the test bed: control plane, kwok nodes and the simulated kubelet.

Every imgcache cluster test relies on these parts, so these tests check what those
tests take for granted. Fake nodes turn Ready and the real controllers place pods on
them. Pulls follow the kubelet's order, wording and back-off. ``down`` leaves no
process behind.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
import secrets
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import start_plane
from kubernetes_asyncio import client as k8s_client

from testbed.controlplane import COMPONENTS, ControlPlane
from testbed.kubelet import (
    FailureKind,
    FailureRule,
    ImageProfile,
    RegistryProfile,
    SimulatedKubelet,
    parse_reference,
)
from testbed.nodes import NodeFactory

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]

PULLED_RE = re.compile(
    r'Successfully pulled image "(?P<image>[^"]+)" in (?P<pull>[0-9.]+(?:ms|s)) '
    r"\((?P<total>[0-9.]+(?:ms|s)) including waiting\)\. Image size: (?P<size>[0-9]+) bytes\."
)


def seconds(go_duration: str) -> float:
    """Convert the short Go durations the simulator prints here (``250ms``, ``1.5s``)."""
    if go_duration.endswith("ms"):
        return float(go_duration[:-2]) / 1000
    return float(go_duration[:-1])


def pod_manifest(
    name: str,
    images: list[str],
    *,
    node: str | None = None,
    restart_policy: str = "Never",
    policy: str | None = None,
) -> dict[str, Any]:
    containers = []
    for index, image in enumerate(images):
        container: dict[str, Any] = {"name": f"c{index}", "image": image, "command": ["true"]}
        if policy is not None:
            container["imagePullPolicy"] = policy
        containers.append(container)
    spec: dict[str, Any] = {
        "restartPolicy": restart_policy,
        "containers": containers,
        "tolerations": [{"operator": "Exists"}],
    }
    if node is not None:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


async def wait_for(check: Callable[[], Any], what: str, deadline: float = 60.0, poll: float = 0.2) -> Any:
    """Await ``check()`` until it returns a truthy value and return it; fail naming ``what``."""
    last: Any = None
    with anyio.move_on_after(deadline):
        while True:
            last = await check()
            if last:
                return last
            await anyio.sleep(poll)
    pytest.fail(f"timed out after {deadline:.0f} s waiting for {what}; last value: {last!r}")


async def pod_events(api: k8s_client.ApiClient, namespace: str, uid: str) -> list[Any]:
    """Return the Events about one pod in the order the API server stored them."""
    core = k8s_client.CoreV1Api(api)
    listing = await core.list_namespaced_event(namespace, field_selector=f"involvedObject.uid={uid}")
    return sorted(listing.items, key=lambda e: int(e.metadata.resource_version))


# -- nodes -------------------------------------------------------------------------------


async def test_fake_node_becomes_ready(api_client: k8s_client.ApiClient, nodes: NodeFactory) -> None:
    [name] = await nodes.create(1, arch="arm64", labels={"pool": "smoke"})

    node = await k8s_client.CoreV1Api(api_client).read_node(name)
    ready = [c for c in node.status.conditions if c.type == "Ready"]
    assert ready, "node has no Ready condition"
    assert ready[0].status == "True"
    assert node.status.node_info.architecture == "arm64"
    assert node.status.node_info.operating_system == "linux"
    assert node.metadata.labels["kubernetes.io/hostname"] == name
    assert node.metadata.labels["pool"] == "smoke"
    assert node.metadata.annotations["kwok.x-k8s.io/node"] == "fake"


async def test_hundred_fake_nodes_ready(nodes: NodeFactory) -> None:
    started = time.monotonic()

    names = await nodes.create(100, deadline=120)

    assert len(set(names)) == 100
    assert time.monotonic() - started < 120


# -- pods placed by the real controllers ---------------------------------------------------


async def test_daemonset_runs_on_matching_nodes(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    pool = f"ds-{secrets.token_hex(3)}"
    plain = await nodes.create(2, labels={"pool": pool})
    tainted = await nodes.create(
        1,
        labels={"pool": pool},
        taints=[{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}],
    )
    other = await nodes.create(1, labels={"pool": "elsewhere"})
    image = "registry.ds.example/pin/sleeper:1.0"
    daemonset = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "pin"},
        "spec": {
            "selector": {"matchLabels": {"app": "pin"}},
            "template": {
                "metadata": {"labels": {"app": "pin"}},
                "spec": {
                    "nodeSelector": {"pool": pool},
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{"name": "pin", "image": image, "command": ["sleep", "inf"]}],
                },
            },
        },
    }
    await k8s_client.AppsV1Api(api_client).create_namespaced_daemon_set(namespace, daemonset)
    core = k8s_client.CoreV1Api(api_client)

    async def running_pods() -> list[Any]:
        listing = await core.list_namespaced_pod(namespace, label_selector="app=pin")
        pods = [p for p in listing.items if p.status.phase == "Running"]
        return pods if len(pods) >= 3 else []

    pods = await wait_for(running_pods, "3 Running DaemonSet pods")

    assert {p.spec.node_name for p in pods} == {*plain, *tainted}
    assert other[0] not in {p.spec.node_name for p in pods}
    for pod in pods:
        ready = {c.type: c.status for c in pod.status.conditions}
        assert ready["Ready"] == "True", pod.metadata.name
        status = pod.status.container_statuses[0]
        assert status.state.running is not None
        assert status.ready is True
        assert status.image_id.startswith("registry.ds.example/pin/sleeper@sha256:")
        assert kubelet.has_image(pod.spec.node_name, image)

    async def daemonset_ready() -> bool:
        ds = await k8s_client.AppsV1Api(api_client).read_namespaced_daemon_set("pin", namespace)
        return ds.status.number_ready == 3 and ds.status.desired_number_scheduled == 3

    await wait_for(daemonset_ready, "DaemonSet status numberReady=3")


# -- pulls -----------------------------------------------------------------------------------


async def test_pod_pulls_images_in_order(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    images = [f"registry.order.example/team/app-{x}:1.0" for x in "abc"]
    for image in images:
        kubelet.config.images[image] = ImageProfile(size=3_000_000)  # 0.3 s at 10 MB/s
    [node] = await nodes.create(1)
    core = k8s_client.CoreV1Api(api_client)
    created = await core.create_namespaced_pod(namespace, pod_manifest("three", images, node=node))

    async def succeeded() -> Any:
        pod = await core.read_namespaced_pod("three", namespace)
        return pod if pod.status.phase == "Succeeded" else None

    pod = await wait_for(succeeded, "pod three Succeeded")

    await wait_for(
        lambda: _count_reason(api_client, namespace, created.metadata.uid, "Pulled", 3),
        "3 Pulled events",
    )
    events = await pod_events(api_client, namespace, created.metadata.uid)
    pulls = [(e.reason, e.involved_object.field_path) for e in events if e.reason in ("Pulling", "Pulled")]
    assert pulls == [(reason, f"spec.containers{{c{index}}}") for index in range(3) for reason in ("Pulling", "Pulled")]
    pulled = [e for e in events if e.reason == "Pulled"]
    for event, image in zip(pulled, images, strict=True):
        match = PULLED_RE.fullmatch(event.message)
        assert match is not None, event.message
        assert match["image"] == image
        assert match["size"] == "3000000"
        assert 0.25 <= seconds(match["pull"]) <= seconds(match["total"])
        assert event.type == "Normal"
        assert event.source.component == "kubelet"
        assert event.source.host == node
        assert event.reporting_component == "kubelet"
        assert event.reporting_instance == node
        assert event.count == 1
    pulling = [e for e in events if e.reason == "Pulling"]
    assert [e.message for e in pulling] == [f'Pulling image "{image}"' for image in images]
    for previous, following in zip(pulled, pulling[1:], strict=False):
        assert previous.last_timestamp <= following.first_timestamp

    records = [r for r in kubelet.pull_log if r.node == node]
    assert [r.image for r in records] == [parse_reference(i).name for i in images]
    for previous_record, record in itertools.pairwise(records):
        assert previous_record.finished_at is not None
        assert record.started_at is not None
        assert record.started_at >= previous_record.finished_at

    assert kubelet.images(node) >= {parse_reference(i).name for i in images}
    for status in pod.status.container_statuses:
        assert status.state.terminated is not None, status.name
        assert status.state.terminated.exit_code == 0
        assert status.state.terminated.reason == "Completed"
        assert status.image_id.startswith("registry.order.example/team/app-")
        assert "@sha256:" in status.image_id

    async def node_reports_images() -> bool:
        reported = await core.read_node(node)
        names = {n for image in reported.status.images or [] for n in image.names}
        return {parse_reference(i).name for i in images} <= names

    await wait_for(node_reports_images, "node.status.images listing the pulled images")


async def _count_reason(api: k8s_client.ApiClient, namespace: str, uid: str, reason: str, minimum: int) -> bool:
    events = await pod_events(api, namespace, uid)
    return sum(e.count or 1 for e in events if e.reason == reason) >= minimum


async def test_pods_share_node_bandwidth(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    images = ["registry.share.example/one:1", "registry.share.example/two:1"]
    for image in images:
        kubelet.config.images[image] = ImageProfile(size=4_000_000)  # 0.4 s alone at 10 MB/s
    [node] = await nodes.create(1)
    core = k8s_client.CoreV1Api(api_client)

    async with anyio.create_task_group() as group:
        for index, image in enumerate(images):
            manifest = pod_manifest(f"share-{index}", [image], node=node)
            group.start_soon(core.create_namespaced_pod, namespace, manifest)

    async def both_done() -> bool:
        listing = await core.list_namespaced_pod(namespace)
        return sum(p.status.phase == "Succeeded" for p in listing.items) == 2

    await wait_for(both_done, "both pods Succeeded")

    assert kubelet.node_pulls[node].max_active == 2
    records = [r for r in kubelet.pull_log if r.node == node]
    assert len(records) == 2
    first, second = sorted(records, key=lambda r: r.started_at or 0)
    assert first.finished_at is not None and second.started_at is not None
    assert second.started_at < first.finished_at, "the two pulls did not overlap"
    # Sharing 10 MB/s, 8 MB arrive after 0.8 s at the earliest.
    last_finish = max(r.finished_at or 0 for r in records)
    assert last_finish - (first.started_at or 0) >= 0.75


async def test_serialized_pulls_take_turns(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    kubelet.config.serialize_image_pulls = True
    images = ["registry.serial.example/one:1", "registry.serial.example/two:1"]
    for image in images:
        kubelet.config.images[image] = ImageProfile(size=3_000_000)
    [node] = await nodes.create(1)
    core = k8s_client.CoreV1Api(api_client)

    async with anyio.create_task_group() as group:
        for index, image in enumerate(images):
            manifest = pod_manifest(f"serial-{index}", [image], node=node)
            group.start_soon(core.create_namespaced_pod, namespace, manifest)

    async def both_done() -> bool:
        listing = await core.list_namespaced_pod(namespace)
        return sum(p.status.phase == "Succeeded" for p in listing.items) == 2

    await wait_for(both_done, "both pods Succeeded")

    assert kubelet.node_pulls[node].max_active == 1
    first, second = sorted((r for r in kubelet.pull_log if r.node == node), key=lambda r: r.queued_at)
    assert first.finished_at is not None and second.started_at is not None
    assert second.started_at >= first.finished_at
    # The second pull waited in the queue, so its wait shows in "including waiting".
    assert second.started_at - second.queued_at >= 0.2


async def test_transient_timeout_then_success(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    image = "registry.flaky.example/app:1"
    rule = kubelet.add_failure(FailureRule(FailureKind.TIMEOUT, image=image, attempts=2))
    [node] = await nodes.create(1)
    core = k8s_client.CoreV1Api(api_client)
    created = await core.create_namespaced_pod(namespace, pod_manifest("flaky", [image], node=node))

    async def succeeded() -> bool:
        pod = await core.read_namespaced_pod("flaky", namespace)
        return bool(pod.status.phase == "Succeeded")

    await wait_for(succeeded, "pod flaky Succeeded")

    assert rule.fired == 2
    await wait_for(
        lambda: _count_reason(api_client, namespace, created.metadata.uid, "Pulled", 1),
        "1 Pulled event",
    )
    events = await pod_events(api_client, namespace, created.metadata.uid)
    failed = [e for e in events if e.reason == "Failed" and e.message.startswith("Failed to pull")]
    assert [e.count for e in failed] == [2]
    assert failed[0].message.endswith("dial tcp: lookup registry.flaky.example: i/o timeout")
    assert kubelet.registry_requests["registry.flaky.example"].failed == 2
    assert kubelet.registry_requests["registry.flaky.example"].succeeded == 1


async def test_throttled_registry_recovers(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    registry = "registry.throttle.example"
    kubelet.set_registry(registry, RegistryProfile(qps=0.5, burst=1))
    images = [f"{registry}/app/first:1", f"{registry}/app/second:1"]
    [node] = await nodes.create(1)
    core = k8s_client.CoreV1Api(api_client)
    created = await core.create_namespaced_pod(namespace, pod_manifest("throttled", images, node=node))
    uid = created.metadata.uid
    reasons: list[str] = []

    async def succeeded() -> bool:
        pod = await core.read_namespaced_pod("throttled", namespace)
        for status in pod.status.container_statuses or []:
            waiting = status.state.waiting
            if waiting is not None and (not reasons or reasons[-1] != waiting.reason):
                reasons.append(waiting.reason)
        return bool(pod.status.phase == "Succeeded")

    await wait_for(succeeded, "throttled pod Succeeded", poll=0.05)

    events = await pod_events(api_client, namespace, uid)
    second = "spec.containers{c1}"
    messages = [(e.reason, e.message) for e in events if e.involved_object.field_path == second]
    failures = [m for r, m in messages if r == "Failed" and m.startswith("Failed to pull image")]
    assert failures, messages
    assert failures[0] == (
        f'Failed to pull image "{images[1]}": rpc error: code = Unknown desc = failed to pull '
        f'and unpack image "{images[1]}": failed to resolve reference "{images[1]}": '
        f"unexpected status from HEAD request to https://{registry}/v2/app/second/manifests/1: "
        "429 Too Many Requests"
    )
    reasons_in_order = [r if r != "Failed" else m for r, m in messages]
    assert "Error: ErrImagePull" in reasons_in_order
    assert "BackOff" in reasons_in_order
    assert "Error: ImagePullBackOff" in reasons_in_order
    assert reasons_in_order.index("Error: ErrImagePull") < reasons_in_order.index("BackOff")
    last_pulled = max(i for i, (r, _) in enumerate(messages) if r == "Pulled")
    last_backoff = max(i for i, (r, _) in enumerate(messages) if r == "BackOff")
    assert last_backoff < last_pulled
    assert PULLED_RE.fullmatch(messages[last_pulled][1]) is not None
    assert "ErrImagePull" in reasons
    assert "ImagePullBackOff" in reasons
    counts = kubelet.registry_requests[registry]
    assert counts.throttled >= 1
    assert counts.succeeded == 2
    assert counts.total == counts.throttled + counts.succeeded
    assert kubelet.node_requests[node].throttled == counts.throttled


async def test_not_found_keeps_failing(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    image = "registry.fail.example/missing/app:1.0"
    rule = kubelet.add_failure(FailureRule(FailureKind.NOT_FOUND, image=image))
    [node] = await nodes.create(1)
    core = k8s_client.CoreV1Api(api_client)
    created = await core.create_namespaced_pod(namespace, pod_manifest("missing", [image], node=node))

    await wait_for(
        lambda: _count_reason(api_client, namespace, created.metadata.uid, "BackOff", 3),
        "3 BackOff events",
    )

    pod = await core.read_namespaced_pod("missing", namespace)
    assert pod.status.phase == "Pending"
    waiting = pod.status.container_statuses[0].state.waiting
    assert waiting is not None
    assert waiting.reason in ("ErrImagePull", "ImagePullBackOff")
    assert f"{image}: not found" in waiting.message
    events = await pod_events(api_client, namespace, created.metadata.uid)
    failed = [e for e in events if e.reason == "Failed" and e.message.startswith("Failed to pull")]
    assert len(failed) == 1, "repeats of one message must be aggregated into one Event"
    assert failed[0].count >= 3
    assert failed[0].type == "Warning"
    assert failed[0].message == (
        f'Failed to pull image "{image}": rpc error: code = NotFound desc = failed to pull and '
        f'unpack image "{image}": failed to resolve reference "{image}": {image}: not found'
    )
    assert not any(e.reason == "Pulled" for e in events)
    assert rule.fired >= 3
    assert not kubelet.has_image(node, image)


async def test_deleted_pod_is_removed(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    [node] = await nodes.create(1)
    core = k8s_client.CoreV1Api(api_client)
    manifest = pod_manifest("runner", ["registry.delete.example/app:1"], node=node)
    manifest["spec"]["restartPolicy"] = "Always"
    await core.create_namespaced_pod(namespace, manifest)

    async def running() -> bool:
        pod = await core.read_namespaced_pod("runner", namespace)
        return bool(pod.status.phase == "Running")

    await wait_for(running, "pod runner Running")
    await core.delete_namespaced_pod("runner", namespace)

    async def gone() -> bool:
        listing = await core.list_namespaced_pod(namespace)
        return not listing.items

    await wait_for(gone, "pod runner deleted", deadline=20)


async def test_present_image_is_not_pulled(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    image = "registry.present.example/app:2.0"
    [node] = await nodes.create(1)
    kubelet.preload(node, [image])
    core = k8s_client.CoreV1Api(api_client)
    manifest = pod_manifest("present", [image], node=node)
    manifest["spec"]["initContainers"] = [
        {"name": "setup", "image": "registry.present.example/setup:1", "command": ["true"]}
    ]
    created = await core.create_namespaced_pod(namespace, manifest)

    async def succeeded() -> Any:
        pod = await core.read_namespaced_pod("present", namespace)
        return pod if pod.status.phase == "Succeeded" else None

    pod = await wait_for(succeeded, "pod present Succeeded")
    await wait_for(
        lambda: _count_reason(api_client, namespace, created.metadata.uid, "Pulled", 2),
        "2 Pulled events",
    )

    events = await pod_events(api_client, namespace, created.metadata.uid)
    pulled = [(e.involved_object.field_path, e.message) for e in events if e.reason == "Pulled"]
    assert pulled[0][0] == "spec.initContainers{setup}"
    assert PULLED_RE.fullmatch(pulled[0][1]) is not None
    assert pulled[1] == (
        "spec.containers{c0}",
        f'Container image "{image}" already present on machine',
    )
    assert kubelet.registry_requests["registry.present.example"].total == 1
    init_status = pod.status.init_container_statuses[0]
    assert init_status.state.terminated.exit_code == 0
    conditions = {c.type: c.status for c in pod.status.conditions}
    assert conditions["Initialized"] == "True"
    assert conditions["Ready"] == "False"


async def test_never_policy_without_image(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    image = "registry.never.example/app:1"
    [node] = await nodes.create(1)
    core = k8s_client.CoreV1Api(api_client)
    await core.create_namespaced_pod(namespace, pod_manifest("never", [image], node=node, policy="Never"))

    async def waiting_reason() -> Any:
        pod = await core.read_namespaced_pod("never", namespace)
        statuses = pod.status.container_statuses or []
        return statuses[0].state.waiting if statuses and statuses[0].state.waiting else None

    waiting = await wait_for(lambda: _waiting_with(waiting_reason, "ErrImageNeverPull"), "ErrImageNeverPull")

    assert waiting.message == (f'Container image "{image}" is not present with pull policy of Never')
    assert kubelet.registry_requests["registry.never.example"].total == 0


async def test_never_policy_waits_without_blocking_later_containers(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    missing, present = "registry.never.example/late:1", "registry.never.example/early:1"
    [node] = await nodes.create(1)
    core = k8s_client.CoreV1Api(api_client)

    async def states(name: str) -> list[Any]:
        pod = await core.read_namespaced_pod(name, namespace)
        return [status.state for status in pod.status.container_statuses or []]

    async def finished(name: str, count: int) -> bool:
        found = await states(name)
        return len(found) == count and all(state.terminated is not None for state in found)

    await core.create_namespaced_pod(namespace, pod_manifest("early", [present], node=node))
    await wait_for(lambda: finished("early", 1), "the first image pulled")
    await core.create_namespaced_pod(namespace, pod_manifest("pins", [missing, present], node=node, policy="Never"))

    async def second_started_first_waiting() -> bool:
        found = await states("pins")
        return (
            len(found) == 2
            and found[0].waiting is not None
            and found[0].waiting.reason == "ErrImageNeverPull"
            and found[1].terminated is not None
        )

    await wait_for(second_started_first_waiting, "the present image's container started past the missing one")
    await core.create_namespaced_pod(namespace, pod_manifest("late", [missing], node=node))
    await wait_for(lambda: finished("pins", 2), "the missing image's container started once the image arrived")

    assert kubelet.registry_requests["registry.never.example"].total == 2


async def _waiting_with(check: Callable[[], Any], reason: str) -> Any:
    waiting = await check()
    return waiting if waiting is not None and waiting.reason == reason else None


async def test_platform_list_excludes_node(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    image = "registry.platform.example/amd64-only:1"
    kubelet.config.images[image] = ImageProfile(platforms=("linux/amd64",))
    [node] = await nodes.create(1, arch="arm64")
    core = k8s_client.CoreV1Api(api_client)
    await core.create_namespaced_pod(namespace, pod_manifest("arm", [image], node=node))

    async def waiting_reason() -> Any:
        pod = await core.read_namespaced_pod("arm", namespace)
        statuses = pod.status.container_statuses or []
        return statuses[0].state.waiting if statuses and statuses[0].state.waiting else None

    waiting = await wait_for(lambda: _waiting_with(waiting_reason, "ErrImagePull"), "ErrImagePull", poll=0.05)

    assert waiting.message.endswith("no match for platform in manifest: not found")
    assert not kubelet.has_image(node, image)


async def test_active_deadline_fails_pod(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    image = "registry.deadline.example/slow:1"
    kubelet.config.images[image] = ImageProfile(pull_seconds=60)
    [node] = await nodes.create(1)
    core = k8s_client.CoreV1Api(api_client)
    manifest = pod_manifest("deadline", [image], node=node)
    manifest["spec"]["activeDeadlineSeconds"] = 2
    await core.create_namespaced_pod(namespace, manifest)

    async def failed() -> Any:
        pod = await core.read_namespaced_pod("deadline", namespace)
        return pod if pod.status.phase == "Failed" else None

    pod = await wait_for(failed, "pod deadline Failed", deadline=20)

    assert pod.status.reason == "DeadlineExceeded"
    assert pod.status.message == "Pod was active on the node longer than the specified deadline"
    assert not kubelet.has_image(node, image)


# -- scale -------------------------------------------------------------------------------------


async def test_hundred_nodes_ten_images(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    images = [f"registry.scale.example/app/image-{i}:1" for i in range(10)]
    names = await nodes.create(100, deadline=120)
    core = k8s_client.CoreV1Api(api_client)
    started = time.monotonic()
    limit = anyio.Semaphore(32)

    async def create(node: str, index: int) -> None:
        async with limit:
            manifest = pod_manifest(f"pull-{node}-{index}", [images[index]], node=node)
            await core.create_namespaced_pod(namespace, manifest)

    async with anyio.create_task_group() as group:
        for node in names:
            for index in range(len(images)):
                group.start_soon(create, node, index)

    async def all_succeeded() -> bool:
        listing = await core.list_namespaced_pod(namespace, _preload_content=False)
        body = await listing.json()
        return sum(p["status"].get("phase") == "Succeeded" for p in body["items"]) == 1000

    await wait_for(all_succeeded, "1000 pods Succeeded", deadline=300, poll=1.0)
    elapsed = time.monotonic() - started

    expected = {parse_reference(i).name for i in images}
    for node in names:
        assert kubelet.images(node) >= expected, node
        assert kubelet.node_pulls[node].succeeded == 10, node
    assert kubelet.registry_requests["registry.scale.example"].succeeded == 1000
    assert elapsed < 300


# -- versions and listening sockets -------------------------------------------------------------


async def test_server_and_kubectl_report_v1_36(cluster: ControlPlane, api_client: k8s_client.ApiClient) -> None:
    command = [str(cluster.binary("kubectl")), "--kubeconfig", str(cluster.kubeconfig), "version", "-o", "json"]
    with anyio.fail_after(60):
        result = await anyio.run_process(command, check=False)
    assert result.returncode == 0, result.stderr.decode()
    reported = json.loads(result.stdout)
    client_version = reported["clientVersion"]["gitVersion"]
    server_version = reported["serverVersion"]["gitVersion"]
    # Without the build's version stamp, k8s.io/component-base/version (v0.36.3) reports
    # gitVersion v0.0.0-master+$Format:%H$ and an empty major and minor.
    assert client_version.startswith("v1.36."), reported["clientVersion"]
    assert server_version.startswith("v1.36."), reported["serverVersion"]

    version = await k8s_client.VersionApi(api_client).get_code()
    assert version.git_version.startswith("v1.36."), version
    assert version.git_version == server_version
    assert version.major == "1"
    assert version.minor.rstrip("+") == "36"


# Value of the ``st`` column for a listening socket in /proc/net/tcp and tcp6 (TCP_LISTEN is 10).
TCP_LISTEN = "0A"
LOOPBACK_ADDRESSES = {"127.0.0.1", "::1"}


def _socket_inodes(pid: int) -> set[int]:
    """Return the inode numbers of the sockets among the open file descriptors of ``pid``."""
    inodes = set()
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(descriptor.readlink())
        except FileNotFoundError:
            # The process closed this descriptor after the directory was listed.
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _decode_proc_address(hex_address: str) -> str:
    """Convert an address field of /proc/net/tcp or tcp6 to its text form.

    Linux prints the address as 32-bit words with %08X (get_tcp4_sock in
    net/ipv4/tcp_ipv4.c), and %08X formats each word in host byte order. Packing each word
    in native order therefore restores the bytes in network order.
    """
    words = [int(hex_address[i : i + 8], 16) for i in range(0, len(hex_address), 8)]
    packed = b"".join(struct.pack("=I", word) for word in words)
    return str(ipaddress.ip_address(packed))


def _listening_tcp_sockets(pid: int) -> dict[int, tuple[str, int]]:
    """Return {inode: (address, port)} for the listening TCP sockets in the network namespace of ``pid``."""
    sockets = {}
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            # This file is missing when the kernel runs without IPv6, as with ipv6.disable=1.
            continue
        for row in path.read_text().splitlines()[1:]:
            fields = row.split()
            local_address, state, inode = fields[1], fields[3], int(fields[9])
            if state != TCP_LISTEN:
                continue
            address, port = local_address.split(":")
            sockets[inode] = (_decode_proc_address(address), int(port, 16))
    return sockets


def _listening_addresses(pid: int) -> list[tuple[str, int]]:
    """Return the sorted (address, port) pairs of the TCP sockets that process ``pid`` listens on."""
    listening = _listening_tcp_sockets(pid)
    return sorted(listening[inode] for inode in _socket_inodes(pid) if inode in listening)


def _secure_port(pid: int) -> int:
    """Return the value of ``--secure-port=`` on the command line of ``pid``."""
    arguments = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    values = [a.removeprefix("--secure-port=") for a in arguments if a.startswith("--secure-port=")]
    assert len(values) == 1, f"expected one --secure-port argument in {arguments}"
    return int(values[0])


def test_components_listen_only_on_loopback(cluster: ControlPlane) -> None:
    info = cluster.info()
    pids = {name: cluster.pid(name) for name in COMPONENTS}
    running = {name: pid for name, pid in pids.items() if pid is not None}
    assert running.keys() == set(COMPONENTS), f"not every component runs: {pids}"
    listening = {name: _listening_addresses(pid) for name, pid in running.items()}

    for name, addresses in listening.items():
        assert addresses, f"{name} (pid {running[name]}) has no listening TCP socket"
        for address, port in addresses:
            assert address in LOOPBACK_ADDRESSES, f"{name} listens on {address} port {port}"

    # The ports the test bed configured must appear, which also checks the /proc parsing.
    expected_ports = {
        "etcd": {info.etcd_port, info.etcd_peer_port},
        "kube-apiserver": {info.apiserver_port},
        "kube-controller-manager": {_secure_port(running["kube-controller-manager"])},
        "kube-scheduler": {_secure_port(running["kube-scheduler"])},
        "kwok": {info.kwok_port},
    }
    for name, ports in expected_ports.items():
        found = {port for _, port in listening[name]}
        assert ports <= found, f"{name} does not listen on port(s) {sorted(ports - found)}, only on {sorted(found)}"


# -- shutdown ----------------------------------------------------------------------------------


def _live_processes_mentioning(text: str) -> list[str]:
    """Return ``pid: command`` for non-zombie processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(") ", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in command and state != "Z":
            found.append(f"{entry.name}: {command[:120]}")
    return found


def test_down_leaves_no_process(cluster: ControlPlane) -> None:
    pids = {name: cluster.pid(name) for name in COMPONENTS}
    assert all(pids.values()), f"not every component runs before down: {pids}"

    cluster.down()
    try:
        leftovers = _live_processes_mentioning(str(cluster.directory))
        assert cluster.running() == []
        assert leftovers == []
        for name, pid in pids.items():
            assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"{name} ({pid}) survived"
    finally:
        # Later tests in the session use the same cluster.
        start_plane(cluster)


def _is_zombie(pid: int | None) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(") ", 1)[1].split()[0] == "Z"
