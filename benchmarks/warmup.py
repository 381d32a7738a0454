"""Scenario 1: one new node warms up 40 images, with imgcache and three user strategies side by side.

Every (registry regime, strategy) pair gets its own kwok node and its own registry
host with identical image sizes, so all eight warm-ups run at the same time on the
same cluster without sharing a quota. Times are from the node's create request to the
end of the last of its images' first successful pull, as the simulated kubelet logs it.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import anyio
from kubernetes_asyncio import client as k8s_client

from benchmarks.catalog import (
    HELPER_SIZE,
    KUBELET_PULL_BURST,
    KUBELET_PULL_QPS,
    MB,
    PULL_LATENCY,
    ImageSet,
    draw_sizes,
    image_pod,
    kubelet_config,
    lower_bound,
)
from benchmarks.cluster import BENCH_NAMESPACE, GROUP_LABEL, BenchCluster, poll
from benchmarks.observe import first_present, registry_counts, requests_by_pod_kind, wait_present
from testbed.controller import HELPER_IMAGE
from testbed.kubelet import RegistryProfile, SimulatedKubelet
from testbed.nodes import create_nodes

JSON = dict[str, Any]
STRATEGIES = ("imgcache", "pinner", "unbounded", "periodic")
STRATEGY_TEXT = {
    "imgcache": "imgcache with default flags (prepull and pinner)",
    "pinner": "pinner only: one pod with the {images} images as containers, created at node creation",
    "unbounded": "unbounded prepull: one pod per image, all created at node creation, kubelet back-off only",
    "periodic": "periodic refresh: the unbounded pods, created at the next tick of a fixed-period job",
}


@dataclass(frozen=True)
class Regime:
    """A registry quota that every strategy's registry host gets; qps None means no quota."""

    name: str
    qps: float | None
    burst: int
    text: str


@dataclass(frozen=True)
class WarmupParams:
    images: int
    seed: int
    bandwidth: float
    time_scale: float
    refresh_period: float
    deadline: float
    regimes: tuple[Regime, ...]


def params(quick: bool) -> WarmupParams:
    regimes = (
        Regime("open", None, 1, "no registry quota: only the node's bandwidth limits pulls"),
        Regime("quota", 1.0, 10, "registry quota of 1 request/s with a burst of 10, the node's share of a "
                                 "quota that the rest of the cluster also uses"),
    )
    if quick:
        return WarmupParams(images=12, seed=1, bandwidth=50 * MB, time_scale=1.0, refresh_period=40.0,
                            deadline=100.0, regimes=regimes)
    return WarmupParams(images=40, seed=1, bandwidth=50 * MB, time_scale=1.0, refresh_period=150.0,
                        deadline=270.0, regimes=regimes)


def _host(regime: Regime, strategy: str) -> str:
    return f"{strategy}.{regime.name}.registry.bench"


def _node(regime: Regime, strategy: str) -> str:
    # testbed.nodes.create_nodes appends an index to the prefix it is given.
    return f"warmup-{regime.name}-{strategy}-0"


