"""Scenario 4: imgcache's memory and API requests with thousands of nodes.

The thousands of nodes are plain Node objects that kwok does not manage, so they
cost the control plane almost nothing after creation. Each carries the prepulled
annotation with every catalogue image, as imgcache writes it once a node is warm.
imgcache therefore keeps its full per-node state for them (the catalogue match, the
done set and a place in the scheduler's rotation) but starts no pods, as in a
cluster where nearly every node is warm. Prepull is on and the pinner is off: the
pinner's DaemonSets would make the DaemonSet controller start one pod per node, and
those pods are the kubelet's cost, not imgcache's. A few kwok nodes then join and
are warmed for real to count requests per new node.
"""

from __future__ import annotations

import pstats
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
from kubernetes_asyncio import client as k8s_client

from benchmarks.catalog import MB, ImageSet, kubelet_config
from benchmarks.cluster import (
    GROUP_LABEL,
    BenchCluster,
    controller_metrics,
    create_node_objects,
    metric_sum,
    plain_node,
    poll,
    read_rss,
)
from imgcache.model import DONE_ANNOTATION
from imgcache.reference import image_hash, parse
from testbed.controller import ControllerProcess
from testbed.controlplane import REPO
from testbed.kubelet import SimulatedKubelet
from testbed.nodes import node_manifest

JSON = dict[str, Any]
SCALE_GROUP = "scale"


@dataclass(frozen=True)
class ScaleParams:
    node_counts: tuple[int, ...]
    images: int
    new_nodes: int
    steady_seconds: float
    image_size: int
    imgcache_flags: tuple[str, ...]


def params(quick: bool) -> ScaleParams:
    return ScaleParams(
        node_counts=(200, 500) if quick else (1000, 2000, 5000),
        images=100,
        new_nodes=3 if quick else 5,
        steady_seconds=20.0 if quick else 90.0,
        image_size=1 * MB,
        imgcache_flags=("--pinner=false",),
    )


async def run(cluster: BenchCluster, quick: bool) -> JSON:
    p = params(quick)
    assert cluster.api is not None
    api = cluster.api
    image_set = ImageSet("scale.registry.bench", (p.image_size,) * p.images)
    done = ",".join(sorted(image_hash(parse(image)) for image in image_set.images))
    await cluster.create_image_cache("scale", image_set.images, {GROUP_LABEL: SCALE_GROUP})

    # Memory as the cluster grows under one running controller.
    controller = await cluster.start_controller("scale-grow", p.imgcache_flags)
    await anyio.sleep(5)
    memory = [{"nodes": 0, **_memory(controller), "create_seconds": 0.0}]
    present = 0
    for count in p.node_counts:
        bodies = [plain_node(f"scale-{i:05d}", {GROUP_LABEL: SCALE_GROUP}, {DONE_ANNOTATION: done})
                  for i in range(present, count)]
        began = time.monotonic()
        await create_node_objects(api, bodies, parallelism=48)
        present = count
        await _wait_warm(controller, count)
        await anyio.sleep(5)
        memory.append({"nodes": count, **_memory(controller), "create_seconds": round(time.monotonic() - began, 1)})
    await cluster.stop_controller(controller)

    # Memory of a controller that starts with every node already there, then requests.
    controller = await cluster.start_controller("scale-restart", p.imgcache_flags)
    await _wait_warm(controller, present)
    await anyio.sleep(5)
    restart_memory = {"nodes": present, **_memory(controller)}
    config = kubelet_config(50 * MB, 1.0, container_events=False)
    config.images.update(image_set.profiles())
    sim = SimulatedKubelet(api, config)
    async with sim.running(sync_timeout=300):
        per_node = await _requests_per_new_node(cluster, api, controller, p, "scale-new-a")
        steady = await _steady_requests(cluster, p.steady_seconds)
    restart_memory["after_new_nodes"] = _memory(controller)
    await cluster.stop_controller(controller)

    # The same start and new-node flow under cProfile, for the hot spots.
    profile_path = cluster.root / "scale-controller.prof"
    controller = await cluster.start_controller("scale-profile", p.imgcache_flags, profile=profile_path)
    await _wait_warm(controller, present)
    sim = SimulatedKubelet(api, config)
    async with sim.running(sync_timeout=300):
        await _requests_per_new_node(cluster, api, controller, p, "scale-new-b")
        await anyio.sleep(15)
    await cluster.stop_controller(controller)

    # Scale runs last and the cluster is removed after it, so its thousands of nodes stay.
    await cluster.cleanup_imgcache()
    first, last = memory[1], memory[-1]
    per_thousand = (last["rss_bytes"] - first["rss_bytes"]) / ((last["nodes"] - first["nodes"]) / 1000)
    return {
        "title": "Scale and memory",
        "parameters": {**asdict(p), "mode": "prepull on with nodes annotated as warm, pinner off"},
        "memory": memory,
        "restart_memory": restart_memory,
        "rss_per_1000_nodes_bytes": per_thousand,
        "requests_per_new_node": per_node,
        "steady_state": steady,
        "import_rss_bytes": await _import_rss(),
        "profile": _profile_summary(profile_path),
        "profile_file": str(profile_path),
    }


