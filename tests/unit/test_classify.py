"""Table tests for pull failure classification and hints.

The messages follow what the kubelet puts in a Failed event: containerd 1.x and
2.x wording, CRI-O wording, with the "rpc error: code = Unknown desc = " prefix
that kubelets before 1.28 kept, and other gRPC codes, which all versions keep.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgcache.classify import PERMANENT, FailureClass, classify, hint

ECR = "123456789012.dkr.ecr.us-west-2.amazonaws.com"
DIGEST = "sha256:4290ab51c2e3f4a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3"

THROTTLED = FailureClass.THROTTLED
NOT_FOUND = FailureClass.NOT_FOUND
UNAUTHORIZED = FailureClass.UNAUTHORIZED
PLATFORM = FailureClass.PLATFORM_MISMATCH
DISK = FailureClass.DISK_FULL
NETWORK = FailureClass.NETWORK
INVALID = FailureClass.INVALID_NAME
OTHER = FailureClass.OTHER

# (message, reason, expected class)
MESSAGES = [
    # The kubelet's own pull limit (registryPullQPS): the whole container status message,
    # and the Failed event that wraps it.
    pytest.param("pull QPS exceeded", "ErrImagePull", FailureClass.KUBELET_THROTTLED, id="kubelet-pull-qps"),
    pytest.param(
        'Failed to pull image "registry.example.com/app:v1": pull QPS exceeded',
        None,
        FailureClass.KUBELET_THROTTLED,
        id="kubelet-pull-qps-event",
    ),
    # Throttled
    pytest.param(
        'failed to pull and unpack image "docker.io/library/nginx:1.27": failed to copy: '
        "httpReadSeeker: failed open: unexpected status code "
        f"https://registry-1.docker.io/v2/library/nginx/manifests/{DIGEST}: "
        "429 Too Many Requests - Server message: toomanyrequests: You have reached your pull "
        "rate limit. You may increase the limit by authenticating and upgrading: "
        "https://www.docker.com/increase-rate-limit",
        None,
        THROTTLED,
        id="containerd1-docker-hub-429",
    ),
    pytest.param(
        f'failed to pull and unpack image "{ECR}/app:v1": failed to resolve reference '
        f'"{ECR}/app:v1": unexpected status from HEAD request to '
        f"https://{ECR}/v2/app/manifests/v1: 429 Too Many Requests",
        None,
        THROTTLED,
        id="containerd1-ecr-429",
    ),
    pytest.param(
        f'rpc error: code = Unknown desc = failed to pull and unpack image "{ECR}/app:v1": '
        f'failed to resolve reference "{ECR}/app:v1": unexpected status from HEAD request to '
        f"https://{ECR}/v2/app/manifests/v1: 429 Too Many Requests",
        None,
        THROTTLED,
        id="containerd1-ecr-429-before-1.28",
    ),
    pytest.param(
        f'failed to pull and unpack image "{ECR}/app:v1": failed to resolve reference '
        f'"{ECR}/app:v1": ThrottlingException: Rate exceeded',
        None,
        THROTTLED,
        id="containerd1-ecr-throttling-exception",
    ),
    pytest.param(
        'failed to pull and unpack image "docker.io/library/nginx:1.27": failed to resolve '
        "image: unexpected status from GET request to "
        "https://registry-1.docker.io/v2/library/nginx/manifests/1.27: 429 Too Many Requests\n"
        "toomanyrequests: You have reached your unauthenticated pull rate limit. "
        "https://www.docker.com/increase-rate-limit",
        None,
        THROTTLED,
        id="containerd2-docker-hub-429",
    ),
    pytest.param(
        'failed to pull and unpack image "public.ecr.aws/nginx/nginx:1.27": failed to resolve '
        "image: unexpected status from GET request to "
        "https://public.ecr.aws/v2/nginx/nginx/manifests/1.27: 429 Too Many Requests\n"
        "toomanyrequests: Data limit exceeded",
        None,
        THROTTLED,
        id="containerd2-ecr-public-data-limit",
    ),
    pytest.param(
        "reading manifest 1.27 in docker.io/library/nginx: toomanyrequests: You have reached "
        "your pull rate limit. You may increase the limit by authenticating and upgrading: "
        "https://www.docker.com/increase-rate-limit",
        None,
        THROTTLED,
        id="crio-docker-hub",
    ),
    pytest.param(
        "rpc error: code = Unknown desc = Error reading manifest v1 in quay.io/acme/app: "
        "received unexpected HTTP status: 429 Too Many Requests",
        None,
        THROTTLED,
        id="crio-old-quay-429",
    ),
    pytest.param(
        "fetching blob: StatusCode: 429, retry later", None, THROTTLED, id="status-code-429"
    ),
    pytest.param("unexpected status 429", None, THROTTLED, id="status-429"),
    pytest.param("TOO MANY REQUESTS", None, THROTTLED, id="uppercase"),
    # Not found
    pytest.param(
        'failed to pull and unpack image "docker.io/library/nginx:9.99": failed to resolve '
        'reference "docker.io/library/nginx:9.99": docker.io/library/nginx:9.99: not found',
        None,
        NOT_FOUND,
        id="containerd1-not-found",
    ),
    pytest.param(
        'rpc error: code = NotFound desc = failed to pull and unpack image "quay.io/a/b:v9": '
        'failed to resolve reference "quay.io/a/b:v9": quay.io/a/b:v9: not found',
        None,
        NOT_FOUND,
        id="containerd1-grpc-not-found",
    ),
    pytest.param(
        'failed to pull and unpack image "quay.io/a/b:v9": failed to resolve image: '
        "quay.io/a/b:v9: not found",
        None,
        NOT_FOUND,
        id="containerd2-not-found",
    ),
    pytest.param(
        "Error reading manifest v9 in quay.io/a/b: manifest unknown: manifest unknown",
        None,
        NOT_FOUND,
        id="crio-old-manifest-unknown",
    ),
    pytest.param(
        f"reading manifest v1 in {ECR}/missing: name unknown: The repository with name "
        "'missing' does not exist in the registry with id '123456789012'",
        None,
        NOT_FOUND,
        id="crio-ecr-name-unknown",
    ),
    pytest.param(
        "failed to copy: httpReadSeeker: failed open: content at "
        f"https://{ECR}/v2/app/blobs/{DIGEST} not found",
        None,
        NOT_FOUND,
        id="digest-with-429-digits",
    ),
    # Unauthorized
    pytest.param(
        f'failed to pull and unpack image "{ECR}/app:v1": failed to resolve reference '
        f'"{ECR}/app:v1": unexpected status from HEAD request to '
        f"https://{ECR}/v2/app/manifests/v1: 403 Forbidden",
        None,
        UNAUTHORIZED,
        id="containerd1-ecr-403",
    ),
    pytest.param(
        'failed to pull and unpack image "docker.io/acme/private:1": failed to resolve '
        'reference "docker.io/acme/private:1": pull access denied, repository does not exist '
        "or may require authorization: server message: insufficient_scope: authorization failed",
        None,
        UNAUTHORIZED,
        id="containerd1-docker-hub-private",
    ),
    pytest.param(
        'failed to pull and unpack image "ghcr.io/acme/app:1": failed to resolve image: '
        "failed to authorize: failed to fetch anonymous token: unexpected status from GET "
        "request to https://ghcr.io/token?scope=repository%3Aacme%2Fapp%3Apull&service=ghcr.io: "
        "401 Unauthorized",
        None,
        UNAUTHORIZED,
        id="containerd2-ghcr-401",
    ),
    pytest.param(
        "reading manifest 1 in quay.io/acme/private: unauthorized: access to the requested "
        "resource is not authorized",
        None,
        UNAUTHORIZED,
        id="crio-quay-unauthorized",
    ),
    pytest.param(
        f"reading manifest v1 in {ECR}/app: no basic auth credentials",
        None,
        UNAUTHORIZED,
        id="crio-ecr-no-credentials",
    ),
    pytest.param(
        f"reading manifest v1 in {ECR}/app: denied: Your authorization token has expired. "
        "Reauthenticate and try again.",
        None,
        UNAUTHORIZED,
        id="crio-ecr-token-expired",
    ),
    pytest.param(
        "Error reading manifest 1 in registry.gitlab.com/acme/app: unauthorized: authentication "
        "required",
        None,
        UNAUTHORIZED,
        id="crio-old-gitlab",
    ),
    pytest.param(
        'pull access denied, repository does not exist or may require authorization: "not found"',
        None,
        UNAUTHORIZED,
        id="unauthorized-before-not-found",
    ),
    # Platform mismatch
    pytest.param(
        'failed to pull and unpack image "docker.io/acme/amd64-only:1": no match for platform in '
        "manifest: not found",
        None,
        PLATFORM,
        id="containerd1-platform",
    ),
    pytest.param(
        'rpc error: code = NotFound desc = failed to pull and unpack image "quay.io/a/b:1": '
        "no match for platform in manifest: not found",
        None,
        PLATFORM,
        id="containerd2-platform-grpc",
    ),
    pytest.param(
        'choosing image instance: no image found in manifest list for architecture "arm64", '
        'variant "v8", OS "linux"',
        None,
        PLATFORM,
        id="crio-manifest-list",
    ),
    pytest.param(
        "choosing image instance: no image found in image index for architecture arm64, variant "
        '"v8", OS linux',
        None,
        PLATFORM,
        id="crio-image-index",
    ),
    pytest.param(
        "no matching manifest for linux/arm64/v8 in the manifest list entries",
        None,
        PLATFORM,
        id="docker-engine",
    ),
    # Disk full
    pytest.param(
        'failed to pull and unpack image "docker.io/library/python:3.12": failed to extract '
        "layer sha256:0a1b: write /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/"
        "snapshots/123/fs/usr/lib/libpython3.12.so: no space left on device: unknown",
        None,
        DISK,
        id="containerd1-extract",
    ),
    pytest.param(
        'failed to pull and unpack image "quay.io/a/b:1": failed to copy: write '
        "/var/lib/containerd/io.containerd.content.v1.content/ingest/9f/data: "
        "no space left on device",
        None,
        DISK,
        id="containerd2-ingest",
    ),
    pytest.param(
        'writing blob: storing blob to file "/var/tmp/storage123/1": write '
        "/var/tmp/storage123/1: no space left on device",
        None,
        DISK,
        id="crio-blob",
    ),
    # Network
    pytest.param(
        'failed to pull and unpack image "registry.k8s.io/pause:3.10": failed to resolve '
        'reference "registry.k8s.io/pause:3.10": failed to do request: Head '
        '"https://registry.k8s.io/v2/pause/manifests/3.10": dial tcp 34.96.108.209:443: '
        "i/o timeout",
        None,
        NETWORK,
        id="containerd1-io-timeout",
    ),
    pytest.param(
        "rpc error: code = DeadlineExceeded desc = context deadline exceeded",
        None,
        NETWORK,
        id="grpc-deadline-exceeded",
    ),
    pytest.param(
        'failed to pull and unpack image "quay.io/a/b:v1": failed to resolve image: failed to '
        'do request: Head "https://quay.io/v2/a/b/manifests/v1": dial tcp: lookup quay.io on '
        "10.0.0.2:53: no such host",
        None,
        NETWORK,
        id="containerd2-dns",
    ),
    pytest.param(
        'failed to pull and unpack image "10.0.0.5:5000/app:1": failed to resolve image: '
        'failed to do request: Head "https://10.0.0.5:5000/v2/app/manifests/1": dial tcp '
        "10.0.0.5:5000: connect: connection refused",
        None,
        NETWORK,
        id="containerd2-refused",
    ),
    pytest.param(
        'pinging container registry quay.io: Get "https://quay.io/v2/": dial tcp 3.1.2.3:443: '
        "connect: connection timed out",
        None,
        NETWORK,
        id="crio-timed-out",
    ),
    pytest.param(
        'reading manifest v1 in quay.io/a/b: Get "https://quay.io/v2/a/b/manifests/v1": '
        "net/http: TLS handshake timeout",
        None,
        NETWORK,
        id="crio-tls-timeout",
    ),
    pytest.param(
        "image pull failed for quay.io/a/b:v1 because the registry is unavailable",
        "RegistryUnavailable",
        NETWORK,
        id="kubelet-registry-unavailable",
    ),
    # Invalid name
    pytest.param(
        'Failed to apply default image tag "Nginx": couldn\'t parse image name "Nginx": '
        "invalid reference format: repository name (library/Nginx) must be lowercase",
        "InvalidImageName",
        INVALID,
        id="kubelet-invalid-image-name",
    ),
    pytest.param("anything", "InvalidImageName", INVALID, id="reason-only"),
    pytest.param("anything", "invalidimagename", INVALID, id="reason-lowercase"),
    pytest.param(
        'failed to pull and unpack image "quay.io/a/b:": parse "quay.io/a/b:": invalid reference '
        "format",
        None,
        INVALID,
        id="containerd-invalid-format",
    ),
    pytest.param(
        'parsing reference "quay.io/a/b:": invalid reference format',
        None,
        INVALID,
        id="crio-invalid-format",
    ),
    # Ordering
    pytest.param(
        "unexpected status from GET request to https://quay.io/v2/a/b/manifests/v1: "
        "429 Too Many Requests: manifest not found",
        None,
        THROTTLED,
        id="throttled-before-not-found",
    ),
    pytest.param(
        'failed to fetch oauth token: Post "https://auth.docker.io/token": dial tcp: i/o timeout: '
        "pull access denied",
        None,
        NETWORK,
        id="network-before-unauthorized",
    ),
    # Other
    pytest.param('Back-off pulling image "nginx:1.27"', "ImagePullBackOff", OTHER, id="back-off"),
    pytest.param("write of 14290 bytes failed: short write", None, OTHER, id="429-in-count"),
    pytest.param("pull took 1.429s then failed", None, OTHER, id="429-in-duration"),
    pytest.param("Image size: 429 bytes", None, OTHER, id="429-byte-count"),
    pytest.param(
        "open /var/lib/containerd/x: permission denied: unknown",
        None,
        OTHER,
        id="local-permission-denied",
    ),
    pytest.param("signature verification failed", "ErrImagePull", OTHER, id="unknown-text"),
    pytest.param("", None, OTHER, id="empty"),
]


@pytest.mark.parametrize(("message", "reason", "expected"), MESSAGES)
def test_classify(message: str, reason: str | None, expected: FailureClass) -> None:
    assert classify(message, reason) == expected


@given(message=st.text(max_size=300), reason=st.none() | st.text(max_size=30))
@settings(max_examples=100, deadline=None, database=None)
def test_classify_never_raises(message: str, reason: str | None) -> None:
    assert classify(message, reason) in FailureClass


@pytest.mark.parametrize(
    ("failure", "value"),
    [
        pytest.param(THROTTLED, "throttled", id="throttled"),
        pytest.param(FailureClass.KUBELET_THROTTLED, "kubelet_throttled", id="kubelet-throttled"),
        pytest.param(NOT_FOUND, "not_found", id="not-found"),
        pytest.param(UNAUTHORIZED, "unauthorized", id="unauthorized"),
        pytest.param(PLATFORM, "platform_mismatch", id="platform"),
        pytest.param(DISK, "disk_full", id="disk"),
        pytest.param(NETWORK, "network", id="network"),
        pytest.param(INVALID, "invalid_name", id="invalid"),
        pytest.param(OTHER, "other", id="other"),
    ],
)
def test_failure_class_value(failure: FailureClass, value: str) -> None:
    assert str(failure) == value


def test_permanent_classes() -> None:
    assert frozenset({NOT_FOUND, UNAUTHORIZED, PLATFORM, INVALID}) == PERMANENT


@pytest.mark.parametrize("failure", list(FailureClass), ids=str)
def test_hint_one_sentence(failure: FailureClass) -> None:
    text = hint(failure, "quay.io")

    assert text.endswith(".")
    assert ". " not in text


# (class, registry, expected phrases)
HINTS = [
    pytest.param(
        THROTTLED,
        ECR,
        [
            "BatchGetImage",
            "L-16E70933",
            "2,000 per second",
            "GetDownloadUrlForLayer",
            "L-A60A366D",
            "3,000 per second",
            "Service Quotas",
        ],
        id="throttled-ecr",
    ),
    pytest.param(
        THROTTLED,
        "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn",
        ["L-16E70933", "L-A60A366D"],
        id="throttled-ecr-china",
    ),
    pytest.param(
        THROTTLED, "public.ecr.aws", ["public.ecr.aws", "authenticate"], id="throttled-ecr-public"
    ),
    pytest.param(
        THROTTLED, "docker.io", ["pull rate limit", "pull-through cache"], id="throttled-docker-io"
    ),
    pytest.param(
        THROTTLED,
        "registry-1.docker.io",
        ["pull rate limit", "imagePullSecret"],
        id="throttled-registry-1",
    ),
    pytest.param(THROTTLED, "index.docker.io", ["pull rate limit"], id="throttled-index"),
    pytest.param(THROTTLED, "quay.io", ["quay.io", "cache"], id="throttled-other"),
    pytest.param(NOT_FOUND, "quay.io", ["quay.io", "tag or digest"], id="not-found"),
    pytest.param(
        PLATFORM, "quay.io", ["OS and architecture", "platforms", "multi-arch"], id="platform"
    ),
    pytest.param(UNAUTHORIZED, ECR, ["node IAM role", "ecr:BatchGetImage"], id="unauthorized-ecr"),
    pytest.param(UNAUTHORIZED, "ghcr.io", ["ghcr.io", "imagePullSecrets"], id="unauthorized-other"),
    pytest.param(DISK, "quay.io", ["disk is full", "garbage collection"], id="disk"),
    pytest.param(NETWORK, "quay.io", ["reach quay.io", "DNS"], id="network"),
    pytest.param(INVALID, "quay.io", ["reference is invalid"], id="invalid"),
    pytest.param(OTHER, "quay.io", ["kubelet message"], id="other"),
    pytest.param(
        FailureClass.KUBELET_THROTTLED,
        "quay.io",
        ["registryPullQPS", "registryBurst", "--node-pull-qps", "--node-pull-burst"],
        id="kubelet-throttled",
    ),
]


@pytest.mark.parametrize(("failure", "registry", "phrases"), HINTS)
def test_hint_content(failure: FailureClass, registry: str, phrases: list[str]) -> None:
    text = hint(failure, registry)

    for phrase in phrases:
        assert phrase in text, f"{phrase!r} missing from {text!r}"


def test_hint_ecr_public_not_private_quotas() -> None:
    assert "L-16E70933" not in hint(THROTTLED, "public.ecr.aws")
