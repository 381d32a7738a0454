"""Tests of merging ImageCache objects into one deduplicated image catalogue."""

from __future__ import annotations

from typing import Any

import pytest

from imgcache.catalogue import MAX_ENTRIES, Catalogue, Scope
from imgcache.reference import image_hash, parse
from imgcache.rewrite import PullThroughRule, Rewriter
from unit.factories import catalogue_of, image_named, imagecache_json, node

ACCOUNT = "123456789012"
REGION = "us-west-2"
CACHE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
DOCKER_HUB_RULE = PullThroughRule(
    prefix="docker-hub", upstream_registry="registry-1.docker.io", account=ACCOUNT, region=REGION
)
QUAY_RULE = PullThroughRule(prefix="quay", upstream_registry="quay.io", account=ACCOUNT, region=REGION)
NGINX = "docker.io/library/nginx:latest"
NGINX_CACHED = f"{CACHE}/docker-hub/library/nginx:latest"
DIGEST = "sha256:" + "0123456789abcdef" * 4


def scopes_of(catalogue: Catalogue, resolved: str) -> list[Scope]:
    return image_named(catalogue, resolved).scopes


@pytest.mark.parametrize(
    ("text", "resolved"),
    [
        pytest.param("nginx", NGINX, id="official-short"),
        pytest.param("nginx:1.27", "docker.io/library/nginx:1.27", id="official-tag"),
        pytest.param("library/nginx", NGINX, id="library-path"),
        pytest.param("index.docker.io/library/nginx", NGINX, id="legacy-hub-host"),
        pytest.param("bitnami/redis:7", "docker.io/bitnami/redis:7", id="hub-user-image"),
        pytest.param("ghcr.io/org/app", "ghcr.io/org/app:latest", id="other-registry"),
        pytest.param("localhost:5000/app:v1", "localhost:5000/app:v1", id="registry-port"),
        pytest.param(f"quay.io/org/app@{DIGEST}", f"quay.io/org/app@{DIGEST}", id="digest-only"),
        pytest.param(f"quay.io/org/app:v2@{DIGEST}", f"quay.io/org/app:v2@{DIGEST}", id="tag-and-digest"),
    ],
)
def test_catalogue_normalizes_reference(text: str, resolved: str) -> None:
    catalogue = catalogue_of(imagecache_json("web", [text]))

    (image,) = catalogue.images.values()
    assert str(image.resolved) == resolved
    assert image.hash == image_hash(parse(resolved))
    assert catalogue.reports["team-a/web"].entries[0].resolved == resolved
    assert catalogue.reports["team-a/web"].entries[0].hash == image.hash


def test_catalogue_same_image_two_objects() -> None:
    catalogue = catalogue_of(
        imagecache_json("web", ["nginx"], namespace="team-a", node_selector={"team": "a"}),
        imagecache_json("proxy", ["docker.io/library/nginx:latest"], namespace="team-b", node_selector={"team": "b"}),
    )

    assert len(catalogue.images) == 1
    image = image_named(catalogue, NGINX)
    assert image.sources == {"team-a/web", "team-b/proxy"}
    assert {scope.node_selector for scope in image.scopes} == {(("team", "a"),), (("team", "b"),)}


def test_catalogue_same_image_twice_in_one_object() -> None:
    catalogue = catalogue_of(
        imagecache_json(
            "web",
            [
                {"image": "nginx", "platforms": ["linux/amd64"]},
                {"image": "index.docker.io/library/nginx:latest", "platforms": ["linux/arm64"]},
            ],
        )
    )

    assert len(catalogue.images) == 1
    scopes = scopes_of(catalogue, NGINX)
    assert [scope.platforms for scope in scopes] == [frozenset({"linux/amd64"}), frozenset({"linux/arm64"})]
    entries = catalogue.reports["team-a/web"].entries
    assert entries[0].hash == entries[1].hash
    assert entries[0].error is None
    assert entries[1].error is None


def test_catalogue_merged_image_matches_both_platforms() -> None:
    catalogue = catalogue_of(
        imagecache_json(
            "web",
            [
                {"image": "nginx", "platforms": ["linux/amd64"]},
                {"image": "nginx", "platforms": ["linux/arm64"]},
            ],
        )
    )

    assert len(catalogue.prepull_images(node("x86", arch="amd64"))) == 1
    assert len(catalogue.prepull_images(node("arm", arch="arm64"))) == 1
    assert catalogue.prepull_images(node("s390", arch="s390x")) == []


