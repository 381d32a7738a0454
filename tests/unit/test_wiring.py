"""Flags reach the parts they configure, and the pod and DaemonSet specs show their effect."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from kubernetes_asyncio import client as k8s_client

from imgcache.app import Controller
from imgcache.catalogue import Catalogue
from imgcache.config import load
from imgcache.kube import Kube
from imgcache.metrics import Metrics
from imgcache.pinner import desired_daemonsets
from imgcache.prepull import prepull_pod
from imgcache.scheduler import Launch, node_key, pod_name
from unit.factories import imagecache_json, node

FLAGS = [
    "--namespace=cache",
    "--identity=replica-a",
    "--lease-name=cache-leader",
    "--lease-duration=30",
    "--renew-deadline=20",
    "--retry-period=3",
    "--priority-class=imgcache-pins",
    "--pin-debounce=7",
    "--host-network=false",
    "--max-inflight=9",
    "--max-inflight-per-node=3",
    "--registry-qps=11",
    "--registry-burst=12",
    "--registry-min-qps=2",
    "--prepull-deadline=123",
    "--pod-deadline=77",
    "--retry-initial=4",
    "--retry-max=40",
    "--startup-taint=imgcache.io/warming",
    "--startup-taint-deadline=321",
    "--progress-interval=6",
    "--status-interval=8",
    "--watch-timeout=50",
    "--watch-read-timeout=70",
    "--watch-cluster-events",
    "--pull-through-refresh=90",
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def subject() -> AsyncIterator[Controller]:
    # The client only builds requests; nothing is sent in these tests.
    api = k8s_client.ApiClient(k8s_client.Configuration())
    yield Controller(load(FLAGS, {}), Kube(api), Metrics(), "registry.example.test/imgcache:1")
    await api.close()


@pytest.mark.anyio
async def test_controller_passes_limits_to_scheduler(subject: Controller) -> None:
    limits = subject.scheduler.limits
    assert (limits.max_inflight, limits.max_inflight_per_node) == (9, 3)
    assert (limits.registry_qps, limits.registry_burst, limits.registry_min_qps) == (11.0, 12, 2.0)
    assert (limits.prepull_deadline, limits.pod_deadline) == (123.0, 77.0)
    assert (limits.retry_initial, limits.retry_max) == (4.0, 40.0)
    assert (limits.startup_taint, limits.startup_taint_deadline) == ("imgcache.io/warming", 321.0)


@pytest.mark.anyio
async def test_controller_passes_worker_and_pinner_settings(subject: Controller) -> None:
    assert subject.worker.namespace == "cache"
    assert subject.worker.host_network is False
    assert subject.worker.pod_deadline == 77
    assert subject.worker.progress_interval == 6.0
    assert subject.pinner.debounce == 7.0
    assert subject.pinner.options.priority_class == "imgcache-pins"
    assert subject.pinner.options.host_network is False
    assert subject.status.interval == 8.0


@pytest.mark.anyio
async def test_controller_passes_watch_and_lease_settings(subject: Controller) -> None:
    election = subject.elector.settings
    assert (election.name, election.identity, election.namespace) == ("cache-leader", "replica-a", "cache")
    assert (election.lease_duration, election.renew_deadline, election.retry_period) == (30.0, 20.0, 3.0)
    nodes = subject.reflectors["watch.nodes"]
    assert (nodes.settings.server_timeout, nodes.settings.read_timeout) == (50, 70.0)
    # --watch-cluster-events widens the Events watch from imgcache's namespace to all.
    assert subject.reflectors["watch.events"].namespace is None
    assert subject.reflectors["watch.pods"].namespace == "cache"


def launch() -> Launch:
    catalogue = Catalogue()
    catalogue.replace([imagecache_json("c", ["quay.io/team/app:v1"])])
    (image,) = catalogue.images.values()
    target = node("n1")
    key = node_key(target)
    return Launch(target, key, image, pod_name(key, image.hash))


def test_prepull_pod_follows_host_network_and_deadline() -> None:
    on = prepull_pod(launch(), "cache", "helper:1", host_network=True, deadline=77)
    off = prepull_pod(launch(), "cache", "helper:1", host_network=False, deadline=77)
    assert on["spec"]["hostNetwork"] is True
    assert off["spec"]["hostNetwork"] is False
    assert on["spec"]["activeDeadlineSeconds"] == 77
    assert on["spec"]["initContainers"][0]["image"] == "helper:1"


@pytest.mark.anyio
async def test_pinner_daemonset_follows_priority_class(subject: Controller) -> None:
    catalogue = Catalogue()
    catalogue.replace([imagecache_json("c", ["quay.io/team/app:v1"])])
    (body,) = desired_daemonsets(catalogue, [node("n1")], subject.pinner.options).values()
    spec = body["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "imgcache-pins"
    assert spec["hostNetwork"] is False
    assert body["metadata"]["namespace"] == "cache"
