"""Scenario 3: what imgcache's reaction and pod creation cost against bare aiohttp loops.

Nodes here are plain Node objects that no kubelet manages, so pods stay Pending and
only the controller's own work is measured. One watch in the benchmark process
records when each node's and each pod's ADDED event arrives. imgcache and the bare
loops take turns and are measured by that same watch in the same run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import anyio
from kubernetes_asyncio import client as k8s_client

from benchmarks.bare import Client, pod_body
from benchmarks.cluster import GROUP_LABEL, BenchCluster, create_node_objects, plain_node, poll
from benchmarks.observe import WatchLog, record_added
from imgcache.kube import PODS, Kube
from testbed.controller import HELPER_IMAGE, NAMESPACE
from testbed.controlplane import REPO

JSON = dict[str, Any]
# imgcache keeps this many API requests in flight (prepull._API_CONCURRENCY).
IMGCACHE_CONCURRENCY = 16
# Images of the latency ImageCache. imgcache creates one pod per image at once, so the
# bare loop creates as many pods per node and both are timed to the first one.
LATENCY_IMAGES = 5
# Time for imgcache's node watch to deliver the throughput nodes before its work starts.
NODE_SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class CostParams:
    latency_samples: int
    throughput_rounds: int
    throughput_nodes: int
    throughput_images: int
    concurrency: int
    imgcache_flags: tuple[str, ...]


def params(quick: bool) -> CostParams:
    return CostParams(
        latency_samples=8 if quick else 30,
        throughput_rounds=2 if quick else 6,
        throughput_nodes=20,
        throughput_images=20,
        concurrency=IMGCACHE_CONCURRENCY,
        # Caps and rates are opened so that they do not limit the measured creation rate.
        imgcache_flags=("--pinner=false", "--max-inflight=5000", "--max-inflight-per-node=100",
                        "--registry-qps=100000", "--registry-burst=100000", "--node-pull-qps=0"),
    )


def _images(prefix: str, count: int) -> list[str]:
    return [f"cost.registry.bench/bench/{prefix}-{index:02d}:v1" for index in range(count)]


async def run(cluster: BenchCluster, quick: bool) -> JSON:
    p = params(quick)
    assert cluster.api is not None
    api = cluster.api
    await cluster.create_image_cache("cost-latency", _images("latency", LATENCY_IMAGES),
                                     {GROUP_LABEL: "cost-latency-imgcache"})
    controller = await cluster.start_controller("cost-imgcache", p.imgcache_flags)
    nodes, pods = WatchLog(), WatchLog()
    latency: dict[str, list[float]] = {"imgcache": [], "bare": []}
    throughput: dict[str, list[float]] = {"imgcache": [], "bare": []}
    bare_reported: list[JSON] = []
    async with anyio.create_task_group() as group:
        nodes_ready, pods_ready = anyio.Event(), anyio.Event()
        group.start_soon(record_added, api, "/api/v1/nodes", nodes, GROUP_LABEL, nodes_ready)
        group.start_soon(record_added, api, f"/api/v1/namespaces/{NAMESPACE}/pods", pods, None, pods_ready)
        await nodes_ready.wait()
        await pods_ready.wait()

        bare = await anyio.open_process(
            [sys.executable, "-m", "benchmarks.bare", f"--kubeconfig={cluster.kubeconfig}", "watch-create",
             f"--selector={GROUP_LABEL}=cost-latency-bare", f"--per-node={LATENCY_IMAGES}"],
            stdout=subprocess.PIPE, cwd=REPO,
        )
        try:
            assert bare.stdout is not None
            with anyio.fail_after(30):
                line = await bare.stdout.receive()
            if b"watching" not in line:
                raise RuntimeError(f"bare watch-create loop did not start: {line!r}")
            for index in range(p.latency_samples):
                for kind in ("imgcache", "bare"):
                    name = f"cost-latency-{kind}-{index:03d}"
                    await create_node_objects(api, [plain_node(name, {GROUP_LABEL: f"cost-latency-{kind}"})])
                    latency[kind].append(await _reaction(nodes, pods, name))
                    await anyio.sleep(0.3)
        finally:
            bare.terminate()
            await bare.wait()

        round_trips = await _client_round_trips(cluster, p.latency_samples)
        for round_index in range(p.throughput_rounds):
            # Every other round runs the bare loop first, so that neither side always meets
            # the cluster after the other side's pods.
            sides = ("imgcache", "bare") if round_index % 2 == 0 else ("bare", "imgcache")
            for side in sides:
                if side == "imgcache":
                    rate = await _imgcache_throughput(cluster, nodes, pods, p, round_index)
                else:
                    rate, reported = await _bare_throughput(cluster, pods, p, round_index)
                    bare_reported.append(reported)
                throughput[side].append(rate)
        group.cancel_scope.cancel()

    await cluster.stop_controller(controller)
    await cluster.cleanup_imgcache()
    await cluster.delete_nodes(GROUP_LABEL)
    medians = {kind: statistics.median(values) for kind, values in latency.items()}
    rates = {kind: statistics.median(values) for kind, values in throughput.items()}
    return {
        "title": "Controller cost",
        "parameters": {**asdict(p), "latency_images": LATENCY_IMAGES},
        "reaction_latency_seconds": latency,
        "reaction_latency_median": medians,
        "reaction_latency_ratio": medians["imgcache"] / medians["bare"],
        "create_throughput_pods_per_second": throughput,
        "create_throughput_median": rates,
        "create_throughput_ratio": rates["imgcache"] / rates["bare"],
        "bare_create_reports": bare_reported,
        "client_round_trip_seconds": round_trips,
        "client_round_trip_median": {kind: statistics.median(values) for kind, values in round_trips.items()},
    }


async def _reaction(nodes: WatchLog, pods: WatchLog, node: str, timeout: float = 20.0) -> float:
    """Return seconds from the node's ADDED event to the first ADDED event of a pod on it."""
    with anyio.fail_after(timeout):
        while True:
            if node in nodes.added:
                on_node = [t for name, t in pods.added.items() if pods.node_of.get(name) == node]
                if on_node:
                    return min(on_node) - nodes.added[node]
            await anyio.sleep(0.01)


