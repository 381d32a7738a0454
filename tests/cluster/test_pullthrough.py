"""ECR pull-through cache rewriting end to end: DaemonSets and prepull pods use the cache."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kubernetes_asyncio import client as k8s_client

from cluster.helpers import eventually, image_cache
from testbed.controller import NAMESPACE
from testbed.controlplane import REPO

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

ECR = "111122223333.dkr.ecr.us-west-2.amazonaws.com"
RULES = (
    "--pull-through-rule=docker-hub=registry-1.docker.io@111122223333/us-west-2",
    "--pull-through-rule=quay=quay.io@111122223333/us-west-2",
)
FAST = ("--pin-debounce=0.5", "--status-interval=1", "--progress-interval=0.5")
IMAGES = ["nginx:1.27", "quay.io/jetstack/cert-manager-controller:v1.16.2", "registry.k8s.io/pause:3.10"]


async def observed_images(api, node: str) -> tuple[set[str], set[str]]:
    apps = k8s_client.AppsV1Api(api)
    core = k8s_client.CoreV1Api(api)
    daemonsets = await apps.list_namespaced_daemon_set(NAMESPACE, label_selector="app.kubernetes.io/component=pinner")
    pinned = {c.image for ds in daemonsets.items for c in ds.spec.template.spec.containers}
    node_obj = await core.read_node(node)
    done = (node_obj.metadata.annotations or {}).get("imgcache.io/prepulled", "")
    return pinned, set(done.split(",")) - {""}


async def run_scenario(api, custom, namespace, nodes, start_controller, *args: str) -> tuple[set[str], list[str]]:
    await start_controller(*FAST, *args)
    (node,) = await nodes.create(1, arch="amd64")
    body = image_cache(
        "mirrors", [{"image": i} for i in IMAGES[:2]] + [{"image": IMAGES[2], "pullThroughCache": False}]
    )
    await custom.create_namespaced_custom_object("imgcache.io", "v1alpha1", namespace, "imagecaches", body)

    async def settled() -> tuple[set[str], set[str]] | None:
        pinned, done = await observed_images(api, node)
        return (pinned, done) if len(pinned) == 3 and len(done) == 3 else None

    pinned, _ = await eventually(settled, timeout=60)

    async def status_images() -> list[str] | None:
        obj = await custom.get_namespaced_custom_object("imgcache.io", "v1alpha1", namespace, "imagecaches", "mirrors")
        entries = (obj.get("status") or {}).get("images") or []
        return [entry["resolved"] for entry in entries] or None

    return pinned, await eventually(status_images, timeout=30)


async def test_rules_rewrite_pins_and_prepulls(api_client, custom, namespace, nodes, kubelet, start_controller):
    pinned, resolved = await run_scenario(
        api_client, custom, namespace, nodes, start_controller, "--pull-through-cache=true", *RULES
    )
    expected = {
        f"{ECR}/docker-hub/library/nginx:1.27",
        f"{ECR}/quay/jetstack/cert-manager-controller:v1.16.2",
        "registry.k8s.io/pause:3.10",
    }
    assert pinned == expected
    assert set(resolved) == expected
    held = {i for i in kubelet.images(kubelet.node_names()[-1])}
    assert f"{ECR}/docker-hub/library/nginx:1.27" in held


async def test_rewrite_off_keeps_originals(api_client, custom, namespace, nodes, kubelet, start_controller):
    pinned, resolved = await run_scenario(
        api_client, custom, namespace, nodes, start_controller, "--pull-through-cache=false", *RULES
    )
    expected = {
        "docker.io/library/nginx:1.27",
        "quay.io/jetstack/cert-manager-controller:v1.16.2",
        "registry.k8s.io/pause:3.10",
    }
    assert pinned == expected
    assert set(resolved) == expected


@pytest.mark.parametrize(
    ("image", "expected", "rule"),
    [
        ("nginx:1.27", f"{ECR}/docker-hub/library/nginx:1.27", "docker-hub"),
        (
            "quay.io/cilium/cilium:v1.16.4@sha256:" + "a" * 64,
            f"{ECR}/quay/cilium/cilium:v1.16.4@sha256:" + "a" * 64,
            "quay",
        ),
        ("ghcr.io/fluxcd/source-controller:v1.4.1", "ghcr.io/fluxcd/source-controller:v1.4.1", "none"),
        (
            "quay.io/mirror/app:1 --pull-through-rule=team=quay.io/mirror@111122223333/us-west-2",
            f"{ECR}/team/app:1",
            "team -> quay.io/mirror (111122223333/us-west-2)",
        ),
        ("ghcr.io/other/app:1", "ghcr.io/other/app:1", "none (no rule covers ghcr.io/other/app)"),
    ],
    ids=["docker-hub-official", "quay-tag-and-digest", "no-rule", "upstream-prefix", "no-rule-named"],
)
def test_rewrite_command(image: str, expected: str, rule: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "imgcache", "rewrite", *image.split(), *RULES],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert lines["rewritten"].strip() == expected
    assert lines["rule"].strip().startswith(rule)


def test_rewrite_command_rejects_bad_input() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "imgcache", "rewrite", "Nginx:1.27"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Nginx" in result.stderr
    assert "Traceback" not in result.stderr
