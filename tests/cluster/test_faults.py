"""Fault tolerance of imgcache on the real control plane.

Each test breaks one thing that breaks on real clusters. The API server restarts, etcd
compacts past a watch, the controller is killed, the leader dies, nodes come and go in
bulk, the registry throttles, the network path to the API server hangs, or RBAC
disappears. Each test checks that the work still completes, exactly once, with nothing
left behind. The session's cluster is shared, so every test that stops a component or edits
RBAC restores it in ``finally``.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

import aiohttp
import anyio
import pytest
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import watch as k8s_watch
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from cluster.helpers import PrepullObserver, eventually, image_cache
from imgcache.catalogue import Catalogue
from imgcache.model import node_from_json
from imgcache.prepull import prepull_pod
from imgcache.reference import parse
from imgcache.scheduler import Launch, node_key, pod_name
from testbed.controller import HELPER_IMAGE, NAMESPACE, ControllerProcess, kubectl
from testbed.controlplane import ControlPlane
from testbed.kubelet import ImageProfile, KubeletConfig, RegistryProfile, SimulatedKubelet
from testbed.proxy import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

FAST = ("--pinner=false", "--pin-debounce=0.5", "--status-interval=1", "--progress-interval=0.5",
        "--retry-initial=0.5", "--retry-max=2")
# Lease settings under which a leader outlives the outages these tests cause, so a test can
# check that the same process recovers. With the default 10 s renew deadline, a longer
# outage ends the leader by design.
PATIENT_LEASE = ("--lease-duration=60", "--renew-deadline=45", "--retry-period=1")
# A killed leader's Lease expires after 3 s, so the next process leads soon.
SHORT_LEASE = ("--lease-duration=3", "--renew-deadline=2", "--retry-period=0.5")
PREPULL_SELECTOR = "app.kubernetes.io/component=prepull"
TAINT_KEY = "imgcache.io/warming"
SEED = 20261204


# -- helpers ---------------------------------------------------------------


def images_of(registry: str, count: int, prefix: str = "app") -> list[str]:
    return [f"{registry}/team/{prefix}{i}:v1" for i in range(count)]


async def create_cache(custom, namespace: str, name: str, images: list[str]) -> None:
    body = image_cache(name, [{"image": image} for image in images])
    await custom.create_namespaced_custom_object("imgcache.io", "v1alpha1", namespace, "imagecaches", body)


async def node_progress(api, name: str) -> dict[str, int] | None:
    try:
        node = await k8s_client.CoreV1Api(api).read_node(name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    raw = (node.metadata.annotations or {}).get("imgcache.io/prepull-progress")
    return json.loads(raw) if raw else None


async def warm(api, name: str, done: int) -> bool:
    progress = await node_progress(api, name)
    return progress is not None and progress["done"] == done and progress["pending"] == 0


async def all_warm(api, names: list[str], done: int) -> bool:
    for name in names:
        if not await warm(api, name, done):
            return False
    return True


async def prepull_pods(api) -> list[k8s_client.V1Pod]:
    core = k8s_client.CoreV1Api(api)
    return (await core.list_namespaced_pod(NAMESPACE, label_selector=PREPULL_SELECTOR)).items


async def no_prepull_pods(api) -> bool:
    return not await prepull_pods(api)


async def assert_done_once(api, kubelet, observer: PrepullObserver, names: list[str]) -> None:
    """Assert that each pod name was created once and no image pulled twice, then that no
    prepull pod is left.
    """
    assert observer.simultaneous_same_image == 0
    assert max(observer.names_created.values()) == 1
    assert pulled_twice(kubelet, names) == {}
    assert await eventually(lambda: no_prepull_pods(api))


def held(kubelet, node: str) -> set[str]:
    """Return the catalogue images a node holds, without the helper image every pod pulls."""
    return {str(parse(i)) for i in kubelet.images(node)} - {HELPER_IMAGE}


def successful_pulls(kubelet, nodes: list[str]) -> list[tuple[str, str]]:
    """Return (node, image) of every successful pull on ``nodes``, helper image excluded."""
    wanted = set(nodes)
    return [
        (r.node, r.image)
        for r in kubelet.pull_log
        if r.node in wanted and r.error is None and r.finished_at and r.image != HELPER_IMAGE
    ]


def pulled_twice(kubelet, nodes: list[str]) -> dict[tuple[str, str], int]:
    counts = Counter(successful_pulls(kubelet, nodes))
    return {pair: count for pair, count in counts.items() if count > 1}


def checked(condition: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    """Wrap a plain condition for ``eventually``, which awaits its check."""

    async def check() -> object:
        return condition()

    return check


def metric(text: str, name: str, **labels: str) -> float:
    """Sum the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def scrape(controller: ControllerProcess) -> str:
    return await anyio.to_thread.run_sync(controller.metrics)