async def run(cluster: BenchCluster, quick: bool) -> JSON:
    p = params(quick)
    assert cluster.api is not None
    api = cluster.api
    sizes = draw_sizes(p.images, p.seed)
    sets = {(r.name, s): ImageSet(_host(r, s), sizes) for r in p.regimes for s in STRATEGIES}
    config = kubelet_config(p.bandwidth, p.time_scale)
    for regime in p.regimes:
        for strategy in STRATEGIES:
            config.images.update(sets[(regime.name, strategy)].profiles())
            if regime.qps is not None:
                config.registries[_host(regime, strategy)] = RegistryProfile(qps=regime.qps, burst=regime.burst)

    for regime in p.regimes:
        selector = {GROUP_LABEL: f"warmup-{regime.name}-imgcache"}
        await cluster.create_image_cache(f"warmup-{regime.name}", sets[(regime.name, "imgcache")].images, selector)
    controller = await cluster.start_controller("warmup-imgcache", [])
    # The pinner writes its DaemonSets after a short debounce; a node joins a settled cluster.
    apps = k8s_client.AppsV1Api(api)

    async def daemonsets_written() -> bool:
        return len((await apps.list_namespaced_daemon_set("imgcache-system")).items) >= len(p.regimes)

    await poll(daemonsets_written, 60, "imgcache's pinner DaemonSets")

    rng = random.Random(p.seed)
    phases = {regime.name: rng.uniform(0.0, p.refresh_period) for regime in p.regimes}
    created: dict[str, float] = {}
    core = k8s_client.CoreV1Api(api)
    sim = SimulatedKubelet(api, config)
    started = time.monotonic()
    async with sim.running(), anyio.create_task_group() as group:
        for regime in p.regimes:
            for strategy in STRATEGIES:
                group.start_soon(_join, core, api, regime, strategy, sets[(regime.name, strategy)], created,
                                 phases[regime.name] * p.time_scale)
        expected = {_node(r, s): sets[(r.name, s)].images for r in p.regimes for s in STRATEGIES}
        await wait_present(sim, expected, started + p.deadline * p.time_scale)
        group.cancel_scope.cancel()

    results = []
    for regime in p.regimes:
        bound = lower_bound(sum(sizes), p.bandwidth, p.images, regime.qps, regime.burst)
        for strategy in STRATEGIES:
            node = _node(regime, strategy)
            images = sets[(regime.name, strategy)].images
            times = first_present(sim, node, images)
            complete = len(times) == len(images)
            elapsed = (max(times.values()) - created[node]) / p.time_scale if complete else None
            row: JSON = {
                "regime": regime.name,
                "strategy": strategy,
                "complete": complete,
                "images_present": len(times),
                "seconds": elapsed,
                "bound_seconds": bound["seconds"],
                "ratio": elapsed / bound["seconds"] if elapsed is not None else None,
                "ratio_at_least": p.deadline / bound["seconds"],
                "registry_requests": registry_counts(sim, _host(regime, strategy)),
                "kubelet_refused": sim.node_pulls[node].qps_exceeded,
                "requests_by_pod_kind": requests_by_pod_kind(sim, _host(regime, strategy)),
            }
            if strategy == "periodic":
                row["tick_after_seconds"] = phases[regime.name]
            starts = [r.queued_at for r in sim.pull_log if r.node == node]
            if starts:
                row["first_pull_seconds"] = (min(starts) - created[node]) / p.time_scale
            helper = first_present(sim, node, [HELPER_IMAGE])
            if helper:
                row["helper_present_seconds"] = (helper[HELPER_IMAGE] - created[node]) / p.time_scale
            results.append(row)

    await cluster.stop_controller(controller)
    await cluster.cleanup_imgcache()
    await cluster.delete_nodes(f"{GROUP_LABEL}")
    return {
        "title": "Single node warm-up",
        "parameters": {
            **{k: v for k, v in asdict(p).items() if k != "regimes"},
            "regimes": [asdict(r) for r in p.regimes],
            "image_sizes_bytes": list(sizes),
            "total_bytes": sum(sizes),
            "strategies": {name: text.format(images=p.images) for name, text in STRATEGY_TEXT.items()},
            "imgcache_flags": "defaults",
            "helper_image_bytes": HELPER_SIZE,
            "kubelet_pull_qps": KUBELET_PULL_QPS,
            "kubelet_pull_burst": KUBELET_PULL_BURST,
            "pull_latency_seconds": PULL_LATENCY,
        },
        "bounds": {r.name: lower_bound(sum(sizes), p.bandwidth, p.images, r.qps, r.burst) for r in p.regimes},
        "results": results,
    }


async def _join(
    core: k8s_client.CoreV1Api,
    api: k8s_client.ApiClient,
    regime: Regime,
    strategy: str,
    images: ImageSet,
    created: dict[str, float],
    tick_delay: float,
) -> None:
    """Create one strategy's node; the baselines then create their pods as a user would."""
    name = _node(regime, strategy)
    labels = {GROUP_LABEL: f"warmup-{regime.name}-{strategy}"}
    created[name] = time.monotonic()
    await create_nodes(api, 1, prefix=f"warmup-{regime.name}-{strategy}", labels=labels)
    pod_labels = {GROUP_LABEL: labels[GROUP_LABEL]}
    if strategy == "pinner":
        await core.create_namespaced_pod(BENCH_NAMESPACE, image_pod(f"{name}-pin", name, images.images,
                                                                    keep_running=True, labels=pod_labels))
    elif strategy in ("unbounded", "periodic"):
        if strategy == "periodic":
            await anyio.sleep(tick_delay)
        async with anyio.create_task_group() as group:
            for index, image in enumerate(images.images):
                body = image_pod(f"{name}-{index:02d}", name, [image], keep_running=False, labels=pod_labels)
                group.start_soon(core.create_namespaced_pod, BENCH_NAMESPACE, body)

