"""Classify image pull failures from kubelet messages and suggest a fix.

The kubelet passes on the container runtime's error as free text, worded
differently by containerd 1.x, containerd 2.x and CRI-O. The controller needs a
small, stable set of classes for metric labels and retry decisions, and engineers
debugging ImagePullBackOff need one next step per class, so this module maps the
text to a FailureClass and the class to a hint.
"""

from __future__ import annotations

import enum
import re

from imgcache.reference import ECR_PUBLIC_REGISTRY, is_docker_hub, is_ecr_private_registry


class FailureClass(enum.StrEnum):
    """Cause of a failed image pull, used as a metric label value."""

    THROTTLED = "throttled"
    KUBELET_THROTTLED = "kubelet_throttled"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    PLATFORM_MISMATCH = "platform_mismatch"
    DISK_FULL = "disk_full"
    NETWORK = "network"
    INVALID_NAME = "invalid_name"
    OTHER = "other"


PERMANENT: frozenset[FailureClass] = frozenset(
    {
        FailureClass.NOT_FOUND,
        FailureClass.UNAUTHORIZED,
        FailureClass.PLATFORM_MISMATCH,
        FailureClass.INVALID_NAME,
    }
)
"""Classes where retrying fails until someone changes the reference, the image or access."""

# Kubelet event reasons that decide the class without reading the message.
_REASON_CLASSES = {
    "invalidimagename": FailureClass.INVALID_NAME,
    "registryunavailable": FailureClass.NETWORK,
}

# HTTP 429 as a status, as in ": 429 Too Many Requests", "status 429" or
# "StatusCode: 429", but not inside a digest, byte count or duration.
_HTTP_429 = r"(?:\bstatus(?:\s*code)?\b[\s:=]*|\bhttp\s+|:\s*)429(?![\w.])(?!\s*bytes)"


def _tokens(*literals: str) -> str:
    return "|".join(re.escape(literal) for literal in literals)


def _rule(failure: FailureClass, *patterns: str) -> tuple[FailureClass, re.Pattern[str]]:
    return failure, re.compile("|".join(patterns), re.IGNORECASE)


# The first matching rule wins, so the order settles messages that match several:
# 1. Invalid name and kubelet throttling: the kubelet rejected the pull before sending a
#    registry request. Its own pull limit (registryPullQPS) fails with "pull QPS exceeded".
# 2. Throttled: a 429 response carries no information about the image, and retry
#    chains can carry an earlier "not found" or "unauthorized" along with it.
# 3. Disk full and 4. network: the pull failed on the node or on the way, so
#    any registry wording in the same message is not the cause.
# 5. Platform mismatch before 7. not found, because containerd writes
#    "no match for platform in manifest: not found".
# 6. Unauthorized before 7. not found, because registries hide whether a
#    repository exists from clients without access.
_RULES: tuple[tuple[FailureClass, re.Pattern[str]], ...] = (
    _rule(FailureClass.INVALID_NAME, _tokens("invalid reference format")),
    _rule(FailureClass.KUBELET_THROTTLED, _tokens("pull qps exceeded")),
    _rule(
        FailureClass.THROTTLED,
        _HTTP_429,
        _tokens(
            "too many requests",
            "toomanyrequests",
            "rate exceeded",
            "throttlingexception",
            "data limit exceeded",
            "pull rate limit",
        ),
    ),
    _rule(FailureClass.DISK_FULL, _tokens("no space left on device")),
    _rule(
        FailureClass.NETWORK,
        _tokens(
            "i/o timeout",
            "connection timed out",
            "connection refused",
            "connection reset by peer",
            "context deadline exceeded",
            "deadlineexceeded",
            "tls handshake timeout",
            "no such host",
            "network is unreachable",
            "registry is unavailable",
        ),
    ),
    _rule(
        FailureClass.PLATFORM_MISMATCH,
        _tokens("no match for platform in manifest", "no matching manifest for"),
        # CRI-O, through containers/image: "no image found in manifest list for
        # architecture ..." in older releases, "... in image index ..." in newer ones.
        r"no image found in (?:manifest list|image index) for architecture",
    ),
    _rule(
        FailureClass.UNAUTHORIZED,
        _tokens(
            "401 unauthorized",
            "403 forbidden",
            "pull access denied",
            "no basic auth credentials",
            "authentication required",
            "requested access to the resource is denied",
            "insufficient_scope",
        ),
        # Registry error codes as CRI-O prints them, as in "unauthorized: access to
        # the requested resource is not authorized" or "denied: Your authorization
        # token has expired". A local "permission denied:" is not one of them.
        r"\bunauthorized:",
        r"(?<!permission )\bdenied:",
    ),
    _rule(FailureClass.NOT_FOUND, _tokens("not found", "manifest unknown", "name unknown")),
)