def log_events(controller: ControllerProcess, event: str) -> list[dict[str, object]]:
    return [entry for entry in controller.logs() if entry.get("event") == event]


def node_key_of(name: str, uid: str) -> str:
    """Return imgcache's key of one node incarnation, as in the ``imgcache.io/node`` pod label."""
    return hashlib.sha256(f"{name}/{uid}".encode()).hexdigest()[:10]


async def lease_holder(api) -> str:
    coordination = k8s_client.CoordinationV1Api(api)
    try:
        lease = await coordination.read_namespaced_lease("imgcache-leader", NAMESPACE)
    except ApiException as error:
        if error.status == 404:
            return ""
        raise
    return lease.spec.holder_identity or ""


class ResilientObserver(PrepullObserver):
    """A PrepullObserver whose watch survives API server restarts.

    PrepullObserver watches once, so its stream ends, or fails, when the API server
    closes it. This one lists and watches again after every interruption, and drops
    pods that disappeared meanwhile from its set of live pods.
    """

    def __init__(self, api, namespace: str) -> None:  # type: ignore[no-untyped-def]
        super().__init__(api, namespace)
        self.interruptions = 0

    async def run(self) -> None:
        core = k8s_client.CoreV1Api(self.api)
        while True:
            try:
                listing = await core.list_namespaced_pod(self.namespace, label_selector=PREPULL_SELECTOR)
                present = {pod.metadata.name for pod in listing.items}
                for name in [n for n in self.live if n not in present]:
                    del self.live[name]
                for pod in listing.items:
                    self._apply("ADDED", pod)
                async with k8s_watch.Watch() as stream:
                    async for event in stream.stream(
                        core.list_namespaced_pod,
                        self.namespace,
                        label_selector=PREPULL_SELECTOR,
                        resource_version=listing.metadata.resource_version,
                        timeout_seconds=300,
                    ):
                        self._apply(event["type"], event["object"])
            except (TimeoutError, ApiException, aiohttp.ClientError, OSError):
                pass
            self.interruptions += 1
            await anyio.sleep(0.5)


def restart_apiserver(plane: ControlPlane, stop_timeout: float = 5.0) -> None:
    """Stop kube-apiserver (SIGTERM, SIGKILL after ``stop_timeout``) and start it again on etcd's data.

    kube-apiserver v1.36 stops listening at once on SIGTERM but takes about 20 s to
    exit, so the timeout keeps the outage short.
    """
    try:
        plane.stop("kube-apiserver", timeout=stop_timeout)
    finally:
        ensure_apiserver(plane)


def ensure_apiserver(plane: ControlPlane) -> None:
    """Start kube-apiserver if it is not running, and wait until it is ready."""
    if plane.pid("kube-apiserver") is None:
        plane.start("kube-apiserver")
    plane.wait_apiserver_ready(60)