def test_catalogue_pin_only_and_prepull_only_merge() -> None:
    catalogue = catalogue_of(
        imagecache_json("pins", [{"image": "nginx", "prepull": False}]),
        imagecache_json("warm", [{"image": "nginx", "pin": False}], namespace="team-b"),
    )
    worker = node("worker")

    (image,) = catalogue.images.values()
    assert [(scope.pin, scope.prepull) for scope in image.scopes] == [(True, False), (False, True)]
    assert image.pin_on(worker)
    assert image.prepull_on(worker)
    assert list(catalogue.pinned()) == [image]
    assert catalogue.prepull_images(worker) == [image]


def test_catalogue_pin_false_not_pinned() -> None:
    catalogue = catalogue_of(imagecache_json("warm", [{"image": "nginx", "pin": False}]))

    assert list(catalogue.pinned()) == []
    assert len(catalogue.prepull_images(node("worker"))) == 1


def test_catalogue_prepull_false_not_prepulled() -> None:
    catalogue = catalogue_of(imagecache_json("pins", [{"image": "nginx", "prepull": False}]))

    assert catalogue.prepull_images(node("worker")) == []
    assert len(list(catalogue.pinned())) == 1


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        pytest.param({"image": "Nginx"}, "must be lowercase", id="uppercase"),
        pytest.param({"image": "nginx:"}, "tag after ':' is empty", id="empty-tag"),
        pytest.param({"image": "https://ghcr.io/app"}, "URL scheme", id="url"),
        pytest.param({"image": ""}, "empty", id="empty"),
        pytest.param({"image": 42}, "spec.images[1] needs an 'image' string", id="not-a-string"),
        pytest.param({"name": "nginx"}, "spec.images[1] needs an 'image' string", id="no-image-key"),
        pytest.param(["nginx"], "spec.images[1] needs an 'image' string", id="not-a-map"),
    ],
)
def test_catalogue_invalid_entry_reported(entry: Any, message: str) -> None:
    catalogue = catalogue_of(
        imagecache_json("web", ["redis", entry, "busybox"]),
        imagecache_json("other", ["alpine"], namespace="team-b"),
    )

    entries = catalogue.reports["team-a/web"].entries
    assert entries[1].error is not None
    assert message in entries[1].error
    assert entries[1].hash is None
    assert entries[0].error is None
    assert entries[2].error is None
    assert all(entry.error is None for entry in catalogue.reports["team-b/other"].entries)
    assert {str(image.resolved) for image in catalogue.images.values()} == {
        "docker.io/library/redis:latest",
        "docker.io/library/busybox:latest",
        "docker.io/library/alpine:latest",
    }


def test_catalogue_invalid_node_selector_reported() -> None:
    obj = imagecache_json("web", ["nginx"])
    obj["spec"]["nodeSelector"] = ["team=a"]

    catalogue = catalogue_of(obj, imagecache_json("other", ["alpine"], namespace="team-b"))

    (entry,) = catalogue.reports["team-a/web"].entries
    assert entry.error == "spec.nodeSelector must be a map of label keys to values"
    assert [str(image.resolved) for image in catalogue.images.values()] == ["docker.io/library/alpine:latest"]


def test_catalogue_images_not_a_list_reported() -> None:
    obj = imagecache_json("web", [])
    obj["spec"]["images"] = {"image": "nginx"}

    catalogue = catalogue_of(obj)

    assert catalogue.reports["team-a/web"].entries[0].error == "spec.images must be a list"
    assert catalogue.images == {}


def test_catalogue_entry_limit() -> None:
    images = [f"registry.example.com/app{index}" for index in range(MAX_ENTRIES + 1)]

    catalogue = catalogue_of(imagecache_json("many", images))

    entries = catalogue.reports["team-a/many"].entries
    assert len(catalogue.images) == MAX_ENTRIES
    assert len(entries) == MAX_ENTRIES + 1
    assert entries[-1].error is not None
    assert f"only the first {MAX_ENTRIES}" in entries[-1].error


def test_catalogue_report_metadata() -> None:
    catalogue = catalogue_of(imagecache_json("web", ["nginx"], node_selector={"team": "a"}, generation=3))

    report = catalogue.reports["team-a/web"]
    assert (report.namespace, report.name, report.uid) == ("team-a", "web", "uid-team-a-web")
    assert report.generation == 3
    assert report.node_selector == {"team": "a"}


def test_catalogue_remove_drops_images() -> None:
    web = imagecache_json("web", ["nginx", "redis"])
    other = imagecache_json("other", ["nginx"], namespace="team-b")
    catalogue = catalogue_of(web, other)

    catalogue.remove(web)

    assert [str(image.resolved) for image in catalogue.images.values()] == [NGINX]
    assert image_named(catalogue, NGINX).sources == {"team-b/other"}
    assert len(scopes_of(catalogue, NGINX)) == 1
    assert "team-a/web" not in catalogue.reports


