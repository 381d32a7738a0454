"""Pinner DaemonSets against the real control plane, with imgcache running as its ServiceAccount."""

from __future__ import annotations

import signal

import anyio
import pytest
from kubernetes_asyncio import client as k8s_client

from cluster.helpers import addon_images, eventually, image_cache
from imgcache.reference import parse
from testbed.controller import HELPER_IMAGE, NAMESPACE
from testbed.kubelet import ImageProfile, RegistryProfile

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

FAST = ("--pin-debounce=0.5", "--status-interval=1", "--progress-interval=1")


async def pinner_daemonsets(api: k8s_client.ApiClient) -> dict[str, k8s_client.V1DaemonSet]:
    apps = k8s_client.AppsV1Api(api)
    listing = await apps.list_namespaced_daemon_set(NAMESPACE, label_selector="app.kubernetes.io/component=pinner")
    return {ds.metadata.name: ds for ds in listing.items}


def container_images(ds: k8s_client.V1DaemonSet) -> set[str]:
    return {c.image for c in ds.spec.template.spec.containers}


async def create_cache(custom: k8s_client.CustomObjectsApi, namespace: str, body: dict[str, object]) -> None:
    await custom.create_namespaced_custom_object("imgcache.io", "v1alpha1", namespace, "imagecaches", body)


async def patch_images(
    custom: k8s_client.CustomObjectsApi, namespace: str, name: str, images: list[dict[str, object]]
) -> None:
    await custom.patch_namespaced_custom_object(
        "imgcache.io",
        "v1alpha1",
        namespace,
        "imagecaches",
        name,
        {"spec": {"images": images}},
        _content_type="application/merge-patch+json",
    )


async def test_addon_images_pinned_on_every_node(api_client, custom, namespace, nodes, kubelet, start_controller):
    images = addon_images()
    amd = await nodes.create(2, arch="amd64")
    arm = await nodes.create(1, arch="arm64")
    await start_controller(*FAST, "--prepull=false")
    await create_cache(custom, namespace, image_cache("addons", [{"image": i} for i in images]))
    expected = {str(parse(i)) for i in images}

    async def both_platforms() -> dict[str, k8s_client.V1DaemonSet] | None:
        found = await pinner_daemonsets(api_client)
        return found if set(found) == {"imgcache-pinner-linux-amd64", "imgcache-pinner-linux-arm64"} else None

    daemonsets = await eventually(both_platforms)
    for ds in daemonsets.values():
        assert container_images(ds) == expected
        assert ds.spec.update_strategy.rolling_update.max_unavailable == 0
    for node in amd + arm:
        await eventually(lambda node=node: _holds_all(kubelet, node, expected), timeout=90)


async def _holds_all(kubelet, node: str, expected: set[str]) -> bool:
    return expected <= {str(parse(i)) for i in kubelet.images(node)}


async def test_added_image_rolls_out_once_with_surge(api_client, custom, namespace, nodes, kubelet, start_controller):
    names = await nodes.create(3, arch="amd64")
    await start_controller(*FAST, "--prepull=false")
    base = [{"image": "registry.k8s.io/pause:3.10"}, {"image": "quay.io/jetstack/cert-manager-controller:v1.16.2"}]
    await create_cache(custom, namespace, image_cache("rollout", base))
    core = k8s_client.CoreV1Api(api_client)

    async def running_everywhere() -> bool:
        pods = await core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/component=pinner")
        running = {p.spec.node_name for p in pods.items if p.status.phase == "Running"}
        return set(names) <= running

    await eventually(running_everywhere, timeout=90)
    before = (await pinner_daemonsets(api_client))["imgcache-pinner-linux-amd64"]
    old_images = container_images(before)

    gaps: list[str] = []
    stop = anyio.Event()

    async def watch_pins() -> None:
        # Every node must keep a running pod that contains the old pins for the whole rollout.
        while not stop.is_set():
            pods = await core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/component=pinner")
            for node in names:
                holders = [
                    p
                    for p in pods.items
                    if p.spec.node_name == node
                    and p.status.phase == "Running"
                    and old_images <= {c.image for c in p.spec.containers}
                ]
                if not holders:
                    gaps.append(node)
            await anyio.sleep(0.05)

    added = [*base, {"image": "ghcr.io/fluxcd/source-controller:v1.4.1"}]
    async with anyio.create_task_group() as group:
        group.start_soon(watch_pins)
        await patch_images(custom, namespace, "rollout", added)

        async def rolled_out() -> bool:
            ds = (await pinner_daemonsets(api_client))["imgcache-pinner-linux-amd64"]
            status = ds.status
            return (
                len(container_images(ds)) == 3
                and status.observed_generation == ds.metadata.generation
                and status.updated_number_scheduled == len(names)
                and status.number_available == len(names)
                and status.desired_number_scheduled == len(names)
            )

        await eventually(rolled_out, timeout=120)
        await eventually(lambda: _only_new_pods(core, names), timeout=60)
        stop.set()
    after = (await pinner_daemonsets(api_client))["imgcache-pinner-linux-amd64"]
    assert after.metadata.generation == before.metadata.generation + 1
    assert gaps == []