def etcd_post(plane: ControlPlane, path: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        plane.info().etcd_endpoint + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


def compact_etcd(plane: ControlPlane) -> int:
    """Compact etcd's history up to its current revision; return that revision."""
    header = etcd_post(plane, "/v3/kv/range", {"key": "AA=="})["header"]
    revision = int(header["revision"])  # type: ignore[index]
    etcd_post(plane, "/v3/kv/compaction", {"revision": str(revision), "physical": True})
    return revision


def proxied_kubeconfig(source: Path, port: int, target: Path) -> Path:
    """Copy a kubeconfig with its server replaced by ``https://127.0.0.1:<port>``.

    The API server's certificate names 127.0.0.1, so TLS through the proxy verifies.
    """
    config = json.loads(source.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{port}"
    target.write_text(json.dumps(config))
    target.chmod(0o600)
    return target


# -- API server and etcd -----------------------------------------------------


@pytest.mark.slow
async def test_apiserver_restart_mid_prepull(api_client, cluster, custom, namespace, nodes, kubelet,
                                             start_controller):
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=1.0)))
    images = images_of("quay.io", 10)
    observer = ResilientObserver(api_client, NAMESPACE)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(observer.run)
            controller = await start_controller(*FAST, *PATIENT_LEASE, "--max-inflight-per-node=2")
            await create_cache(custom, namespace, "restart", images)
            names = await nodes.create(3)
            await eventually(checked(lambda: len(observer.created) >= 6), timeout=60)
            await anyio.to_thread.run_sync(restart_apiserver, cluster)
            # A node that joins after the restart shows that the node watch resumed.
            (late,) = await nodes.create(1)
            names.append(late)
            await eventually(lambda: all_warm(api_client, names, len(images)), timeout=120)
            group.cancel_scope.cancel()
    finally:
        await anyio.to_thread.run_sync(ensure_apiserver, cluster)

    assert controller.process.poll() is None, "imgcache exited during the API server restart"
    text = await scrape(controller)
    for resource in ("nodes", "pods", "imagecaches"):
        restarts = metric(text, "imgcache_watch_restarts_total", resource=resource)
        closed = metric(text, "imgcache_watch_restarts_total", resource=resource, reason="stream_closed")
        assert restarts - closed >= 1, f"the {resource} watch never noticed the restart"
    for name in names:
        assert {str(parse(i)) for i in images} <= held(kubelet, name)
    await assert_done_once(api_client, kubelet, observer, names)


@pytest.mark.slow
async def test_compaction_gone_relists(api_client, cluster, custom, namespace, nodes, kubelet, start_controller):
    """A watch whose resourceVersion etcd compacted away gets 410 Gone and relists.

    kube-apiserver serves watches from its watch cache, which keeps old events in memory
    after etcd compacts them, so an old resourceVersion still works after a compaction
    alone. Restarting the API server empties that cache, so the paused controller's
    watches resume from a compacted revision, as after a long network partition.
    """
    controller = await start_controller(*FAST, *PATIENT_LEASE)
    await create_cache(custom, namespace, "before", ["quay.io/team/before:v1"])
    (first,) = await nodes.create(1)
    await eventually(lambda: warm(api_client, first, 1))
    gone_before = metric(await scrape(controller), "imgcache_watch_restarts_total", reason="gone")

    assert controller.process is not None
    controller.process.send_signal(signal.SIGSTOP)
    try:
        # Changes the paused controller must not miss.
        (late,) = await nodes.create(1)
        await create_cache(custom, namespace, "during", ["quay.io/team/during:v1"])
        revision = await anyio.to_thread.run_sync(compact_etcd, cluster)
        await anyio.to_thread.run_sync(restart_apiserver, cluster)
    finally:
        controller.process.send_signal(signal.SIGCONT)
        await anyio.to_thread.run_sync(ensure_apiserver, cluster)
    resumed = anyio.current_time()

    async def relisted() -> bool:
        text = await scrape(controller)
        return metric(text, "imgcache_watch_restarts_total", resource="nodes", reason="gone") > 0 and metric(
            text, "imgcache_watch_restarts_total", resource="imagecaches", reason="gone"
        ) > 0

    await eventually(relisted, timeout=15)
    await eventually(lambda: all_warm(api_client, [first, late], 2), timeout=30)
    recovered = anyio.current_time() - resumed

    assert revision > 0
    assert metric(await scrape(controller), "imgcache_watch_restarts_total", reason="gone") > gone_before
    assert recovered < 20, f"recovery took {recovered:.1f} s after the pause"
    assert held(kubelet, late) == {"quay.io/team/before:v1", "quay.io/team/during:v1"}
    assert held(kubelet, first) == {"quay.io/team/before:v1", "quay.io/team/during:v1"}
    assert controller.process.poll() is None


# -- controller crashes and leadership --------------------------------------


def elected_at(controller: ControllerProcess) -> float | None:
    """Return when a controller won the Lease, in seconds since the epoch, or None."""
    for entry in log_events(controller, "leader.elected"):
        return datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00")).timestamp()
    return None


def leader_due(due: float, terms: list[tuple[float, float]]) -> float:
    """Return the first moment at or after ``due`` when some controller led."""
    for start, end in sorted(terms):
        if start <= due <= end:
            return due
        if start > due:
            return start
    return float("inf")


@pytest.mark.slow
async def test_sigkill_five_times(api_client, custom, namespace, nodes, kubelet, start_controller):
    rng = random.Random(SEED)
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=0.8)))
    images = images_of("quay.io", 6)
    deadline = 30
    flags = (*FAST, *SHORT_LEASE, "--max-inflight=20", "--max-inflight-per-node=2",
             f"--startup-taint={TAINT_KEY}", f"--startup-taint-deadline={deadline}")
    taint = {"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}
    await create_cache(custom, namespace, "crashes", images)
    observer = PrepullObserver(api_client, NAMESPACE)
    untainted_at: dict[str, float] = {}
    created_at: dict[str, float] = {}
    # Leadership terms as (won, killed) in seconds since the epoch.
    terms: list[tuple[float, float]] = []

    async def watch_taints(names: list[str]) -> None:
        core = k8s_client.CoreV1Api(api_client)
        while True:
            for node in (await core.list_node(label_selector="testbed.imgcache.io/fake-node")).items:
                name = node.metadata.name
                if name in names:
                    created_at[name] = node.metadata.creation_timestamp.timestamp()
                    if not any(t.key == TAINT_KEY for t in node.spec.taints or []):
                        untainted_at.setdefault(name, time.time())
            await anyio.sleep(0.25)

    total = 20 * len(images)
    # Kill points as numbers of finished pulls, so every kill lands while work remains.
    kill_points = sorted(rng.sample(range(total // 10, total * 9 // 10), 5))
    async with anyio.create_task_group() as group:
        group.start_soon(observer.run)
        names = await nodes.create(20, taints=[taint])
        group.start_soon(watch_taints, names)
        for index, point in enumerate(kill_points):
            controller = await start_controller(*flags, identity=f"crash-{index}")
            await eventually(checked(lambda point=point: len(successful_pulls(kubelet, names)) >= point), timeout=90)
            await anyio.sleep(rng.uniform(0.0, 0.5))
            await anyio.to_thread.run_sync(controller.kill)
            won = elected_at(controller)
            if won is not None:
                terms.append((won, time.time()))
        final = await start_controller(*flags, identity="after-crashes")
        await eventually(lambda: all_warm(api_client, names, len(images)), timeout=180)
        await eventually(checked(lambda: len(untainted_at) == len(names)), timeout=60)
        # The last pods can finish while the killed leader's Lease runs out, so the work
        # may be complete before this process leads.
        await eventually(checked(lambda: elected_at(final) is not None), timeout=60)
        group.cancel_scope.cancel()
    won = elected_at(final)
    assert won is not None
    terms.append((won, time.time()))

    for name in names:
        assert {str(parse(i)) for i in images} <= held(kubelet, name)
    await assert_done_once(api_client, kubelet, observer, names)

    # Removed once a node has every image, or at its deadline, or as soon as a controller
    # leads after the deadline. The slack covers the 0.5 s flush interval, the 0.25 s
    # polling and API latency: at a load average of 7 on 2 cores, removal came up to
    # 5.7 s after the deadline.
    clock_offset = time.time() - time.monotonic()
    last_pull = {n: 0.0 for n in names}
    for record in kubelet.pull_log:
        if record.node in last_pull and record.error is None and record.image != HELPER_IMAGE and record.finished_at:
            last_pull[record.node] = max(last_pull[record.node], record.finished_at + clock_offset)
    late, early = {}, {}
    for name in names:
        due = created_at[name] + deadline
        if untainted_at[name] > leader_due(min(due, max(last_pull[name], created_at[name])), terms) + 8:
            late[name] = round(untainted_at[name] - created_at[name], 1)
        if untainted_at[name] < min(due, last_pull[name]) - 1:
            early[name] = round(untainted_at[name] - created_at[name], 1)
    assert late == {}, f"seconds after creation when the taint went, past the {deadline} s deadline: {late}"
    assert early == {}, f"seconds after creation when the taint went, before the images arrived: {early}"


async def test_restart_keeps_taint_until_pulled(api_client, custom, namespace, nodes, kubelet, start_controller):
    """A restarted controller that finds a finished prepull pod keeps the startup taint until every image is in.

    Many unrelated ImageCache entries make the ImageCache list slower than the pod list,
    as in a large cluster, so the finished pod arrives before the catalogue does.
    """
    fast, slow = "quay.io/team/fast:v1", "quay.io/team/slow:v1"
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=0.2)))
    kubelet.config.images[slow] = ImageProfile(pull_seconds=6.0)
    taint = {"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}
    core = k8s_client.CoreV1Api(api_client)
    body = image_cache("ordered", [{"image": fast}, {"image": slow}])
    await custom.create_namespaced_custom_object("imgcache.io", "v1alpha1", namespace, "imagecaches", body)
    for index in range(30):
        filler = image_cache(f"filler-{index}", [{"image": i} for i in images_of("ghcr.io", 250, f"f{index}x")],
                             nodeSelector={"pool": "elsewhere"})
        await custom.create_namespaced_custom_object("imgcache.io", "v1alpha1", namespace, "imagecaches", filler)
    (name,) = await nodes.create(1, taints=[taint])

    # The pod a killed controller left behind: created, then finished while no controller ran.
    node = node_from_json(core.api_client.sanitize_for_serialization(await core.read_node(name)))
    catalogue = Catalogue()
    catalogue.replace([{**body, "metadata": {"name": "ordered", "namespace": namespace}}])
    image = next(i for i in catalogue.images.values() if str(i.resolved) == fast)
    launch = Launch(node, node_key(node), image, pod_name(node_key(node), image.hash))
    await core.create_namespaced_pod(NAMESPACE, prepull_pod(launch, NAMESPACE, HELPER_IMAGE, True, 600))

    async def finished() -> bool:
        pod = await core.read_namespaced_pod(launch.pod_name, NAMESPACE)
        return pod.status.phase == "Succeeded"

    await eventually(finished, timeout=30)

    async def tainted() -> bool:
        current = await core.read_node(name)
        return any(t.key == TAINT_KEY for t in current.spec.taints or [])

    await start_controller(*FAST, f"--startup-taint={TAINT_KEY}", "--startup-taint-deadline=300")
    await eventually(checked(lambda: any(r.image == slow and r.node == name for r in kubelet.pull_log)), timeout=30)
    slow_started = time.monotonic()
    await anyio.sleep(2)
    still_tainted = await tainted()
    await eventually(lambda: warm(api_client, name, 2), timeout=60)
    await eventually(lambda: _untainted(core, name), timeout=10)
    slow_pull = next(r for r in kubelet.pull_log if r.image == slow and r.node == name and r.error is None)

    assert still_tainted, "the startup taint was removed before the slow image arrived"
    assert slow_pull.finished_at is not None
    assert slow_pull.finished_at > slow_started


async def _untainted(core, name: str) -> bool:
    node = await core.read_node(name)
    return not any(t.key == TAINT_KEY for t in node.spec.taints or [])


@pytest.mark.slow
async def test_leader_failover(api_client, custom, namespace, nodes, kubelet, start_controller):
    lease = ("--lease-duration=4", "--renew-deadline=3", "--retry-period=0.5")
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=1.0)))
    images = images_of("quay.io", 10)
    observer = PrepullObserver(api_client, NAMESPACE)
    async with anyio.create_task_group() as group:
        group.start_soon(observer.run)
        first = await start_controller(*FAST, *lease, "--max-inflight-per-node=2", identity="replica-a")
        second = await start_controller(*FAST, *lease, "--max-inflight-per-node=2", identity="replica-b")
        holder = await eventually(lambda: lease_holder(api_client), timeout=20)
        leader, follower = (first, second) if holder == first.identity else (second, first)
        await create_cache(custom, namespace, "failover", images)
        names = await nodes.create(3)
        await eventually(checked(lambda: len(successful_pulls(kubelet, names)) >= 6), timeout=60)
        follower_leading_before = metric(await scrape(follower), "imgcache_leader")

        await anyio.to_thread.run_sync(leader.kill)
        killed = anyio.current_time()

        async def follower_holds() -> bool:
            return await lease_holder(api_client) == follower.identity

        await eventually(follower_holds, timeout=20, interval=0.1)
        takeover = anyio.current_time() - killed
        await eventually(lambda: all_warm(api_client, names, len(images)), timeout=120)
        group.cancel_scope.cancel()

    assert follower_leading_before == 0
    assert takeover <= 4 + 3, f"the follower took over {takeover:.1f} s after the leader died"
    assert metric(await scrape(follower), "imgcache_leader") == 1
    assert len(log_events(follower, "leader.elected")) == 1
    await assert_done_once(api_client, kubelet, observer, names)