def classify(message: str, reason: str | None = None) -> FailureClass:
    """Return the class of a failed pull from the kubelet's event message and reason.

    Matching ignores case. Text that matches no rule is FailureClass.OTHER.
    """
    if reason is not None:
        by_reason = _REASON_CLASSES.get(reason.lower())
        if by_reason is not None:
            return by_reason

    for failure, pattern in _RULES:
        if pattern.search(message):
            return failure
    return FailureClass.OTHER


def hint(failure: FailureClass, registry: str) -> str:
    """Return one sentence naming what an engineer should check next."""
    if failure is FailureClass.THROTTLED:
        return _throttled_hint(registry)
    if failure is FailureClass.UNAUTHORIZED:
        return _unauthorized_hint(registry)
    return _HINTS[failure].format(registry=registry)


_HINTS: dict[FailureClass, str] = {
    FailureClass.KUBELET_THROTTLED: (
        "The node's kubelet refused the pull because its own limit on pull starts was used up "
        "(registryPullQPS, default 5 per second, with registryBurst, default 10), so keep "
        "--node-pull-qps and --node-pull-burst below the node's values or raise them in the kubelet configuration."
    ),
    FailureClass.NOT_FOUND: (
        "The registry {registry} has no image with this name, so check that the repository "
        "exists and contains the tag or digest."
    ),
    FailureClass.PLATFORM_MISMATCH: (
        "The image has no build for the node's OS and architecture, so restrict the entry's "
        "platforms to those the image provides or use a multi-arch image."
    ),
    FailureClass.DISK_FULL: (
        "The node's disk is full, so free space, lower the kubelet's image garbage collection "
        "thresholds (imageGCHighThresholdPercent and imageGCLowThresholdPercent) "
        "or give the node a larger volume."
    ),
    FailureClass.NETWORK: (
        "The node could not reach {registry} in time, so check DNS, security groups, "
        "the NAT gateway or VPC endpoints, and any proxy between the node and the registry."
    ),
    FailureClass.INVALID_NAME: (
        "The image reference is invalid, so correct it in the entry as the kubelet message describes."
    ),
    FailureClass.OTHER: (
        "The failure matches no known class, so read the kubelet message in the pod's events "
        "(kubectl describe pod) for the cause."
    ),
}


def _throttled_hint(registry: str) -> str:
    if is_ecr_private_registry(registry):
        return (
            f"ECR throttled pulls from {registry}, so compare the pull rate with the Region's "
            "quotas for BatchGetImage (quota code L-16E70933, default 2,000 per second) and "
            "GetDownloadUrlForLayer (quota code L-A60A366D, default 3,000 per second), "
            "which you can raise in Service Quotas."
        )
    if registry.lower() == ECR_PUBLIC_REGISTRY:
        # The private ECR rate quotas do not apply to ECR Public, which limits
        # unauthenticated pulls more tightly, including to 500 GB of data a month.
        return (
            "ECR Public throttled pulls from public.ecr.aws, so authenticate the pulls or "
            "pull through an ECR pull-through cache rule, because unauthenticated pulls have "
            "lower rate and data limits."
        )
    if is_docker_hub(registry):
        return (
            "Docker Hub's pull rate limit throttled the pull, so authenticate pulls with an "
            "imagePullSecret for a Docker Hub account or pull through a cache such as an ECR "
            "pull-through cache rule for registry-1.docker.io."
        )
    return (
        f"The registry {registry} rate-limited the pull, so reduce concurrent pulls or pull "
        "through a cache such as an ECR pull-through cache rule."
    )


def _unauthorized_hint(registry: str) -> str:
    if is_ecr_private_registry(registry):
        return (
            f"ECR rejected the node's credentials for {registry}, so check that the node IAM "
            "role allows ecr:GetAuthorizationToken, ecr:BatchGetImage and "
            "ecr:GetDownloadUrlForLayer, and that the repository policy allows the account."
        )
    return (
        f"The registry {registry} rejected the pull's credentials, so check the pod's "
        "imagePullSecrets or the node's credential provider for this registry."
    )