# Statements whose memory a fresh interpreter reports, to show where the controller's
# RSS before any node comes from.
_IMPORT_PROBES = {
    "python alone": "pass",
    "imgcache.app (the whole controller)": "import imgcache.app",
    "kubernetes_asyncio.client": "import kubernetes_asyncio.client",
    "aiobotocore": "import aiobotocore.session",
    "the other dependencies": "import aiohttp, anyio, prometheus_client, structlog, yaml",
}


async def _import_rss() -> dict[str, int]:
    """Return the RSS in bytes of a fresh Python process after each import probe."""
    report = "import re; print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    sizes = {}
    for name, statement in _IMPORT_PROBES.items():
        result = await anyio.run_process([sys.executable, "-c", f"{statement}\n{report}"], cwd=REPO)
        sizes[name] = int(result.stdout.decode().strip()) * 1024
    return sizes


def _memory(controller: ControllerProcess) -> JSON:
    assert controller.process is not None
    samples = controller_metrics(controller)
    return {
        "rss_bytes": read_rss(controller.process.pid),
        "process_resident_memory_bytes": metric_sum(samples, "process_resident_memory_bytes"),
        "cpu_seconds": metric_sum(samples, "process_cpu_seconds_total"),
    }


async def _wait_warm(controller: ControllerProcess, count: int, timeout: float = 600.0) -> None:
    """Wait until imgcache reports ``count`` warm nodes (its gauges refresh every progress interval)."""
    await poll(lambda: metric_sum(controller_metrics(controller), "imgcache_nodes", state="warm") >= count,
               timeout, f"{count} warm nodes in imgcache's metrics", 1.0)


async def _requests_per_new_node(
    cluster: BenchCluster, api: k8s_client.ApiClient, controller: ControllerProcess, p: ScaleParams, prefix: str
) -> JSON:
    """Add kwok nodes that imgcache warms for real; count its requests per node from the API server."""
    core = k8s_client.CoreV1Api(api)
    before = await anyio.to_thread.run_sync(cluster.imgcache_requests)
    began = time.monotonic()
    names = [f"{prefix}-{i}" for i in range(p.new_nodes)]
    for name in names:
        await core.create_node(node_manifest(name, labels={GROUP_LABEL: SCALE_GROUP}))

    with anyio.fail_after(600):
        while True:
            warm = 0
            for name in names:
                node = await core.read_node(name)
                progress = (node.metadata.annotations or {}).get("imgcache.io/prepull-progress", "")
                if f'"done": {p.images}' in progress and '"pending": 0' in progress:
                    warm += 1
            pods = await core.list_namespaced_pod("imgcache-system", label_selector="app.kubernetes.io/component="
                                                                                   "prepull", limit=1)
            if warm == len(names) and not pods.items:
                break
            await anyio.sleep(1.0)
    warmed = time.monotonic() - began
    # Two progress intervals (5 s each by default) and a margin, so the last annotation write is counted.
    await anyio.sleep(12)

    after = await anyio.to_thread.run_sync(cluster.imgcache_requests)
    diff = {key: after[key] - before[key] for key in before}
    return {
        "nodes": len(names),
        "seconds_to_warm": round(warmed, 1),
        "requests": diff,
        "per_node_excluding_watch_and_lease": diff["other"] / len(names),
        "per_node_all": (diff["other"] + diff["watch"] + diff["lease"]) / len(names),
    }


async def _steady_requests(cluster: BenchCluster, seconds: float) -> JSON:
    """Count imgcache's requests over a quiet period; watches and lease renewals are reported apart."""
    before = await anyio.to_thread.run_sync(cluster.imgcache_requests)
    await anyio.sleep(seconds)
    after = await anyio.to_thread.run_sync(cluster.imgcache_requests)
    per_minute = {key: (after[key] - before[key]) * 60 / seconds for key in ("other", "watch", "lease")}
    return {"seconds": seconds, "per_minute": per_minute}


def _profile_summary(path: Path, limit: int = 15) -> JSON:
    stats = pstats.Stats(str(path))
    rows = []
    for (filename, line, function), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{_short(filename)}:{line}({function})", "calls": calls,
                     "tottime": round(tottime, 3), "cumtime": round(cumtime, 3)})
    # Module bodies and the task wrappers only enclose the work, so the imgcache lists leave them out.
    wrappers = ("(<module>)", "cli.py:", "app.py:338(runner)")
    own = [r for r in rows if r["function"].startswith("imgcache/") and not any(w in r["function"]
                                                                               for w in wrappers)]
    return {
        "total_seconds": round(stats.total_tt, 2),  # type: ignore[attr-defined]
        "top_tottime": sorted(rows, key=lambda r: -r["tottime"])[:limit],
        "top_imgcache_tottime": sorted(own, key=lambda r: -r["tottime"])[:limit],
        "top_imgcache_cumtime": sorted(own, key=lambda r: -r["cumtime"])[:limit],
    }


def _short(filename: str) -> str:
    for marker in ("site-packages/", f"{REPO}/", "lib/python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename
