"""Tests of ImageCache status: per-image counts, Ready and Degraded conditions."""

from __future__ import annotations

import re
from typing import Any

from imgcache.catalogue import Catalogue, SourceReport
from imgcache.model import JSON
from imgcache.status import ImageCounts, build_status, image_counts
from unit.factories import catalogue_of, image_named, imagecache_json, node, scheduler_for

NGINX = "docker.io/library/nginx:latest"
REDIS = "docker.io/library/redis:latest"
OLD_STAMP = "2024-01-01T00:00:00Z"
_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def report_of(catalogue: Catalogue, key: str = "team-a/web") -> SourceReport:
    return catalogue.reports[key]


def condition(status: JSON, kind: str) -> JSON:
    (found,) = [c for c in status["conditions"] if c["type"] == kind]
    return found


def counts_for(catalogue: Catalogue, **by_reference: ImageCounts) -> dict[str, ImageCounts]:
    """Return counts keyed by image hash, from keyword arguments nginx= and redis=."""
    references = {"nginx": NGINX, "redis": REDIS}
    return {image_named(catalogue, references[name]).hash: counts for name, counts in by_reference.items()}


def previous(kind: str, status: str, reason: str = "Old", stamp: str = OLD_STAMP) -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": "", "lastTransitionTime": stamp}


WEB = imagecache_json("web", ["nginx", "redis"], generation=4)


def test_status_pending() -> None:
    catalogue = catalogue_of(WEB)
    counts = counts_for(catalogue, nginx=ImageCounts(cached=1, pending=2), redis=ImageCounts(pending=1))

    status = build_status(report_of(catalogue), counts, [])

    ready = condition(status, "Ready")
    degraded = condition(status, "Degraded")
    assert (ready["status"], ready["reason"]) == ("False", "Pulling")
    assert ready["message"] == "3 image pulls pending across nodes"
    assert (degraded["status"], degraded["reason"]) == ("False", "AsExpected")


def test_status_all_cached() -> None:
    catalogue = catalogue_of(WEB)
    counts = counts_for(catalogue, nginx=ImageCounts(cached=3), redis=ImageCounts(cached=3))

    status = build_status(report_of(catalogue), counts, [])

    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Cached")
    assert ready["message"] == "2 images cached on every matching node"
    assert condition(status, "Degraded")["status"] == "False"
    assert status["imageCount"] == 2


def test_status_image_items() -> None:
    catalogue = catalogue_of(WEB)
    counts = counts_for(catalogue, nginx=ImageCounts(cached=1, pending=2, failed=3))

    status = build_status(report_of(catalogue), counts, [])

    assert status["images"] == [
        {"image": "nginx", "resolved": NGINX, "cached": 1, "pending": 2, "failed": 3},
        {"image": "redis", "resolved": REDIS, "cached": 0, "pending": 0, "failed": 0},
    ]


def test_status_generation() -> None:
    catalogue = catalogue_of(WEB)

    status = build_status(report_of(catalogue), {}, [])

    assert status["observedGeneration"] == 4
    assert [c["observedGeneration"] for c in status["conditions"]] == [4, 4]


