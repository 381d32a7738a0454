"""Metrics, logs, Events and `imgcache status` after scripted pull scenarios."""

from __future__ import annotations

import json
import subprocess
import sys

import anyio
import pytest
from kubernetes_asyncio import client as k8s_client
from prometheus_client.parser import text_string_to_metric_families

from cluster.helpers import eventually, image_cache
from testbed.controller import kubectl
from testbed.controlplane import REPO
from testbed.kubelet import FailureKind, FailureRule, ImageProfile, RegistryProfile

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

FAST = ("--pinner=false", "--status-interval=1", "--progress-interval=0.5", "--retry-initial=0.5", "--retry-max=1")


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Return every sample called ``name`` keyed by its sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text, name).get(tuple(sorted(labels.items())), 0.0)


async def create_cache(custom, namespace: str, name: str, images: list[str], **spec: object) -> None:
    body = image_cache(name, [{"image": i} for i in images], **spec)
    await custom.create_namespaced_custom_object("imgcache.io", "v1alpha1", namespace, "imagecaches", body)


async def progress(api, node: str) -> dict[str, int] | None:
    obj = await k8s_client.CoreV1Api(api).read_node(node)
    raw = (obj.metadata.annotations or {}).get("imgcache.io/prepull-progress")
    return json.loads(raw) if raw else None


async def settled(api, node: str, done: int, failed: int = 0) -> bool:
    p = await progress(api, node)
    return p is not None and p["done"] == done and p["failed"] == failed and p["pending"] == 0


async def test_pull_histograms_match_simulator(api_client, custom, namespace, nodes, kubelet, start_controller):
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=1.0)))
    images = [f"quay.io/team/app{i}:v1" for i in range(5)]
    controller = await start_controller(*FAST)
    (node,) = await nodes.create(1, arch="amd64")
    kubelet.preload(node, ["quay.io/team/cached:v1"])
    await create_cache(custom, namespace, "latency", [*images, "quay.io/team/cached:v1"])
    await eventually(lambda: settled(api_client, node, 6), timeout=60)

    async def counted() -> bool:
        text = await anyio.to_thread.run_sync(controller.metrics)
        return value(text, "imgcache_pull_duration_seconds_count", registry="quay.io") >= 5

    await eventually(counted, timeout=20)
    text = await anyio.to_thread.run_sync(controller.metrics)
    pulled = [r for r in kubelet.pull_log if r.node == node and r.error is None and r.image.startswith("quay.io/")]
    count = value(text, "imgcache_pull_duration_seconds_count", registry="quay.io")
    total = value(text, "imgcache_pull_duration_seconds_sum", registry="quay.io")
    assert count == len(pulled) == 5
    assert 0.8 <= total / count <= 1.5
    assert value(text, "imgcache_pull_duration_including_waiting_seconds_count", registry="quay.io") == 5
    assert value(text, "imgcache_pull_image_size_bytes_count", registry="quay.io") == 5
    assert value(text, "imgcache_pull_already_present_total", registry="quay.io") == 1
    assert value(text, "imgcache_node_warmup_seconds_count", platform="linux/amd64") == 1

    async def gauges_show_warm() -> bool:
        # Node gauges are refreshed once per progress interval.
        text = await anyio.to_thread.run_sync(controller.metrics)
        return value(text, "imgcache_nodes", state="warm") == 1

    assert await eventually(gauges_show_warm, timeout=10)


async def test_throttle_counter_matches_simulator(
    api_client, custom, namespace, nodes, kubelet_config, kubelet, start_controller
):
    # A long kubelet back-off keeps the kubelet from retrying inside a pod before imgcache
    # deletes it, so each throttled response is one failed prepull attempt.
    kubelet.config.backoff_initial = 60.0
    kubelet.config.backoff_max = 60.0
    kubelet.set_registry("quay.io", RegistryProfile(qps=1.0, burst=1))
    images = [f"quay.io/team/app{i}:v1" for i in range(6)]
    controller = await start_controller(*FAST, "--registry-qps=20", "--registry-burst=20")
    (node,) = await nodes.create(1, arch="amd64")
    await create_cache(custom, namespace, "throttle", images)
    await eventually(lambda: settled(api_client, node, 6), timeout=90)
    await anyio.sleep(1.5)
    text = await anyio.to_thread.run_sync(controller.metrics)
    throttled = kubelet.registry_requests["quay.io"].throttled
    assert throttled > 0
    assert value(text, "imgcache_registry_throttled_total", registry="quay.io", source="kubelet") == throttled
    assert value(text, "imgcache_pull_failures_total", registry="quay.io", **{"class": "throttled"}) == throttled
    assert value(text, "imgcache_registry_rate_limit", registry="quay.io") < 20


async def test_failure_classes_logged_once(api_client, custom, namespace, nodes, kubelet, start_controller):
    kinds = {
        "not_found": FailureKind.NOT_FOUND,
        "unauthorized": FailureKind.UNAUTHORIZED,
        "platform_mismatch": FailureKind.PLATFORM_MISMATCH,
        "disk_full": FailureKind.DISK_FULL,
        "network": FailureKind.TIMEOUT,
    }
    images = {cls: f"quay.io/team/{cls.replace('_', '-')}:v1" for cls in kinds}
    for cls, kind in kinds.items():
        kubelet.add_failure(FailureRule(kind, image=images[cls]))
    controller = await start_controller(*FAST, "--prepull-deadline=4")
    (node,) = await nodes.create(1, arch="amd64")
    await create_cache(custom, namespace, "classes", list(images.values()))
    await eventually(lambda: settled(api_client, node, 0, failed=5), timeout=90)
    text = await anyio.to_thread.run_sync(controller.metrics)
    for cls in kinds:
        assert value(text, "imgcache_pull_failures_total", registry="quay.io", **{"class": cls}) >= 1, cls
    entries = controller.logs()
    assert all(e.get("event") != "unparsed" for e in entries)
    failures = [e for e in entries if e.get("event") == "pull.failed"]
    keys = [(e["node"], e["image"], e["failure_class"]) for e in failures]
    assert len(keys) == len(set(keys))
    assert {e["failure_class"] for e in failures} == set(kinds)
    for entry in failures:
        for field in ("node", "image", "registry", "pod", "failure_class", "message", "hint", "timestamp"):
            assert entry.get(field), (field, entry)
    retried = [e for e in failures if e["failure_class"] in ("disk_full", "network")]
    attempts = kubelet.node_pulls[node].failed
    assert attempts > len(failures)
    assert retried


