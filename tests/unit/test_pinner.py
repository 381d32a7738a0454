"""Tests of the pinner's DaemonSet grouping and of the DaemonSets it builds."""

from __future__ import annotations

import re
from typing import Any

import pytest

from imgcache.catalogue import Catalogue
from imgcache.model import JSON, Node
from imgcache.pinner import (
    DAEMONSET_LABEL,
    IMAGES_HASH_ANNOTATION,
    SPEC_HASH_ANNOTATION,
    Group,
    PinnerOptions,
    desired_daemonsets,
    group_images,
)
from imgcache.rewrite import PullThroughRule, Rewriter
from unit.factories import catalogue_of, image_named, imagecache_json, node

OPTIONS = PinnerOptions(
    namespace="imgcache-system",
    helper_image="registry.example.com/imgcache:v1",
    priority_class="system-node-critical",
    host_network=True,
)
AMD64 = node("x86-1", arch="amd64")
ARM64 = node("arm-1", arch="arm64")
WINDOWS = node("win-1", os="windows", arch="amd64")
NGINX = "docker.io/library/nginx:latest"
REDIS = "docker.io/library/redis:latest"
CUDA = "nvcr.io/nvidia/cuda:12.4"
GPU = (("pool", "gpu"),)


def groups_of(catalogue: Catalogue, nodes: list[Node]) -> dict[tuple[str, str, tuple[tuple[str, str], ...]], list[str]]:
    """Return (os, arch, selector): resolved references, for compact comparisons."""
    return {
        (group.os, group.arch, group.selector): [str(image.resolved) for image in images]
        for group, images in group_images(catalogue, nodes).items()
    }


def sorted_refs(catalogue: Catalogue, *refs: str) -> list[str]:
    """Return ``refs`` in the order the pinner lists images (by image hash)."""
    return sorted(refs, key=lambda ref: image_named(catalogue, ref).hash)


def only_daemonset(catalogue: Catalogue, nodes: list[Node] | None = None, options: PinnerOptions = OPTIONS) -> JSON:
    (daemonset,) = desired_daemonsets(catalogue, nodes or [AMD64], options).values()
    return daemonset


def pod_spec(daemonset: JSON) -> JSON:
    spec: JSON = daemonset["spec"]["template"]["spec"]
    return spec


# -- grouping --------------------------------------------------------------------


def test_group_by_platform() -> None:
    catalogue = catalogue_of(imagecache_json("base", ["nginx", {"image": "redis", "platforms": ["linux/arm64"]}]))

    groups = groups_of(catalogue, [AMD64, ARM64, WINDOWS])

    assert groups == {
        ("linux", "amd64", ()): [NGINX],
        ("linux", "arm64", ()): sorted_refs(catalogue, NGINX, REDIS),
    }


def test_group_only_platforms_with_nodes() -> None:
    catalogue = catalogue_of(imagecache_json("base", ["nginx"]))

    assert set(groups_of(catalogue, [ARM64, node("arm-2", arch="arm64")])) == {("linux", "arm64", ())}


def test_group_windows_only_cluster_empty() -> None:
    catalogue = catalogue_of(imagecache_json("base", ["nginx"]))

    assert desired_daemonsets(catalogue, [WINDOWS], OPTIONS) == {}


def test_group_no_nodes_empty() -> None:
    catalogue = catalogue_of(imagecache_json("base", ["nginx"]))

    assert desired_daemonsets(catalogue, [], OPTIONS) == {}


def test_group_nothing_pinned_empty() -> None:
    catalogue = catalogue_of(imagecache_json("warm", [{"image": "nginx", "pin": False}]))

    assert desired_daemonsets(catalogue, [AMD64, ARM64], OPTIONS) == {}


def test_group_pin_false_absent() -> None:
    catalogue = catalogue_of(imagecache_json("base", ["nginx", {"image": "redis", "pin": False}]))

    assert groups_of(catalogue, [AMD64]) == {("linux", "amd64", ()): [NGINX]}


def test_group_prepull_false_still_pinned() -> None:
    catalogue = catalogue_of(imagecache_json("base", [{"image": "nginx", "prepull": False}]))

    assert groups_of(catalogue, [AMD64]) == {("linux", "amd64", ()): [NGINX]}


def test_group_pin_only_scope_decides() -> None:
    # The prepull-only declaration for every node does not pin the image outside the GPU pool.
    catalogue = catalogue_of(
        imagecache_json("gpu", [CUDA], node_selector={"pool": "gpu"}),
        imagecache_json("warm", [{"image": CUDA, "pin": False}], namespace="team-b"),
    )

    assert groups_of(catalogue, [AMD64]) == {("linux", "amd64", GPU): [CUDA]}