async def _client_round_trips(cluster: BenchCluster, samples: int) -> dict[str, list[float]]:
    """Time pod creates one at a time through imgcache's API client and through bare aiohttp.

    Both send the same body to the same server with the same token, so the difference
    is the client library's own cost per request.
    """
    assert cluster.api is not None
    await create_node_objects(cluster.api, [plain_node("cost-round-trip", {GROUP_LABEL: "cost-round-trip"})])
    node = await k8s_client.CoreV1Api(cluster.api).read_node("cost-round-trip")
    kube = await Kube.connect(str(cluster.kubeconfig))
    bare = Client(cluster.kubeconfig, pool=1)
    times: dict[str, list[float]] = {"imgcache.kube": [], "aiohttp": []}
    try:
        for index in range(samples + 1):
            body = pod_body(f"round-trip-kube-{index:03d}", node.metadata.name, node.metadata.uid,
                            "cost.registry.bench/bench/round-trip:v1", HELPER_IMAGE)
            started = time.perf_counter()
            await kube.create(PODS, body, NAMESPACE)
            kube_seconds = time.perf_counter() - started

            body = pod_body(f"round-trip-bare-{index:03d}", node.metadata.name, node.metadata.uid,
                            "cost.registry.bench/bench/round-trip:v1", HELPER_IMAGE)
            started = time.perf_counter()
            status = await bare.create_pod(NAMESPACE, body)
            bare_seconds = time.perf_counter() - started
            if status != 201:
                raise RuntimeError(f"bare pod create failed with HTTP {status}")
            # The first pair opens the connections, so it is left out.
            if index:
                times["imgcache.kube"].append(kube_seconds)
                times["aiohttp"].append(bare_seconds)
    finally:
        await kube.close()
        await bare.close()
    return times


def _rate(pods: WatchLog, node_names: set[str], expected: int) -> float | None:
    times = sorted(t for name, t in pods.added.items() if pods.node_of.get(name) in node_names)
    if len(times) < expected:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


async def _imgcache_throughput(
    cluster: BenchCluster, nodes: WatchLog, pods: WatchLog, p: CostParams, round_index: int
) -> float:
    """Create the round's nodes, let them settle, then one ImageCache that gives them every image.

    The bare loop also starts with its nodes in place, so neither side's rate includes
    the nodes' creation, and imgcache gets all its work from a single catalogue change.
    """
    assert cluster.api is not None
    group = f"cost-throughput-imgcache-{round_index}"
    names = [f"cost-tput-imgcache-{round_index}-{i:02d}" for i in range(p.throughput_nodes)]
    bodies = [plain_node(name, {GROUP_LABEL: group}) for name in names]
    await create_node_objects(cluster.api, bodies, parallelism=len(bodies))
    await poll(lambda: set(names) <= set(nodes.added), 30, "the throughput nodes' ADDED events", 0.1)
    await anyio.sleep(NODE_SETTLE_SECONDS)
    await cluster.create_image_cache(f"cost-throughput-{round_index}", _images("throughput", p.throughput_images),
                                     {GROUP_LABEL: group})
    expected = p.throughput_nodes * p.throughput_images
    rate: float = await poll(lambda: _rate(pods, set(names), expected), 120, "imgcache's throughput pods", 0.2)
    return rate


async def _bare_throughput(
    cluster: BenchCluster, pods: WatchLog, p: CostParams, round_index: int
) -> tuple[float, JSON]:
    assert cluster.api is not None
    names = [f"cost-tput-bare-{round_index}-{i:02d}" for i in range(p.throughput_nodes)]
    bodies = [plain_node(name, {GROUP_LABEL: "cost-throughput-bare"}) for name in names]
    await create_node_objects(cluster.api, bodies, parallelism=len(bodies))
    core = k8s_client.CoreV1Api(cluster.api)
    listing = await core.list_node(label_selector=f"{GROUP_LABEL}=cost-throughput-bare")
    targets = [{"name": n.metadata.name, "uid": n.metadata.uid} for n in listing.items if n.metadata.name in names]
    nodes_file = cluster.root / f"bare-nodes-{round_index}.json"
    nodes_file.write_text(json.dumps(targets))
    command = [sys.executable, "-m", "benchmarks.bare", f"--kubeconfig={cluster.kubeconfig}", "create",
               f"--nodes={nodes_file}", f"--per-node={p.throughput_images}", f"--concurrency={p.concurrency}"]
    result = await anyio.run_process(command, cwd=REPO)
    reported: JSON = json.loads(result.stdout.decode().strip().splitlines()[-1])
    expected = p.throughput_nodes * p.throughput_images
    rate: float = await poll(lambda: _rate(pods, set(names), expected), 30, f"the bare loop's pods ({reported})", 0.2)
    return rate, reported
