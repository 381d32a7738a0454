"""Unit tests of the simulated kubelet's pure parts: formats, references, quota, back-off,
bandwidth sharing, profile lookup and runtime error wording."""

from __future__ import annotations

import pytest

from testbed.kubelet import (
    Backoff,
    FailureKind,
    FailureRule,
    ImageProfile,
    InvalidReferenceError,
    KubeletConfig,
    Link,
    RegistryProfile,
    TokenBucket,
    _build_config,
    _parser,
    failure_message,
    format_go_duration,
    parse_reference,
    resolve_profile,
    throttled_message,
)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.0004, "0s"),
        (0.25, "250ms"),
        (0.2509, "250ms"),
        (1.0, "1s"),
        (1.5034, "1.503s"),
        (10.0, "10s"),
        (60.0, "1m0s"),
        (123.5, "2m3.5s"),
        (3600.0, "1h0m0s"),
        (3725.25, "1h2m5.25s"),
    ],
)
def test_go_duration_format(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text


@pytest.mark.parametrize(
    ("image", "name", "registry", "repository"),
    [
        ("nginx", "docker.io/library/nginx:latest", "docker.io", "library/nginx"),
        ("nginx:1.27", "docker.io/library/nginx:1.27", "docker.io", "library/nginx"),
        ("team/app:v1", "docker.io/team/app:v1", "docker.io", "team/app"),
        ("index.docker.io/team/app", "docker.io/team/app:latest", "docker.io", "team/app"),
        ("localhost/app", "localhost/app:latest", "localhost", "app"),
        ("localhost:5000/app:2", "localhost:5000/app:2", "localhost:5000", "app"),
        (
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/svc/api:3",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/svc/api:3",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            "svc/api",
        ),
        (
            "registry.k8s.io/pause@sha256:" + "a" * 64,
            "registry.k8s.io/pause@sha256:" + "a" * 64,
            "registry.k8s.io",
            "pause",
        ),
    ],
)
def test_reference_normalization(image: str, name: str, registry: str, repository: str) -> None:
    ref = parse_reference(image)

    assert ref.name == name
    assert ref.registry == registry
    assert ref.repository == repository


@pytest.mark.parametrize("image", ["", " nginx", "Nginx", "nginx:", "nginx@sha256:xyz", "a//b"])
def test_reference_rejects_malformed(image: str) -> None:
    with pytest.raises(InvalidReferenceError):
        parse_reference(image)


def test_reference_urls_and_ids() -> None:
    hub = parse_reference("nginx:1.27")
    digest = "sha256:" + "b" * 64
    pinned = parse_reference(f"quay.io/org/app@{digest}")

    assert hub.manifest_url == "https://registry-1.docker.io/v2/library/nginx/manifests/1.27"
    assert hub.image_id.startswith("docker.io/library/nginx@sha256:")
    assert hub.image_id == parse_reference("docker.io/library/nginx:1.27").image_id
    assert pinned.image_id == f"quay.io/org/app@{digest}"
    assert pinned.manifest_url == f"https://quay.io/v2/org/app/manifests/{digest}"


def test_token_bucket_burst_then_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)

    assert [bucket.try_take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.try_take(0.4) is False
    assert bucket.try_take(0.5) is True
    assert bucket.try_take(0.5) is False


def test_token_bucket_caps_at_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=2, now=0.0)
    bucket.try_take(0.0)
    bucket.try_take(0.0)

    taken = [bucket.try_take(100.0) for _ in range(3)]

    assert taken == [True, True, False]


def test_token_bucket_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=0, burst=1, now=0)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(rate=1, burst=0, now=0)


def test_backoff_doubles_to_cap() -> None:
    backoff = Backoff(initial=10, cap=300)

    delays = [backoff.next("pod", "img", now=float(i)) for i in range(7)]

    assert delays == [10, 20, 40, 80, 160, 300, 300]


def test_backoff_remaining_and_reset() -> None:
    backoff = Backoff(initial=10, cap=300)
    backoff.next("pod", "img", now=100.0)

    assert backoff.remaining("pod", "img", now=104.0) == pytest.approx(6.0)
    assert backoff.remaining("pod", "img", now=111.0) == 0.0
    assert backoff.remaining("other", "img", now=104.0) == 0.0
    backoff.reset("pod", "img")
    assert backoff.next("pod", "img", now=105.0) == 10