def test_catalogue_remove_unknown_object() -> None:
    catalogue = catalogue_of(imagecache_json("web", ["nginx"]))

    catalogue.remove(imagecache_json("gone", ["redis"]))

    assert [str(image.resolved) for image in catalogue.images.values()] == [NGINX]


def test_catalogue_upsert_replaces_object() -> None:
    catalogue = catalogue_of(imagecache_json("web", ["nginx"]))

    catalogue.upsert(imagecache_json("web", ["redis"], generation=2))

    assert [str(image.resolved) for image in catalogue.images.values()] == ["docker.io/library/redis:latest"]
    assert catalogue.reports["team-a/web"].generation == 2


def test_catalogue_replace_drops_unlisted() -> None:
    catalogue = catalogue_of(imagecache_json("web", ["nginx"]), imagecache_json("db", ["redis"]))

    catalogue.replace([imagecache_json("db", ["redis"])])

    assert [str(image.resolved) for image in catalogue.images.values()] == ["docker.io/library/redis:latest"]
    assert set(catalogue.reports) == {"team-a/db"}


def test_catalogue_listener_called_per_change() -> None:
    catalogue = Catalogue()
    calls: list[int] = []
    catalogue.subscribe(lambda: calls.append(catalogue.version))

    catalogue.upsert(imagecache_json("web", ["nginx"]))
    catalogue.upsert(imagecache_json("db", ["redis"]))
    catalogue.remove(imagecache_json("web", []))

    assert calls == [1, 2, 3]


@pytest.mark.parametrize(
    ("platforms", "matching", "not_matching"),
    [
        pytest.param(None, ["linux/amd64", "linux/arm64"], [], id="any"),
        pytest.param(["linux/arm64"], ["linux/arm64"], ["linux/amd64"], id="arm64-only"),
        pytest.param(["linux/arm64/v8"], ["linux/arm64"], ["linux/amd64"], id="variant"),
        pytest.param(["linux/amd64", "linux/arm64"], ["linux/amd64", "linux/arm64"], ["linux/s390x"], id="two"),
    ],
)
def test_catalogue_platform_scope(platforms: list[str] | None, matching: list[str], not_matching: list[str]) -> None:
    entry: dict[str, Any] = {"image": "nginx"}
    if platforms is not None:
        entry["platforms"] = platforms
    catalogue = catalogue_of(imagecache_json("web", [entry]))

    for platform in matching:
        arch = platform.split("/")[1]
        assert len(catalogue.prepull_images(node(f"node-{arch}", arch=arch))) == 1, platform
    for platform in not_matching:
        arch = platform.split("/")[1]
        assert catalogue.prepull_images(node(f"node-{arch}", arch=arch)) == [], platform


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        pytest.param({"team": "a", "pool": "gpu"}, 1, id="all-labels"),
        pytest.param({"team": "a", "pool": "gpu", "zone": "x"}, 1, id="extra-labels"),
        pytest.param({"team": "a"}, 0, id="missing-label"),
        pytest.param({"team": "a", "pool": "cpu"}, 0, id="other-value"),
        pytest.param({}, 0, id="no-labels"),
    ],
)
def test_catalogue_node_selector_scope(labels: dict[str, str], expected: int) -> None:
    catalogue = catalogue_of(imagecache_json("web", ["nginx"], node_selector={"team": "a", "pool": "gpu"}))

    assert len(catalogue.prepull_images(node("worker", labels=labels))) == expected


def test_catalogue_prepull_list_follows_selector_labels_and_changes() -> None:
    catalogue = catalogue_of(
        imagecache_json("all", ["busybox"]),
        imagecache_json("gpu", ["cuda"], node_selector={"pool": "gpu"}),
    )
    gpu = {str(i.resolved) for i in catalogue.prepull_images(node("a", labels={"pool": "gpu", "zone": "x"}))}
    cpu = {str(i.resolved) for i in catalogue.prepull_images(node("b", labels={"pool": "cpu", "zone": "x"}))}
    arm = catalogue.prepull_images(node("c", arch="arm64", labels={"pool": "gpu"}))

    catalogue.upsert(imagecache_json("gpu", ["cuda", "nccl"], node_selector={"pool": "gpu"}, generation=2))
    after = {str(i.resolved) for i in catalogue.prepull_images(node("a", labels={"pool": "gpu", "zone": "y"}))}

    assert gpu == {"docker.io/library/busybox:latest", "docker.io/library/cuda:latest"}
    assert cpu == {"docker.io/library/busybox:latest"}
    assert len(arm) == 2
    assert after == gpu | {"docker.io/library/nccl:latest"}