# -- node churn --------------------------------------------------------------


async def test_nodes_deleted_mid_prepull(api_client, custom, namespace, nodes, kubelet, start_controller):
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=2.0)))
    images = images_of("quay.io", 6)
    await start_controller(*FAST, "--max-inflight-per-node=2")
    await create_cache(custom, namespace, "leaving", images)
    names = await nodes.create(4)

    async def pods_on(targets: list[str]) -> list[k8s_client.V1Pod]:
        return [p for p in await prepull_pods(api_client) if p.spec.node_name in targets]

    leaving, staying = names[:2], names[2:]
    await eventually(lambda: pods_on(leaving), timeout=30)
    await nodes.delete(leaving)

    await eventually(lambda: all_warm(api_client, staying, len(images)), timeout=90)
    assert await eventually(lambda: no_prepull_pods(api_client), timeout=30)
    for name in staying:
        assert {str(parse(i)) for i in images} <= held(kubelet, name)


async def test_node_recreated_same_name(api_client, custom, namespace, nodes, kubelet, start_controller):
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=2.0)))
    images = images_of("quay.io", 4)
    core = k8s_client.CoreV1Api(api_client)
    # Debug logs record every pod created and deleted, for a failure to be traced.
    controller = await start_controller(*FAST, "--max-inflight-per-node=2", "--log-level=debug")
    await create_cache(custom, namespace, "reborn", images)
    (name,) = await nodes.create(1)
    old_uid = (await core.read_node(name)).metadata.uid

    async def pods_of(key: str) -> list[k8s_client.V1Pod]:
        listing = await core.list_namespaced_pod(NAMESPACE, label_selector=f"imgcache.io/node={key}")
        return listing.items

    old_key = node_key_of(name, old_uid)
    await eventually(lambda: pods_of(old_key), timeout=30)
    # Delete mid-prepull and re-create at once under the same name, as a replaced
    # instance that registers with the same host name does.
    await nodes.delete([name])
    assert await nodes.create(1, prefix=nodes.prefix) == [name]
    new_uid = (await core.read_node(name)).metadata.uid

    try:
        await eventually(lambda: warm(api_client, name, len(images)), timeout=90)
    except AssertionError as error:
        annotations = (await core.read_node(name)).metadata.annotations
        raise AssertionError(f"{error}; node annotations: {annotations}; log: {controller.log_path}") from None
    assert new_uid != old_uid
    assert {str(parse(i)) for i in images} <= held(kubelet, name)
    assert await eventually(lambda: no_prepull_pods(api_client), timeout=30)
    assert await pods_of(old_key) == []