def test_group_by_selector() -> None:
    catalogue = catalogue_of(
        imagecache_json("base", ["nginx"]),
        imagecache_json("gpu", [CUDA], node_selector={"pool": "gpu"}),
    )

    assert groups_of(catalogue, [AMD64]) == {
        ("linux", "amd64", ()): [NGINX],
        ("linux", "amd64", GPU): [CUDA],
    }


def test_group_broader_selector_wins() -> None:
    catalogue = catalogue_of(
        imagecache_json("base", ["nginx"]),
        imagecache_json("gpu", ["nginx", CUDA], node_selector={"pool": "gpu"}),
    )

    assert groups_of(catalogue, [AMD64]) == {
        ("linux", "amd64", ()): [NGINX],
        ("linux", "amd64", GPU): [CUDA],
    }


def test_group_nested_selectors() -> None:
    catalogue = catalogue_of(
        imagecache_json("team", ["nginx"], node_selector={"team": "a"}),
        imagecache_json("team-gpu", ["nginx", "redis"], node_selector={"team": "a", "pool": "gpu"}),
    )

    assert groups_of(catalogue, [AMD64]) == {
        ("linux", "amd64", (("team", "a"),)): [NGINX],
        ("linux", "amd64", (("pool", "gpu"), ("team", "a"))): [REDIS],
    }


def test_group_disjoint_selectors_both_kept() -> None:
    catalogue = catalogue_of(
        imagecache_json("gpu", ["nginx"], node_selector={"pool": "gpu"}),
        imagecache_json("team", ["nginx"], node_selector={"team": "a"}),
    )

    assert groups_of(catalogue, [AMD64]) == {
        ("linux", "amd64", GPU): [NGINX],
        ("linux", "amd64", (("team", "a"),)): [NGINX],
    }


def test_group_broader_selector_other_platform() -> None:
    # The broad declaration covers amd64 only, so the GPU group keeps the image on arm64.
    catalogue = catalogue_of(
        imagecache_json("base", [{"image": "nginx", "platforms": ["linux/amd64"]}]),
        imagecache_json("gpu", ["nginx"], node_selector={"pool": "gpu"}),
    )

    assert groups_of(catalogue, [AMD64, ARM64]) == {
        ("linux", "amd64", ()): [NGINX],
        ("linux", "arm64", GPU): [NGINX],
    }


def test_group_arch_selector_one_platform() -> None:
    catalogue = catalogue_of(imagecache_json("x86", ["nginx"], node_selector={"kubernetes.io/arch": "amd64"}))

    daemonsets = desired_daemonsets(catalogue, [AMD64, ARM64], OPTIONS)

    arches = [ds["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/arch"] for ds in daemonsets.values()]
    assert arches == ["amd64"]


def test_group_name() -> None:
    assert Group("linux", "amd64", ()).name == "imgcache-pinner-linux-amd64"
    assert re.fullmatch(r"imgcache-pinner-linux-arm64-[0-9a-f]{8}", Group("linux", "arm64", GPU).name)
    assert Group("linux", "amd64", GPU).name != Group("linux", "amd64", (("pool", "cpu"),)).name


# -- DaemonSet ---------------------------------------------------------------------


def test_daemonset_metadata() -> None:
    catalogue = catalogue_of(imagecache_json("base", ["nginx"]))

    daemonset = only_daemonset(catalogue)

    metadata = daemonset["metadata"]
    assert (daemonset["apiVersion"], daemonset["kind"]) == ("apps/v1", "DaemonSet")
    assert metadata["name"] == "imgcache-pinner-linux-amd64"
    assert metadata["namespace"] == "imgcache-system"
    assert metadata["labels"]["app.kubernetes.io/managed-by"] == "imgcache"
    assert metadata["labels"]["app.kubernetes.io/component"] == "pinner"
    assert re.fullmatch(r"[0-9a-f]{16}", metadata["annotations"][SPEC_HASH_ANNOTATION])


def test_daemonset_selector_matches_template() -> None:
    catalogue = catalogue_of(imagecache_json("base", ["nginx"]))

    daemonset = only_daemonset(catalogue)

    match_labels = daemonset["spec"]["selector"]["matchLabels"]
    template_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert match_labels == {DAEMONSET_LABEL: "imgcache-pinner-linux-amd64"}
    assert match_labels.items() <= template_labels.items()