async def test_permanent_failure_warning_event(api_client, custom, namespace, nodes, kubelet, start_controller):
    kubelet.add_failure(FailureRule(FailureKind.NOT_FOUND, image="quay.io/team/typo:v9"))
    await start_controller(*FAST)
    (node,) = await nodes.create(1, arch="amd64")
    await create_cache(custom, namespace, "warn", ["quay.io/team/typo:v9", "quay.io/team/fine:v1"])
    await eventually(lambda: settled(api_client, node, 1, failed=1), timeout=60)
    core = k8s_client.CoreV1Api(api_client)

    async def warning() -> list[k8s_client.CoreV1Event]:
        events = await core.list_namespaced_event(namespace, field_selector="involvedObject.name=warn")
        return [e for e in events.items if e.type == "Warning" and e.reason == "PullFailed"]

    (event,) = await eventually(warning, timeout=30)
    assert "quay.io/team/typo:v9" in event.message
    assert "not_found" in event.message
    obj = await custom.get_namespaced_custom_object("imgcache.io", "v1alpha1", namespace, "imagecaches", "warn")
    entry = next(i for i in obj["status"]["images"] if i["image"] == "quay.io/team/typo:v9")
    assert entry["failed"] == 1
    degraded = next(c for c in obj["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "PullFailures"


async def test_status_command_reads_cluster(api_client, cluster, custom, namespace, nodes, kubelet, start_controller):
    await start_controller(*FAST)
    (node,) = await nodes.create(1, arch="arm64")
    await create_cache(custom, namespace, "statuscmd", ["quay.io/team/a:v1", "quay.io/team/b:v1"])
    await eventually(lambda: settled(api_client, node, 2), timeout=60)
    await anyio.sleep(2.5)
    result = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "imgcache", "status", f"--kubeconfig={cluster.kubeconfig}", "--json"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    row = next(r for r in report["nodes"] if r["node"] == node)
    assert (row["done"], row["pending"], row["failed"], row["platform"]) == (2, 0, 0, "linux/arm64")
    cache = next(r for r in report["imagecaches"] if r["imagecache"] == f"{namespace}/statuscmd")
    assert cache["ready"] == "True"
    assert any(r["registry"] == "quay.io" for r in report["registries"])
    assert report["leader"]


async def test_cluster_wide_events_view(api_client, cluster, custom, namespace, nodes, kubelet, start_controller):
    component = REPO / "manifests" / "overlays" / "cluster-events" / "clusterrole.yaml"
    await anyio.to_thread.run_sync(lambda: kubectl(cluster, "apply", "--server-side", "-f", str(component)))
    try:
        kubelet.set_registry("registry.example.test", RegistryProfile(images=ImageProfile(pull_seconds=0.5)))
        controller = await start_controller(*FAST, "--watch-cluster-events")
        (node,) = await nodes.create(1, arch="amd64")
        core = k8s_client.CoreV1Api(api_client)
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "workload"},
            "spec": {
                "nodeName": node,
                "restartPolicy": "Never",
                "containers": [{"name": "app", "image": "registry.example.test/shop/web:1.0"}],
            },
        }
        await core.create_namespaced_pod(namespace, pod)

        async def seen() -> bool:
            text = await anyio.to_thread.run_sync(controller.metrics)
            return value(text, "imgcache_pull_duration_seconds_count", registry="registry.example.test") == 1

        assert await eventually(seen, timeout=30)
    finally:
        await anyio.to_thread.run_sync(
            lambda: kubectl(cluster, "delete", "-f", str(component), "--ignore-not-found", check=False)
        )


async def test_node_changes_write_status_soon(api_client, custom, namespace, nodes, kubelet, start_controller):
    # A status interval far longer than the test, so only node changes can cause writes.
    await start_controller("--pinner=false", "--status-interval=300", "--progress-interval=0.5")
    kubelet.set_registry("slow.example", RegistryProfile(images=ImageProfile(pull_seconds=8.0)))
    await create_cache(custom, namespace, "joins", ["slow.example/team/app:v1"])

    async def status() -> dict:
        obj = await custom.get_namespaced_custom_object("imgcache.io", "v1alpha1", namespace, "imagecaches", "joins")
        return obj.get("status") or {}

    await nodes.create(1, arch="amd64")

    # The new node's pull takes 8 s, so the ImageCache is not Ready while it lasts.
    pulling = await eventually(lambda: _ready_is(status, "False"), timeout=6)
    assert pulling["images"][0]["pending"] == 1
    assert pulling["images"][0]["cached"] == 0

    # Once the node has the image, Ready turns True without waiting for the interval.
    warm = await eventually(lambda: _ready_is(status, "True"), timeout=20)
    assert warm["images"][0]["cached"] == 1
    assert warm["images"][0]["pending"] == 0


async def _ready_is(read, expected: str) -> dict | None:
    current = await read()
    conditions = {c["type"]: c["status"] for c in current.get("conditions", [])}
    return current if conditions.get("Ready") == expected else None