@pytest.mark.slow
async def test_mass_join_and_leave(api_client, custom, namespace, nodes, kubelet, start_controller):
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=0.5)))
    images = images_of("quay.io", 2)
    controller = await start_controller(*FAST, "--max-inflight-per-node=1")
    await create_cache(custom, namespace, "churn", images)
    leaving = await nodes.create(50, prefix=f"{nodes.prefix}-old")
    await eventually(checked(lambda: len(successful_pulls(kubelet, leaving)) >= 10), timeout=60)

    # 100 nodes join while the first 50 leave, all at once.
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: nodes.delete(leaving))
        joining = await nodes.create(100, prefix=f"{nodes.prefix}-new", deadline=120)

    await eventually(lambda: all_warm(api_client, joining, len(images)), timeout=240, interval=1.0)
    assert await eventually(lambda: no_prepull_pods(api_client), timeout=60)
    text = await scrape(controller)
    assert metric(text, "imgcache_prepull_inflight_pods") == 0
    assert metric(text, "imgcache_prepull_queue_depth") == 0
    assert metric(text, "imgcache_nodes", state="warm") >= len(joining)
    assert pulled_twice(kubelet, joining) == {}


# -- registry throttling ----------------------------------------------------


@pytest.mark.slow
async def test_throttle_storm(api_client, custom, namespace, nodes, start_controller):
    """A registry quota of half the controller's start rate: about half the requests would be throttled.

    The simulator has no switch that throttles a share of requests. The storm is therefore
    a token bucket of 5 requests per second, burst 5, against a controller that starts at
    10 per second, burst 10, and has to find the quota by itself. The kubelet backs off
    as a real one does (10 s, then doubling), not as fast as the shared test fixture, so
    the count shows imgcache's requests and not the test kubelet's in-pod retries.
    """
    config = KubeletConfig(node_bandwidth=10_000_000, default_image_size=1_000_000, node_status_interval=1.0)
    config.registries["quay.io"] = RegistryProfile(qps=5, burst=5, images=ImageProfile(pull_seconds=0.3))
    kubelet = SimulatedKubelet(api_client, config)
    images = images_of("quay.io", 6)
    async with kubelet.running():
        names = await nodes.create(20)
        await create_cache(custom, namespace, "storm", images)
        controller = await start_controller(*FAST, "--registry-qps=10", "--registry-burst=10",
                                            "--registry-min-qps=0.5")
        await eventually(lambda: all_warm(api_client, names, len(images)), timeout=240, interval=1.0)
        assert await eventually(lambda: no_prepull_pods(api_client))

    needed = len(names) * len(images)
    requests = kubelet.registry_requests["quay.io"]
    throttled = metric(await scrape(controller), "imgcache_registry_throttled_total", registry="quay.io")
    for name in names:
        assert {str(parse(i)) for i in images} <= held(kubelet, name)
    assert pulled_twice(kubelet, names) == {}
    assert requests.throttled > 0, "the quota never throttled, so the test tested nothing"
    assert throttled > 0
    assert requests.total <= 1.2 * needed, f"{requests.total} requests for {needed} pulls: {requests}"