def test_backoff_restarts_after_long_quiet() -> None:
    backoff = Backoff(initial=10, cap=300)
    backoff.next("pod", "img", now=0.0)
    backoff.next("pod", "img", now=1.0)

    assert backoff.next("pod", "img", now=1.0 + 601.0) == 10


def test_backoff_keys_are_per_pod_and_image() -> None:
    backoff = Backoff(initial=1, cap=8)
    backoff.next("pod-a", "img", now=0.0)
    backoff.next("pod-a", "img", now=0.0)

    assert backoff.next("pod-b", "img", now=0.0) == 1
    assert backoff.next("pod-a", "other", now=0.0) == 1
    backoff.forget("pod-a")
    assert backoff.next("pod-a", "img", now=0.0) == 1


def test_link_single_transfer_uses_full_bandwidth() -> None:
    link = Link(bandwidth=1_000_000)
    link.add(1, 2_000_000, now=0.0)

    assert link.seconds_left(1) == pytest.approx(2.0)
    link.advance(1.5)
    assert link.seconds_left(1) == pytest.approx(0.5)


def test_link_shares_bandwidth_equally() -> None:
    link = Link(bandwidth=2_000_000)
    link.add(1, 4_000_000, now=0.0)
    link.add(2, 2_000_000, now=0.0)

    # Each gets 1 MB/s, so the 2 MB transfer ends at t=2 with 2 MB of the other left.
    assert link.seconds_left(2) == pytest.approx(2.0)
    link.remove(2, now=2.0)
    assert link.remaining[1] == pytest.approx(2_000_000)
    # Alone again, the rest arrives at the full 2 MB/s.
    assert link.seconds_left(1) == pytest.approx(1.0)


def test_link_recomputes_when_transfer_joins() -> None:
    link = Link(bandwidth=1_000_000)
    link.add(1, 1_000_000, now=0.0)
    link.add(2, 1_000_000, now=0.5)

    assert link.remaining[1] == pytest.approx(500_000)
    assert link.seconds_left(1) == pytest.approx(1.0)
    assert link.seconds_left(2) == pytest.approx(2.0)


def test_link_rejects_zero_bandwidth() -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        Link(bandwidth=0)


def test_profile_lookup_order() -> None:
    config = KubeletConfig(default_image_size=7, default_layers=2)
    config.images["nginx:1.27"] = ImageProfile(size=100)
    config.repositories["nginx"] = ImageProfile(size=200, pull_seconds=3.0)
    config.registries["docker.io"] = RegistryProfile(images=ImageProfile(layers=5))

    exact = resolve_profile(config, parse_reference("docker.io/library/nginx:1.27"))
    other_tag = resolve_profile(config, parse_reference("nginx:1.26"))
    other_repo = resolve_profile(config, parse_reference("team/app:1"))
    unknown = resolve_profile(config, parse_reference("quay.io/x/y:1"))

    assert (exact.size, exact.pull_seconds, exact.layers) == (100, 3.0, 5)
    assert (other_tag.size, other_tag.pull_seconds) == (200, 3.0)
    assert (other_repo.size, other_repo.layers) == (7, 5)
    assert (unknown.size, unknown.layers, unknown.platforms) == (7, 2, None)


def test_profile_uses_size_table() -> None:
    profile = resolve_profile(KubeletConfig(), parse_reference("registry.k8s.io/pause:3.10"))

    assert profile.size == 320_000


def test_failure_rule_targets() -> None:
    by_image = FailureRule(FailureKind.NOT_FOUND, image="nginx:1.27")
    by_repository = FailureRule(FailureKind.NOT_FOUND, repository="nginx")
    by_registry = FailureRule(FailureKind.NOT_FOUND, registry="quay.io", nodes=frozenset({"n1"}))

    assert by_image.matches(parse_reference("docker.io/library/nginx:1.27"), "n1")
    assert not by_image.matches(parse_reference("nginx:1.26"), "n1")
    assert by_repository.matches(parse_reference("nginx:1.26"), "n1")
    assert by_registry.matches(parse_reference("quay.io/a/b:1"), "n1")
    assert not by_registry.matches(parse_reference("quay.io/a/b:1"), "n2")