def test_daemonset_container_per_image() -> None:
    catalogue = catalogue_of(imagecache_json("base", ["nginx", "redis", "nvcr.io/nvidia/cuda:12.4"]))

    containers = pod_spec(only_daemonset(catalogue))["containers"]

    expected = sorted(catalogue.images.values(), key=lambda image: image.hash)
    assert [c["name"] for c in containers] == [f"pin-{image.hash}" for image in expected]
    assert [c["image"] for c in containers] == [str(image.resolved) for image in expected]
    for container in containers:
        assert container["command"] == ["/imgcache/busybox", "sleep", "2147483647"]
        assert container["imagePullPolicy"] == "IfNotPresent"
        assert container["volumeMounts"] == [{"name": "imgcache-helper", "mountPath": "/imgcache", "readOnly": True}]


PREPULLING = PinnerOptions("imgcache-system", "helper:v1", None, host_network=True, prepull=True)


def pull_policies(daemonset: JSON) -> dict[str, str]:
    return {c["image"]: c["imagePullPolicy"] for c in pod_spec(daemonset)["containers"]}


def test_pins_of_prepulled_images_never_pull() -> None:
    catalogue = catalogue_of(
        imagecache_json("base", ["nginx", {"image": "redis", "prepull": False}]),
        imagecache_json("gpu", [{"image": "nvcr.io/nvidia/cuda:12.4", "pin": False}], node_selector={"pool": "gpu"}),
        imagecache_json("gpu-pins", ["nvcr.io/nvidia/cuda:12.4"], node_selector={"pool": "gpu"}),
    )
    gpu_node = node("gpu-1", labels={"pool": "gpu"})

    daemonsets = desired_daemonsets(catalogue, [AMD64, gpu_node], PREPULLING)
    without_prepull = desired_daemonsets(catalogue, [AMD64, gpu_node], OPTIONS)

    assert pull_policies(daemonsets["imgcache-pinner-linux-amd64"]) == {NGINX: "Never", REDIS: "IfNotPresent"}
    (gpu_name,) = set(daemonsets) - {"imgcache-pinner-linux-amd64"}
    assert pull_policies(daemonsets[gpu_name]) == {CUDA: "Never"}
    assert {policy for ds in without_prepull.values() for policy in pull_policies(ds).values()} == {"IfNotPresent"}


def test_pin_pulls_where_prepull_covers_fewer_nodes() -> None:
    catalogue = catalogue_of(
        imagecache_json("pins", [{"image": "nginx", "prepull": False}]),
        imagecache_json("gpu", [{"image": "nginx", "pin": False}], node_selector={"pool": "gpu"}),
        imagecache_json("arm", [{"image": "redis", "pin": False, "platforms": ["linux/arm64"]}]),
        imagecache_json("pins-2", [{"image": "redis", "prepull": False}]),
    )

    policies = pull_policies(only_daemonset(catalogue, options=PREPULLING))

    assert policies == {NGINX: "IfNotPresent", REDIS: "IfNotPresent"}


def test_daemonset_uses_rewritten_image() -> None:
    rule = PullThroughRule("docker-hub", "registry-1.docker.io", "123456789012", "us-west-2")
    catalogue = Catalogue(Rewriter([rule]))
    catalogue.upsert(imagecache_json("base", ["nginx"]))

    (container,) = pod_spec(only_daemonset(catalogue))["containers"]

    assert container["image"] == "123456789012.dkr.ecr.us-west-2.amazonaws.com/docker-hub/library/nginx:latest"


def test_daemonset_helper_init_container() -> None:
    catalogue = catalogue_of(imagecache_json("base", ["nginx"]))

    spec = pod_spec(only_daemonset(catalogue))

    (init,) = spec["initContainers"]
    assert init["image"] == OPTIONS.helper_image
    assert init["command"][-1] == "/imgcache/busybox"
    assert spec["volumes"] == [{"name": "imgcache-helper", "emptyDir": {"sizeLimit": "16Mi"}}]


def test_daemonset_rolling_update_never_unavailable() -> None:
    catalogue = catalogue_of(imagecache_json("base", ["nginx"]))

    strategy = only_daemonset(catalogue)["spec"]["updateStrategy"]

    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert strategy["rollingUpdate"]["maxSurge"] == "25%"