# -- hung network path ---------------------------------------------------------


@pytest.mark.slow
async def test_hung_api_read_timeout(api_client, cluster, custom, namespace, nodes, kubelet, installed,
                                     start_controller, tmp_path):
    await create_cache(custom, namespace, "hung", ["quay.io/team/hung:v1"])
    with TcpProxy("127.0.0.1", cluster.info().apiserver_port) as proxy:
        kubeconfig = proxied_kubeconfig(installed, proxy.port, tmp_path / "proxied.kubeconfig")
        args = [*FAST, *PATIENT_LEASE, "--watch-timeout=5", "--watch-read-timeout=8"]
        controller = ControllerProcess(kubeconfig, tmp_path / "proxied.log", args, "through-proxy").start()
        try:
            await anyio.to_thread.run_sync(controller.wait_ready)
            (first,) = await nodes.create(1)
            await eventually(lambda: warm(api_client, first, 1))

            proxy.hang()
            hung = anyio.current_time()

            async def read_timed_out() -> bool:
                text = await scrape(controller)
                return metric(text, "imgcache_watch_restarts_total", resource="nodes", reason="read_timeout") > 0

            await eventually(read_timed_out, timeout=30)
            detected = anyio.current_time() - hung
            proxy.resume()
            accepted = proxy.accepted

            (late,) = await nodes.create(1)
            await eventually(lambda: warm(api_client, late, 1), timeout=60)
        finally:
            proxy.resume()
            await anyio.to_thread.run_sync(controller.kill)

    restarts = [e for e in log_events(controller, "watch.restart") if e.get("reason") == "read_timeout"]
    # The 8 s count from the last byte, which may have arrived just before the hang.
    assert detected < 8 + 6, f"read timeout detected {detected:.1f} s after the hang"
    assert "nodes" in {e["resource"] for e in restarts}
    assert proxy.accepted > accepted, "imgcache never opened a new connection after the hang"
    assert held(kubelet, late) == {"quay.io/team/hung:v1"}