def test_catalogue_windows_nodes_get_nothing() -> None:
    catalogue = catalogue_of(
        imagecache_json(
            "web", ["nginx", {"image": "mcr.microsoft.com/windows/nanoserver", "platforms": ["windows/amd64"]}]
        )
    )
    windows = node("win", os="windows", arch="amd64")

    assert catalogue.prepull_images(windows) == []
    assert not any(image.pin_on(windows) for image in catalogue.images.values())


def test_catalogue_rewrites_with_rule() -> None:
    catalogue = Catalogue(Rewriter([DOCKER_HUB_RULE]))

    catalogue.upsert(imagecache_json("web", ["nginx", "ghcr.io/org/app:v1"]))

    image = image_named(catalogue, NGINX_CACHED)
    assert str(image.ref) == NGINX
    assert image.hash == image_hash(parse(NGINX_CACHED))
    assert catalogue.reports["team-a/web"].entries[0].resolved == NGINX_CACHED
    assert str(image_named(catalogue, "ghcr.io/org/app:v1").ref) == "ghcr.io/org/app:v1"


@pytest.mark.parametrize(
    ("object_flag", "entry_flag", "resolved"),
    [
        pytest.param(None, None, NGINX_CACHED, id="default"),
        pytest.param(True, True, NGINX_CACHED, id="both-true"),
        pytest.param(False, None, NGINX, id="object-false"),
        pytest.param(None, False, NGINX, id="entry-false"),
        pytest.param(True, False, NGINX, id="entry-false-object-true"),
        pytest.param(False, True, NGINX, id="object-false-entry-true"),
    ],
)
def test_catalogue_pull_through_flags(object_flag: bool | None, entry_flag: bool | None, resolved: str) -> None:
    entry: dict[str, Any] = {"image": "nginx"}
    if entry_flag is not None:
        entry["pullThroughCache"] = entry_flag
    catalogue = Catalogue(Rewriter([DOCKER_HUB_RULE]))

    catalogue.upsert(imagecache_json("web", [entry], pull_through_cache=object_flag))

    assert [str(image.resolved) for image in catalogue.images.values()] == [resolved]


def test_catalogue_pull_through_opt_out_is_separate_image() -> None:
    catalogue = Catalogue(Rewriter([DOCKER_HUB_RULE]))

    catalogue.replace(
        [
            imagecache_json("cached", ["nginx"]),
            imagecache_json("direct", [{"image": "nginx", "pullThroughCache": False}], namespace="team-b"),
        ]
    )

    assert {str(image.resolved) for image in catalogue.images.values()} == {NGINX, NGINX_CACHED}


def test_catalogue_set_rewriter_rebuilds() -> None:
    catalogue = catalogue_of(imagecache_json("web", ["nginx", "quay.io/org/app:v1"]))

    catalogue.set_rewriter(Rewriter([DOCKER_HUB_RULE, QUAY_RULE]))

    assert {str(image.resolved) for image in catalogue.images.values()} == {
        NGINX_CACHED,
        f"{CACHE}/quay/org/app:v1",
    }


def test_catalogue_rewrite_failure_reported() -> None:
    # Valid upstream, but over 255 characters once moved under the ECR cache host.
    long_name = "team/" + "a" * 230
    catalogue = Catalogue(Rewriter([DOCKER_HUB_RULE]))

    catalogue.upsert(imagecache_json("web", ["nginx", long_name]))

    entries = catalogue.reports["team-a/web"].entries
    assert entries[0].error is None
    assert entries[1].error is not None
    assert "pull-through cache rewrite failed" in entries[1].error
    assert [str(image.resolved) for image in catalogue.images.values()] == [NGINX_CACHED]


def test_status_only_update_keeps_version() -> None:
    catalogue = Catalogue()
    obj = imagecache_json("c", ["nginx"])
    obj["metadata"].update(uid="u1", generation=1)
    catalogue.replace([obj])
    version = catalogue.version

    status_write = {**obj, "status": {"imageCount": 1}}
    catalogue.upsert(status_write)
    assert catalogue.version == version

    edited = {**obj, "metadata": {**obj["metadata"], "generation": 2}, "spec": {"images": [{"image": "redis"}]}}
    catalogue.upsert(edited)
    assert catalogue.version == version + 1
    assert [str(i.ref) for i in catalogue.images.values()] == ["docker.io/library/redis:latest"]