async def _only_new_pods(core: k8s_client.CoreV1Api, names: list[str]) -> bool:
    pods = await core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/component=pinner")
    live = [p for p in pods.items if p.metadata.deletion_timestamp is None]
    return len(live) == len(names) and all(len(p.spec.containers) == 3 for p in live)


async def test_removed_image_and_pin_false(api_client, custom, namespace, nodes, start_controller):
    await nodes.create(1, arch="amd64")
    await start_controller(*FAST, "--prepull=false")
    images = [
        {"image": "registry.k8s.io/pause:3.10"},
        {"image": "quay.io/prometheus/blackbox-exporter:v0.25.0"},
        {"image": "docker.io/grafana/loki:3.3.0", "pin": False},
    ]
    await create_cache(custom, namespace, image_cache("removal", images))

    async def pinned() -> set[str] | None:
        found = await pinner_daemonsets(api_client)
        ds = found.get("imgcache-pinner-linux-amd64")
        return container_images(ds) if ds else None

    first = await eventually(pinned)
    assert first == {"registry.k8s.io/pause:3.10", "quay.io/prometheus/blackbox-exporter:v0.25.0"}
    await patch_images(custom, namespace, "removal", images[:1] + images[2:])
    second = await eventually(lambda: _pinned_equals(pinned, {"registry.k8s.io/pause:3.10"}))
    assert second


async def _pinned_equals(pinned, expected: set[str]) -> bool:
    return await pinned() == expected


async def test_platform_and_selector_filtering(api_client, custom, namespace, nodes, kubelet, start_controller):
    await nodes.create(1, arch="amd64", labels={"team": "a"})
    await nodes.create(1, arch="arm64")
    windows = await nodes.create(1, arch="amd64", os="windows")
    await start_controller(*FAST, "--prepull=false")
    await create_cache(
        custom,
        namespace,
        image_cache(
            "everywhere",
            [
                {"image": "registry.k8s.io/pause:3.10"},
                {"image": "quay.io/cilium/cilium:v1.16.4", "platforms": ["linux/arm64"]},
            ],
        ),
    )
    await create_cache(
        custom,
        namespace,
        image_cache("team-a", [{"image": "ghcr.io/kyverno/kyverno:v1.13.2"}], nodeSelector={"team": "a"}),
    )

    async def four() -> dict[str, k8s_client.V1DaemonSet] | None:
        # One per platform, plus one per platform for the team-a selector.
        found = await pinner_daemonsets(api_client)
        return found if len(found) == 4 else None

    found = await eventually(four)
    amd = found["imgcache-pinner-linux-amd64"]
    arm = found["imgcache-pinner-linux-arm64"]
    team = [
        ds for name, ds in found.items() if name not in ("imgcache-pinner-linux-amd64", "imgcache-pinner-linux-arm64")
    ]
    assert container_images(amd) == {"registry.k8s.io/pause:3.10"}
    assert container_images(arm) == {"registry.k8s.io/pause:3.10", "quay.io/cilium/cilium:v1.16.4"}
    assert [container_images(ds) for ds in team] == [{"ghcr.io/kyverno/kyverno:v1.13.2"}] * 2
    assert [ds.spec.template.spec.node_selector["team"] for ds in team] == ["a", "a"]
    assert not any(name.startswith("imgcache-pinner-windows") for name in found)
    core = k8s_client.CoreV1Api(api_client)
    pods = await core.list_namespaced_pod(NAMESPACE, field_selector=f"spec.nodeName={windows[0]}")
    assert pods.items == []