@pytest.mark.slow
async def test_hung_renewal_steps_down(api_client, cluster, custom, namespace, nodes, kubelet, installed,
                                       start_controller, tmp_path):
    """A leader whose renewals hang stops leading by its renew deadline, before the Lease expires.

    Otherwise the follower takes the expired Lease while the old leader still writes.
    """
    lease = ("--lease-duration=6", "--renew-deadline=4", "--retry-period=0.5")
    with TcpProxy("127.0.0.1", cluster.info().apiserver_port) as proxy:
        kubeconfig = proxied_kubeconfig(installed, proxy.port, tmp_path / "proxied.kubeconfig")
        leader = ControllerProcess(kubeconfig, tmp_path / "leader.log", [*FAST, *lease], "hung-leader").start()
        try:
            await anyio.to_thread.run_sync(leader.wait_ready)
            await eventually(lambda: _holds(api_client, leader.identity), timeout=20)
            follower = await start_controller(*FAST, *lease, identity="direct-follower")

            proxy.hang()
            hung = anyio.current_time()
            assert leader.process is not None
            await eventually(lambda: _exited(leader), timeout=40, interval=0.1)
            stepped_down = anyio.current_time() - hung
            await eventually(lambda: _holds(api_client, follower.identity), timeout=20)
            took_over = anyio.current_time() - hung
        finally:
            proxy.resume()
            await anyio.to_thread.run_sync(leader.kill)

    assert stepped_down < 6, f"the hung leader kept leading for {stepped_down:.1f} s"
    assert stepped_down < took_over
    assert log_events(leader, "leader.lost")


async def _holds(api, identity: str) -> bool:
    return await lease_holder(api) == identity


async def _exited(process: ControllerProcess) -> bool:
    return process.process is not None and process.process.poll() is not None


# -- RBAC ------------------------------------------------------------------


@pytest.mark.slow
async def test_rbac_binding_removed(api_client, cluster, custom, namespace, nodes, kubelet, start_controller):
    controller = await start_controller(*FAST, "--watch-timeout=3", "--watch-read-timeout=6")
    await create_cache(custom, namespace, "rbac", ["quay.io/team/rbac:v1"])
    (first,) = await nodes.create(1)
    await eventually(lambda: warm(api_client, first, 1))

    saved = json.loads(await anyio.to_thread.run_sync(kubectl, cluster, "get", "clusterrolebinding", "imgcache",
                                                      "-o", "json"))
    for field in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
        saved["metadata"].pop(field, None)
    try:
        await anyio.to_thread.run_sync(kubectl, cluster, "delete", "clusterrolebinding", "imgcache")

        async def forbidden(resource: str) -> list[dict[str, object]]:
            return [e for e in log_events(controller, "watch.forbidden") if e.get("resource") == resource]

        lines = await eventually(lambda: forbidden("nodes"), timeout=30)
        # A node that joins while the controller cannot list nodes must still be found later.
        (late,) = await nodes.create(1)
        metrics_status, _ = await anyio.to_thread.run_sync(controller.get, "/metrics")
        health_status, _ = await anyio.to_thread.run_sync(controller.get, "/healthz")
    finally:
        await anyio.to_thread.run_sync(
            lambda: kubectl(cluster, "apply", "-f", "-", input=json.dumps(saved))
        )

    await eventually(lambda: warm(api_client, late, 1), timeout=90)
    line = lines[0]  # type: ignore[index]
    assert "nodes" in str(line["hint"])
    assert "forbidden" in str(line["error"]).lower()
    assert metrics_status == 200
    assert health_status == 200
    assert controller.process.poll() is None
    assert held(kubelet, late) == {"quay.io/team/rbac:v1"}