def test_status_invalid_entries() -> None:
    catalogue = catalogue_of(imagecache_json("web", ["nginx", "Bad:Image", "nginx:"]))
    counts = counts_for(catalogue, nginx=ImageCounts(cached=2))

    status = build_status(report_of(catalogue), counts, [])

    degraded = condition(status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidEntries")
    assert degraded["message"].startswith("2 entries are invalid")
    assert condition(status, "Ready")["status"] == "True"
    assert status["imageCount"] == 1
    assert [("error" in item) for item in status["images"]] == [False, True, True]
    assert "resolved" not in status["images"][1]


def test_status_no_valid_images() -> None:
    catalogue = catalogue_of(imagecache_json("web", ["Bad:Image"]))

    status = build_status(report_of(catalogue), {}, [])

    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NoValidImages")
    assert condition(status, "Degraded")["reason"] == "InvalidEntries"
    assert status["imageCount"] == 0


def test_status_empty_images() -> None:
    catalogue = catalogue_of(imagecache_json("web", []))

    status = build_status(report_of(catalogue), {}, [])

    assert condition(status, "Ready")["reason"] == "NoValidImages"
    assert condition(status, "Degraded")["status"] == "False"


def test_status_failures() -> None:
    catalogue = catalogue_of(WEB)
    counts = counts_for(catalogue, nginx=ImageCounts(cached=1, failed=2), redis=ImageCounts(cached=3))

    status = build_status(report_of(catalogue), counts, [])

    degraded = condition(status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "PullFailures")
    assert degraded["message"].startswith("2 image pulls failed")
    assert condition(status, "Ready")["status"] == "True"


def test_status_invalid_reason_before_failures() -> None:
    catalogue = catalogue_of(imagecache_json("web", ["nginx", "Bad:Image"]))
    counts = counts_for(catalogue, nginx=ImageCounts(failed=1))

    status = build_status(report_of(catalogue), counts, [])

    assert condition(status, "Degraded")["reason"] == "InvalidEntries"


def test_status_pending_and_failed() -> None:
    catalogue = catalogue_of(WEB)
    counts = counts_for(catalogue, nginx=ImageCounts(pending=1), redis=ImageCounts(failed=1))

    status = build_status(report_of(catalogue), counts, [])

    assert condition(status, "Ready")["reason"] == "Pulling"
    assert condition(status, "Degraded")["reason"] == "PullFailures"


def test_status_transition_time_kept() -> None:
    catalogue = catalogue_of(WEB)
    counts = counts_for(catalogue, nginx=ImageCounts(cached=1), redis=ImageCounts(cached=1))
    before = [previous("Ready", "True", "Cached"), previous("Degraded", "False", "Whatever")]

    status = build_status(report_of(catalogue), counts, before)

    assert condition(status, "Ready")["lastTransitionTime"] == OLD_STAMP
    assert condition(status, "Degraded")["lastTransitionTime"] == OLD_STAMP
    assert condition(status, "Degraded")["reason"] == "AsExpected"


def test_status_transition_time_on_change() -> None:
    catalogue = catalogue_of(WEB)
    counts = counts_for(catalogue, nginx=ImageCounts(pending=1))
    before = [previous("Ready", "True", "Cached"), previous("Degraded", "False")]

    status = build_status(report_of(catalogue), counts, before)

    ready = condition(status, "Ready")
    assert ready["status"] == "False"
    assert ready["lastTransitionTime"] != OLD_STAMP
    assert _STAMP.fullmatch(ready["lastTransitionTime"])
    assert condition(status, "Degraded")["lastTransitionTime"] == OLD_STAMP


def test_status_transition_time_first_write() -> None:
    catalogue = catalogue_of(WEB)

    status = build_status(report_of(catalogue), {}, [])

    for item in status["conditions"]:
        assert _STAMP.fullmatch(item["lastTransitionTime"])


def test_status_duplicate_entry_counted_once() -> None:
    catalogue = catalogue_of(
        imagecache_json("web", [{"image": "nginx", "prepull": False}, {"image": "docker.io/library/nginx"}])
    )
    counts = counts_for(catalogue, nginx=ImageCounts(pending=1))

    status = build_status(report_of(catalogue), counts, [])

    assert condition(status, "Ready")["message"] == "1 image pulls pending across nodes"


# -- image_counts ------------------------------------------------------------------


def test_image_counts() -> None:
    catalogue = catalogue_of(imagecache_json("web", ["nginx", "redis"]))
    nginx = image_named(catalogue, NGINX).hash
    redis = image_named(catalogue, REDIS).hash
    scheduler, _ = scheduler_for(catalogue)
    scheduler.set_node(node("n1", done=[nginx, redis]))
    scheduler.set_node(node("n2", done=[nginx], failed={redis: "not_found"}))
    scheduler.set_node(node("n3"))

    counts = image_counts(scheduler)

    assert counts == {
        nginx: ImageCounts(cached=2, pending=1, failed=0),
        redis: ImageCounts(cached=1, pending=1, failed=1),
    }


def test_image_counts_nodes_sharing_sets() -> None:
    catalogue = catalogue_of(
        imagecache_json("web", ["nginx", "redis"]), imagecache_json("gpu", ["cuda"], node_selector={"pool": "gpu"})
    )
    nginx = image_named(catalogue, NGINX).hash
    redis = image_named(catalogue, REDIS).hash
    cuda = image_named(catalogue, "docker.io/library/cuda:latest").hash
    scheduler, _ = scheduler_for(catalogue)
    for index in range(5):
        scheduler.set_node(node(f"warm-{index}", done=[nginx, redis]))
    for index in range(3):
        scheduler.set_node(node(f"gpu-{index}", labels={"pool": "gpu"}, done=[nginx, redis]))
    scheduler.set_node(node("half", done=[nginx]))
    scheduler.set_node(node("broken", labels={"pool": "gpu"}, failed={cuda: "not_found"}))

    counts = image_counts(scheduler)

    assert counts == {
        nginx: ImageCounts(cached=9, pending=1, failed=0),
        redis: ImageCounts(cached=8, pending=2, failed=0),
        cuda: ImageCounts(cached=0, pending=3, failed=1),
    }


def test_image_counts_only_matching_nodes() -> None:
    catalogue = catalogue_of(imagecache_json("web", ["nginx"], node_selector={"pool": "gpu"}))
    nginx = image_named(catalogue, NGINX).hash
    scheduler, _ = scheduler_for(catalogue)
    scheduler.set_node(node("gpu-1", labels={"pool": "gpu"}))
    scheduler.set_node(node("cpu-1", labels={"pool": "cpu"}))
    scheduler.set_node(node("win-1", os="windows", labels={"pool": "gpu"}))

    assert image_counts(scheduler) == {nginx: ImageCounts(pending=1)}


def test_image_counts_skip_prepull_false() -> None:
    catalogue = catalogue_of(imagecache_json("web", [{"image": "nginx", "prepull": False}]))
    scheduler, _ = scheduler_for(catalogue)
    scheduler.set_node(node("n1"))

    assert image_counts(scheduler) == {}


def test_status_from_scheduler_counts() -> None:
    catalogue = catalogue_of(WEB)
    nginx = image_named(catalogue, NGINX).hash
    redis = image_named(catalogue, REDIS).hash
    scheduler, _ = scheduler_for(catalogue)
    scheduler.set_node(node("n1", done=[nginx], failed={redis: "unauthorized"}))

    status = build_status(report_of(catalogue), image_counts(scheduler), [])

    assert condition(status, "Ready")["reason"] == "Cached"
    assert condition(status, "Degraded")["reason"] == "PullFailures"
    assert [item["failed"] for item in status["images"]] == [0, 1]