def test_daemonset_security_context() -> None:
    catalogue = catalogue_of(imagecache_json("base", ["nginx"]))

    spec = pod_spec(only_daemonset(catalogue))

    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for container in spec["containers"] + spec["initContainers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["runAsNonRoot"] is True


def test_daemonset_tolerates_every_taint() -> None:
    catalogue = catalogue_of(imagecache_json("base", ["nginx"]))

    assert pod_spec(only_daemonset(catalogue))["tolerations"] == [{"operator": "Exists"}]


@pytest.mark.parametrize(
    ("priority_class", "expected"),
    [
        pytest.param("system-node-critical", "system-node-critical", id="set"),
        pytest.param(None, None, id="unset"),
    ],
)
def test_daemonset_priority_class(priority_class: str | None, expected: str | None) -> None:
    catalogue = catalogue_of(imagecache_json("base", ["nginx"]))
    options = PinnerOptions("imgcache-system", "helper:v1", priority_class, host_network=True)

    assert pod_spec(only_daemonset(catalogue, options=options)).get("priorityClassName") == expected


@pytest.mark.parametrize("host_network", [True, False])
def test_daemonset_host_network(host_network: bool) -> None:
    catalogue = catalogue_of(imagecache_json("base", ["nginx"]))
    options = PinnerOptions("imgcache-system", "helper:v1", None, host_network=host_network)

    assert pod_spec(only_daemonset(catalogue, options=options))["hostNetwork"] is host_network


def test_daemonset_node_selector() -> None:
    catalogue = catalogue_of(imagecache_json("gpu", [CUDA], node_selector={"pool": "gpu"}))

    (daemonset,) = desired_daemonsets(catalogue, [ARM64], OPTIONS).values()

    assert pod_spec(daemonset)["nodeSelector"] == {
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "arm64",
        "pool": "gpu",
    }


def test_daemonsets_keyed_by_name() -> None:
    catalogue = catalogue_of(
        imagecache_json("base", ["nginx"]),
        imagecache_json("gpu", [CUDA], node_selector={"pool": "gpu"}),
    )

    daemonsets = desired_daemonsets(catalogue, [AMD64, ARM64], OPTIONS)

    assert len(daemonsets) == 4
    assert all(name == ds["metadata"]["name"] for name, ds in daemonsets.items())


# -- spec hash -------------------------------------------------------------------------


def spec_hash(*objects: JSON, nodes: list[Node] | None = None) -> str:
    annotations: dict[str, Any] = only_daemonset(catalogue_of(*objects), nodes)["metadata"]["annotations"]
    return str(annotations[SPEC_HASH_ANNOTATION])


BASE = imagecache_json("base", ["nginx", "redis"])


@pytest.mark.parametrize(
    "objects",
    [
        pytest.param([BASE], id="same"),
        pytest.param([imagecache_json("base", ["redis", "nginx"])], id="reordered"),
        pytest.param([imagecache_json("base", ["nginx"]), imagecache_json("more", ["redis"])], id="split"),
        pytest.param([imagecache_json("base", ["nginx", "redis", "docker.io/library/nginx"])], id="duplicate"),
        pytest.param(
            [imagecache_json("base", ["nginx", "redis", {"image": "alpine", "pin": False}])], id="unpinned-added"
        ),
    ],
)
def test_spec_hash_same_images(objects: list[JSON]) -> None:
    assert spec_hash(*objects) == spec_hash(BASE)


def test_spec_hash_other_group_change() -> None:
    catalogue = catalogue_of(BASE, imagecache_json("gpu", [CUDA], node_selector={"pool": "gpu"}))

    daemonsets = desired_daemonsets(catalogue, [AMD64], OPTIONS)

    annotations = daemonsets["imgcache-pinner-linux-amd64"]["metadata"]["annotations"]
    assert annotations[SPEC_HASH_ANNOTATION] == spec_hash(BASE)


@pytest.mark.parametrize(
    "objects",
    [
        pytest.param([imagecache_json("base", ["nginx", "redis", "alpine"])], id="image-added"),
        pytest.param([imagecache_json("base", ["nginx"])], id="image-removed"),
        pytest.param([imagecache_json("base", ["nginx", "redis:7"])], id="tag-changed"),
    ],
)
def test_spec_hash_changes_with_images(objects: list[JSON]) -> None:
    catalogue = catalogue_of(*objects)
    daemonset = only_daemonset(catalogue)

    assert daemonset["metadata"]["annotations"][SPEC_HASH_ANNOTATION] != spec_hash(BASE)
    assert (
        daemonset["metadata"]["annotations"][IMAGES_HASH_ANNOTATION]
        != (only_daemonset(catalogue_of(BASE))["metadata"]["annotations"][IMAGES_HASH_ANNOTATION])
    )


def test_images_hash_in_template() -> None:
    daemonset = only_daemonset(catalogue_of(BASE))

    template_annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert template_annotations[IMAGES_HASH_ANNOTATION] == daemonset["metadata"]["annotations"][IMAGES_HASH_ANNOTATION]
