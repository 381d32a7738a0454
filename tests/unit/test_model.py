"""Tests of the typed Node and Pod views built from watch JSON."""

from __future__ import annotations

import pytest

from imgcache.model import (
    DONE_ANNOTATION,
    FAILED_ANNOTATION,
    JSON,
    NODE_NAME_ANNOTATION,
    Taint,
    node_from_json,
    parse_time,
    pod_from_json,
    slim_node,
)
from unit.factories import EPOCH, node_json, pod_in_state, rfc3339


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("2023-11-14T22:13:20Z", EPOCH, id="utc-z"),
        pytest.param("2023-11-14T23:13:20+01:00", EPOCH, id="offset"),
        pytest.param("2023-11-14T22:13:20.250000Z", EPOCH + 0.25, id="fraction"),
        pytest.param(None, 0.0, id="absent"),
        pytest.param("", 0.0, id="empty"),
    ],
)
def test_parse_time(text: str | None, expected: float) -> None:
    assert parse_time(text) == expected


def test_node_fields() -> None:
    obj = node_json(
        "node-a",
        uid="u-1",
        arch="arm64",
        labels={"team": "a"},
        done=["h1", "h2"],
        failed={"h3": "not_found"},
        taints=[{"key": "imgcache.io/warming", "effect": "NoSchedule"}],
        created=EPOCH + 5,
    )

    node = node_from_json(obj)

    assert node.name == "node-a"
    assert node.uid == "u-1"
    assert node.platform == "linux/arm64"
    assert node.labels["team"] == "a"
    assert node.done == frozenset({"h1", "h2"})
    assert node.failed == {"h3": "not_found"}
    assert node.taints == (Taint("imgcache.io/warming", "", "NoSchedule"),)
    assert node.has_taint("imgcache.io/warming")
    assert not node.has_taint("other")
    assert node.ready
    assert node.created == EPOCH + 5


def test_node_not_ready() -> None:
    assert not node_from_json(node_json("n", ready=False)).ready


def test_node_platform_from_node_info() -> None:
    obj = node_json("n", os="windows", arch="amd64")
    obj["metadata"]["labels"] = {}

    node = node_from_json(obj)

    assert node.os == "windows"
    assert node.arch == "amd64"


def test_node_platform_default_linux_amd64() -> None:
    node = node_from_json({"metadata": {"name": "bare"}})

    assert node.platform == "linux/amd64"
    assert node.done == frozenset()
    assert node.failed == {}
    assert node.taints == ()
    assert not node.ready
    assert node.created == 0.0


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        pytest.param("h1:throttled", {"h1": "throttled"}, id="one"),
        pytest.param("h1:not_found,h2:unauthorized", {"h1": "not_found", "h2": "unauthorized"}, id="two"),
        pytest.param("h1", {"h1": "other"}, id="no-class"),
        pytest.param("h1:,", {"h1": "other"}, id="empty-class-trailing-comma"),
        pytest.param("", {}, id="empty"),
    ],
)
def test_node_failed_annotation(annotation: str, expected: dict[str, str]) -> None:
    obj = node_json("n")
    obj["metadata"]["annotations"][FAILED_ANNOTATION] = annotation

    assert node_from_json(obj).failed == expected


def test_node_done_annotation_skips_empty_items() -> None:
    obj = node_json("n")
    obj["metadata"]["annotations"][DONE_ANNOTATION] = "h1,,h2,"

    assert node_from_json(obj).done == frozenset({"h1", "h2"})


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(
            node_json("n1", arch="arm64", labels={"pool": "gpu"}, done=["h1", "h2"], failed={"h3": "not_found"},
                      taints=[{"key": "imgcache.io/warming", "value": "true", "effect": "NoSchedule"}]),
            id="full",
        ),
        pytest.param(node_json("n2", ready=False), id="not-ready"),
        pytest.param({"metadata": {"name": "bare"}}, id="bare"),
        pytest.param({}, id="empty"),
    ],
)
def test_slim_node_parses_the_same(obj: JSON) -> None:
    whole = {
        **obj,
        "metadata": {
            **obj.get("metadata", {}),
            "resourceVersion": "77",
            "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
            "annotations": {**obj.get("metadata", {}).get("annotations", {}), "other.io/note": "x" * 100},
        },
        "status": {
            **obj.get("status", {}),
            "images": [{"names": [f"registry.example/app{i}:v1"], "sizeBytes": 1000} for i in range(50)],
            "capacity": {"cpu": "2", "memory": "8Gi"},
        },
    }

    slim = slim_node(whole)

    assert node_from_json(slim) == node_from_json(whole)
    assert slim["metadata"]["resourceVersion"] == "77"
    assert "images" not in slim["status"]
    assert "managedFields" not in slim["metadata"]
    assert "other.io/note" not in slim["metadata"]["annotations"]


def test_pod_fields() -> None:
    obj = pod_in_state("node-a", "key1", "hash1", "docker.io/library/nginx:latest", state="running", uid="p-1")

    pod = pod_from_json(obj)

    assert pod.name == "imgcache-prepull-key1-hash1"
    assert pod.namespace == "imgcache-system"
    assert pod.uid == "p-1"
    assert pod.node_name == "node-a"
    assert pod.node_key == "key1"
    assert pod.image_hash == "hash1"
    assert pod.image == "docker.io/library/nginx:latest"
    assert pod.component == "prepull"
    assert pod.phase == "Running"
    assert pod.created == EPOCH
    assert not pod.deleting
    assert pod.containers[0].running
    assert pod.containers[0].image_id.startswith("docker.io/library/nginx:latest@sha256:")


def test_pod_terminated_exit_code() -> None:
    pod = pod_from_json(pod_in_state("n", "k", "h", "img", state="succeeded"))

    assert pod.phase == "Succeeded"
    assert pod.containers[0].terminated
    assert pod.containers[0].exit_code == 0


def test_pod_waiting_reason() -> None:
    obj = pod_in_state("n", "k", "h", "img", state="pull_error", reason="ImagePullBackOff", message="back-off")

    container = pod_from_json(obj).containers[0]

    assert container.waiting_reason == "ImagePullBackOff"
    assert container.waiting_message == "back-off"
    assert not container.running
    assert not container.terminated
    assert container.exit_code is None


def test_pod_deleting() -> None:
    assert pod_from_json(pod_in_state("n", "k", "h", "img", deleting=True)).deleting


def test_pod_node_name_from_annotation_before_binding() -> None:
    obj = pod_in_state("node-a", "k", "h", "img")
    obj["spec"] = {}

    assert pod_from_json(obj).node_name == "node-a"


def test_pod_node_name_spec_wins() -> None:
    obj = pod_in_state("node-a", "k", "h", "img")
    obj["metadata"]["annotations"][NODE_NAME_ANNOTATION] = "node-b"

    assert pod_from_json(obj).node_name == "node-a"


def test_pod_defaults_for_bare_object() -> None:
    pod = pod_from_json({"metadata": {"name": "p"}})

    assert pod.phase == "Pending"
    assert pod.node_name == ""
    assert pod.containers == ()
    assert pod.init_containers == ()
    assert pod.created == 0.0


def test_rfc3339_round_trip() -> None:
    assert parse_time(rfc3339(EPOCH + 61)) == EPOCH + 61