def test_failure_rule_first_attempts_only() -> None:
    rule = FailureRule(FailureKind.TIMEOUT, image="app:1", attempts=2)
    ref = parse_reference("app:1")

    rule.fired = 1
    assert rule.matches(ref, "n")
    rule.fired = 2
    assert not rule.matches(ref, "n")


def test_failure_rule_needs_one_target() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        FailureRule(FailureKind.NOT_FOUND)
    with pytest.raises(ValueError, match="exactly one"):
        FailureRule(FailureKind.NOT_FOUND, image="a:1", registry="quay.io")


def test_throttled_message_wording() -> None:
    ref = parse_reference("registry.example/app/web:2")
    ecr = parse_reference("123456789012.dkr.ecr.us-east-1.amazonaws.com/web:2")

    assert throttled_message(ref) == (
        'rpc error: code = Unknown desc = failed to pull and unpack image "registry.example/app/'
        'web:2": failed to resolve reference "registry.example/app/web:2": unexpected status '
        "from HEAD request to https://registry.example/v2/app/web/manifests/2: 429 Too Many "
        "Requests"
    )
    assert throttled_message(ecr).endswith("429 Too Many Requests: toomanyrequests: Rate exceeded")
    assert "/blobs/sha256:" in throttled_message(ref, layer=1)
    assert throttled_message(ref, layer=1).endswith("429 Too Many Requests")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (FailureKind.NOT_FOUND, "docker.io/library/app:1: not found"),
        (FailureKind.UNAUTHORIZED, "pull access denied"),
        (FailureKind.PLATFORM_MISMATCH, "no match for platform in manifest: not found"),
        (FailureKind.DISK_FULL, "no space left on device"),
        (FailureKind.TIMEOUT, "i/o timeout"),
        (FailureKind.DEADLINE_EXCEEDED, "context deadline exceeded"),
    ],
)
def test_failure_message_wording(kind: FailureKind, expected: str) -> None:
    assert expected in failure_message(kind, parse_reference("app:1"))


def test_unauthorized_outside_docker_hub() -> None:
    message = failure_message(FailureKind.UNAUTHORIZED, parse_reference("quay.io/a/b:1"))

    assert message.endswith(
        "unexpected status from HEAD request to https://quay.io/v2/a/b/manifests/1: 401 Unauthorized"
    )


def test_config_rejects_invalid_settings() -> None:
    with pytest.raises(ValueError, match="time_scale"):
        KubeletConfig(time_scale=0).validate()
    with pytest.raises(ValueError, match="max_parallel_image_pulls"):
        KubeletConfig(max_parallel_image_pulls=0).validate()
    with pytest.raises(ValueError, match="back-off"):
        KubeletConfig(backoff_initial=5, backoff_max=1).validate()
    with pytest.raises(InvalidReferenceError):
        KubeletConfig(images={"Bad:Image": ImageProfile()}).validate()


def test_command_line_builds_config() -> None:
    args = _parser().parse_args(
        [
            "--kubeconfig",
            "kc",
            "--image-size",
            "nginx:1.27=5000",
            "--pull-time",
            "nginx:1.27=2.5",
            "--registry-qps",
            "quay.io=0.5/3",
            "--fail-image",
            "app:1=not-found:2",
            "--fail-registry",
            "ghcr.io=timeout",
            "--serialize-image-pulls",
            "--time-scale",
            "0.1",
        ]
    )

    config = _build_config(args)

    assert config.images["nginx:1.27"] == ImageProfile(size=5000, pull_seconds=2.5)
    assert config.registries["quay.io"].qps == 0.5
    assert config.registries["quay.io"].burst == 3
    assert config.failures[0].kind is FailureKind.NOT_FOUND
    assert config.failures[0].image == "app:1"
    assert config.failures[0].attempts == 2
    assert config.failures[1].registry == "ghcr.io"
    assert config.failures[1].attempts is None
    assert config.serialize_image_pulls is True
    assert config.time_scale == 0.1
