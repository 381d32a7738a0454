"""Measurements taken from the simulated kubelet and from API watch streams."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import anyio
from kubernetes_asyncio import client as k8s_client

from testbed.kubelet import SimulatedKubelet

JSON = dict[str, Any]


def first_present(sim: SimulatedKubelet, node: str, images: list[str]) -> dict[str, float]:
    """Return, for each image, when its first successful pull on ``node`` finished (monotonic)."""
    expected = set(images)
    times: dict[str, float] = {}
    for record in sim.pull_log:
        if record.node != node or record.image not in expected or record.error is not None:
            continue
        if record.finished_at is None:
            continue
        if record.image not in times or record.finished_at < times[record.image]:
            times[record.image] = record.finished_at
    return times


async def wait_present(
    sim: SimulatedKubelet, expected: Mapping[str, list[str]], deadline: float, poll: float = 0.5
) -> set[str]:
    """Wait until every node contains its images or ``deadline`` (monotonic) passes; return the warm nodes."""
    warm: set[str] = set()
    while True:
        for node, images in expected.items():
            if node not in warm and set(images) <= sim.images(node):
                warm.add(node)
        if len(warm) == len(expected) or time.monotonic() >= deadline:
            return warm
        await anyio.sleep(poll)


def registry_counts(sim: SimulatedKubelet, host: str) -> JSON:
    counts = sim.registry_requests.get(host)
    return asdict(counts) if counts is not None else {"total": 0, "succeeded": 0, "throttled": 0, "failed": 0}


def requests_by_pod_kind(sim: SimulatedKubelet, host: str) -> dict[str, int]:
    """Count pull attempts against ``host`` by the kind of pod that made them.

    Each attempt sends one registry request, because the scenarios model no layer requests.
    """
    counts: dict[str, int] = {}
    prefix = f"{host}/"
    for record in sim.pull_log:
        if not record.image.startswith(prefix):
            continue
        name = record.pod.split("/", 1)[-1]
        if name.startswith("imgcache-prepull-"):
            kind = "imgcache prepull pods"
        elif name.startswith("imgcache-pinner-"):
            kind = "imgcache pinner pods"
        else:
            kind = "baseline pods"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


@dataclass
class WatchLog:
    """Arrival times (monotonic) of ADDED events of one collection, by object name."""

    added: dict[str, float] = field(default_factory=dict)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    node_of: dict[str, str] = field(default_factory=dict)


async def record_added(api: k8s_client.ApiClient, path: str, log: WatchLog, label_selector: str | None = None,
                       ready: anyio.Event | None = None) -> None:
    """Watch ``path`` from now on and record when each object's ADDED event arrives.

    The watch starts at the resourceVersion of a fresh list, so objects that exist
    already are not reported. It runs until cancelled and reconnects when the server ends the stream.
    """
    query = {"limit": "1"}
    if label_selector:
        query["labelSelector"] = label_selector
    listing = await _get_json(api, path, query)
    version = listing["metadata"]["resourceVersion"]
    while True:
        watch_query = {"watch": "true", "resourceVersion": version, "allowWatchBookmarks": "true",
                       "timeoutSeconds": "600"}
        if label_selector:
            watch_query["labelSelector"] = label_selector
        response = await api.call_api(
            path, "GET", query_params=list(watch_query.items()), header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"], _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=700),
        )
        try:
            if ready is not None:
                ready.set()
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                now = time.monotonic()
                obj = event.get("object") or {}
                meta = obj.get("metadata") or {}
                if meta.get("resourceVersion"):
                    version = meta["resourceVersion"]
                if event.get("type") != "ADDED":
                    continue
                name = meta.get("name", "")
                log.added.setdefault(name, now)
                log.labels[name] = meta.get("labels") or {}
                node = (obj.get("spec") or {}).get("nodeName")
                if node:
                    log.node_of[name] = node
        finally:
            response.close()


async def _get_json(api: k8s_client.ApiClient, path: str, query: dict[str, str]) -> JSON:
    response = await api.call_api(
        path, "GET", query_params=list(query.items()), header_params={"Accept": "application/json"},
        auth_settings=["BearerToken"], _preload_content=False, _request_timeout=60,
    )
    try:
        result: JSON = json.loads(await response.read())
        return result
    finally:
        response.release()