async def test_invalid_entry_reported_in_status(api_client, custom, namespace, nodes, start_controller):
    await nodes.create(1, arch="amd64")
    await start_controller(*FAST, "--prepull=false")
    too_long = "registry.example.com/" + "a" * 250 + ":v1"
    await create_cache(
        custom,
        namespace,
        image_cache(
            "mixed",
            [
                {"image": too_long},
                {"image": "registry.k8s.io/pause:3.10"},
            ],
        ),
    )

    async def status() -> dict | None:
        obj = await custom.get_namespaced_custom_object("imgcache.io", "v1alpha1", namespace, "imagecaches", "mixed")
        return obj.get("status") if obj.get("status", {}).get("images") else None

    observed = await eventually(status)
    entries = {entry["image"]: entry for entry in observed["images"]}
    assert "error" in entries[too_long]
    assert "255" in entries[too_long]["error"]
    assert "error" not in entries["registry.k8s.io/pause:3.10"]
    degraded = next(c for c in observed["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "InvalidEntries"
    ds = (await eventually(lambda: pinner_daemonsets(api_client)))["imgcache-pinner-linux-amd64"]
    assert container_images(ds) == {"registry.k8s.io/pause:3.10"}


async def test_deleted_daemonset_restored(api_client, custom, namespace, nodes, start_controller):
    await nodes.create(1, arch="amd64")
    await start_controller(*FAST, "--prepull=false")
    await create_cache(custom, namespace, image_cache("restore", [{"image": "registry.k8s.io/pause:3.10"}]))
    first = (await eventually(lambda: pinner_daemonsets(api_client)))["imgcache-pinner-linux-amd64"]
    apps = k8s_client.AppsV1Api(api_client)
    await apps.delete_namespaced_daemon_set("imgcache-pinner-linux-amd64", NAMESPACE)

    async def recreated() -> bool:
        found = await pinner_daemonsets(api_client)
        ds = found.get("imgcache-pinner-linux-amd64")
        return ds is not None and ds.metadata.uid != first.metadata.uid

    assert await eventually(recreated)
    # A JSON patch edits the live object without a read-modify-write race against the
    # DaemonSet controller's status updates.
    await apps.patch_namespaced_daemon_set(
        "imgcache-pinner-linux-amd64",
        NAMESPACE,
        [{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "registry.k8s.io/pause:3.9"}],
        _content_type="application/json-patch+json",
    )

    async def reverted() -> bool:
        ds = (await pinner_daemonsets(api_client))["imgcache-pinner-linux-amd64"]
        return container_images(ds) == {"registry.k8s.io/pause:3.10"}

    assert await eventually(reverted)


async def test_emptied_catalogue_deletes_daemonsets(api_client, custom, namespace, nodes, start_controller):
    await nodes.create(1, arch="amd64")
    await start_controller(*FAST, "--prepull=false")
    await create_cache(custom, namespace, image_cache("gone", [{"image": "registry.k8s.io/pause:3.10"}]))
    await eventually(lambda: pinner_daemonsets(api_client))
    await custom.delete_namespaced_custom_object("imgcache.io", "v1alpha1", namespace, "imagecaches", "gone")

    async def none_left() -> bool:
        return not await pinner_daemonsets(api_client)

    assert await eventually(none_left)


async def test_two_replicas_one_leader(api_client, custom, namespace, nodes, start_controller):
    await nodes.create(1, arch="amd64")
    first = await start_controller(*FAST, "--prepull=false", identity="replica-a")
    second = await start_controller(*FAST, "--prepull=false", identity="replica-b")
    await create_cache(custom, namespace, image_cache("leader", [{"image": "registry.k8s.io/pause:3.10"}]))
    await eventually(lambda: pinner_daemonsets(api_client))
    await anyio.sleep(2)
    leading = [p for p in (first, second) if "imgcache_leader 1.0" in p.metrics()]
    assert len(leading) == 1
    follower = second if leading[0] is first else first
    assert follower.get("/readyz")[0] == 200
    applied = [e for p in (first, second) for e in p.logs() if e.get("event") == "pinner.applied"]
    assert {e.get("daemonset") for e in applied} == {"imgcache-pinner-linux-amd64"}
    assert all(e in leading[0].logs() for e in applied)


async def test_sigterm_exits_cleanly(start_controller):
    process = await start_controller(*FAST)
    code = await anyio.to_thread.run_sync(process.stop, signal.SIGTERM)
    assert code == 0
    events = [e.get("event") for e in process.logs()]
    assert "controller.stopped" in events
    assert "task.failed" not in events


async def test_pins_wait_for_prepulled_images(api_client, custom, namespace, nodes, kubelet, start_controller):
    """With prepull on, pinner pods pull only the images that the prepuller leaves out."""
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=0.5)))
    prepulled = [f"quay.io/team/pinned{i}:v1" for i in range(4)]
    pin_only = "quay.io/team/pin-only:v1"
    await start_controller(*FAST, "--max-inflight-per-node=2")
    entries = [{"image": i} for i in prepulled] + [{"image": pin_only, "prepull": False}]
    await create_cache(custom, namespace, image_cache("pins", entries))
    names = await nodes.create(3)
    core = k8s_client.CoreV1Api(api_client)

    async def pins_ready() -> bool:
        pods = await core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/component=pinner")
        ready = {
            pod.spec.node_name
            for pod in pods.items
            if len(pod.status.container_statuses or []) == 5
            and all(status.ready for status in pod.status.container_statuses)
        }
        return set(names) <= ready

    await eventually(pins_ready, timeout=120)

    pinner_pulls = [r for r in kubelet.pull_log if r.node in names and "/imgcache-pinner-" in r.pod]
    prepull_pulls = [r for r in kubelet.pull_log if r.node in names and "/imgcache-prepull-" in r.pod]
    assert sorted(r.image for r in pinner_pulls if r.image != HELPER_IMAGE) == sorted([str(parse(pin_only))] * 3)
    assert sorted(r.image for r in prepull_pulls if r.image != HELPER_IMAGE) == sorted(
        str(parse(i)) for i in prepulled for _ in names
    )
    assert kubelet.registry_requests["quay.io"].total == 3 * 5
