"""The simulated kubelet's own pull limit (registryPullQPS) and its per-pull latency.

A real kubelet rejects pulls beyond its token bucket with "pull QPS exceeded", before it
sends any registry request, and backs off as after any failed pull. Every prepull strategy
meets that limit on a new node, so the simulator models it.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes_asyncio import client as k8s_client

from cluster.test_testbed_smoke import PULLED_RE, pod_events, pod_manifest, seconds, wait_for
from testbed.kubelet import PULL_QPS_EXCEEDED, ImageProfile, KubeletConfig, SimulatedKubelet
from testbed.nodes import NodeFactory

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]


@pytest.fixture
def kubelet_config(kubelet_config: KubeletConfig) -> KubeletConfig:
    """Return the shared test settings with a node pull limit of 1 per second and a burst of 2."""
    kubelet_config.registry_pull_qps = 1.0
    kubelet_config.registry_burst = 2
    return kubelet_config


async def _all_succeeded(core: k8s_client.CoreV1Api, namespace: str, names: list[str]) -> bool:
    for name in names:
        pod = await core.read_namespaced_pod(name, namespace)
        if pod.status.phase != "Succeeded":
            return False
    return True


async def test_pull_limit_rejects_then_retries(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    registry = "registry.pullqps.example"
    images = [f"{registry}/team/app-{index}:1" for index in range(5)]
    [node] = await nodes.create(1)
    core = k8s_client.CoreV1Api(api_client)
    names = [f"pull-qps-{index}" for index in range(len(images))]
    created = [
        await core.create_namespaced_pod(namespace, pod_manifest(name, [image], node=node))
        for name, image in zip(names, images, strict=True)
    ]

    await wait_for(lambda: _all_succeeded(core, namespace, names), "every pod Succeeded")

    counts = kubelet.node_pulls[node]
    # A burst of 2 for 5 pods started at once: at least 3 first attempts are rejected.
    assert counts.qps_exceeded >= 3
    assert counts.succeeded == len(images)
    assert counts.attempts == counts.succeeded + counts.failed
    # A rejected pull sends no registry request.
    assert kubelet.registry_requests[registry].total == len(images)
    rejected: list[Any] = []
    for pod in created:
        events = await pod_events(api_client, namespace, pod.metadata.uid)
        rejected += [e for e in events if e.reason == "Failed" and e.message.endswith(PULL_QPS_EXCEEDED)]
    # Repeats of one event are counted on it, as the kubelet's event recorder does.
    assert sum(e.count or 1 for e in rejected) == counts.qps_exceeded
    image_of = {pod.metadata.uid: pod.spec.containers[0].image for pod in created}
    for event in rejected:
        assert event.message == f'Failed to pull image "{image_of[event.involved_object.uid]}": pull QPS exceeded'
        assert event.type == "Warning"


async def test_pull_limit_skips_present_images(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    images = [f"registry.present.example/team/app-{index}:1" for index in range(4)]
    [node] = await nodes.create(1)
    kubelet.preload(node, images)
    core = k8s_client.CoreV1Api(api_client)
    names = [f"present-{index}" for index in range(len(images))]
    for name, image in zip(names, images, strict=True):
        await core.create_namespaced_pod(namespace, pod_manifest(name, [image], node=node))

    await wait_for(lambda: _all_succeeded(core, namespace, names), "every pod Succeeded")

    assert kubelet.node_pulls[node].attempts == 0
    assert kubelet.node_pulls[node].qps_exceeded == 0


async def test_pull_latency_delays_transfer(
    api_client: k8s_client.ApiClient,
    namespace: str,
    nodes: NodeFactory,
    kubelet: SimulatedKubelet,
) -> None:
    image = "registry.latency.example/team/app:1"
    kubelet.config.pull_latency = 0.8
    kubelet.config.images[image] = ImageProfile(size=2_000_000)  # 0.2 s at 10 MB/s
    [node] = await nodes.create(1)
    core = k8s_client.CoreV1Api(api_client)
    created = await core.create_namespaced_pod(namespace, pod_manifest("latency", [image], node=node))

    await wait_for(lambda: _all_succeeded(core, namespace, ["latency"]), "pod latency Succeeded")

    events = await pod_events(api_client, namespace, created.metadata.uid)
    [pulled] = [e for e in events if e.reason == "Pulled"]
    match = PULLED_RE.fullmatch(pulled.message)
    assert match is not None, pulled.message
    assert 1.0 <= seconds(match["pull"]) < 2.0
