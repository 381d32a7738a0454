"""Simulated kubelet for the test bed's kwok nodes.

kwok keeps fake nodes Ready but never touches pods, and no fake node can pull a real
image. This module plays the kubelet's part for every pod bound to a fake node. It
pulls images against a model of node bandwidth, registry request quotas and injected
registry errors. Containers then exit at once or keep running. Pod status fields and
Events carry the wording of a kubelet that uses containerd 2.x. imgcache reads
exactly those fields and messages, so tests, the demo and the benchmarks exercise it
as they would on a real cluster.

Run it inside an anyio event loop::

    sim = SimulatedKubelet(api_client, KubeletConfig(backoff_initial=0.5))
    async with sim.running():
        ...

or as a process for the demo: ``python -m testbed.kubelet --kubeconfig PATH``.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import itertools
import json
import logging
import math
import re
import signal
import sys
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import anyio
from anyio.abc import TaskGroup, TaskStatus
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from testbed.controlplane import FAKE_NODE_ANNOTATION

JSON = dict[str, Any]
log = logging.getLogger(__name__)

# NOTE: an assumed effective rate for download plus unpacking on a cloud node, not a
# measurement. Tests and benchmarks set their own.
DEFAULT_NODE_BANDWIDTH = 50_000_000
DEFAULT_IMAGE_SIZE = 50_000_000
# The kubelet's image back-off: 10 s, doubling per failure up to 5 minutes.
DEFAULT_BACKOFF_INITIAL = 10.0
DEFAULT_BACKOFF_MAX = 300.0
# The kubelet's registryPullQPS and registryBurst defaults: one token bucket on pull
# starts per node, for all registries together.
DEFAULT_REGISTRY_PULL_QPS = 5.0
DEFAULT_REGISTRY_BURST = 10
# The kubelet reports at most this many images in node.status.images (nodeStatusMaxImages).
NODE_STATUS_MAX_IMAGES = 50
# NOTE: approximate compressed linux/amd64 sizes of a few public images, in bytes, so
# the demo's pull times look plausible. They are rounded guesses, not measured here.
DEFAULT_IMAGE_SIZES: dict[str, int] = {
    "registry.k8s.io/pause": 320_000,
    "docker.io/library/busybox": 2_200_000,
    "docker.io/library/alpine": 3_600_000,
    "docker.io/library/nginx": 72_000_000,
    "docker.io/library/redis": 45_000_000,
    "docker.io/library/postgres": 160_000_000,
    "docker.io/library/python": 380_000_000,
}

_DOCKER_HUB = "docker.io"
_DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
_ECR_HOST_RE = re.compile(r"^[0-9]{12}\.dkr\.ecr(?:-fips)?\.[a-z0-9-]+\.amazonaws\.com(?:\.cn)?$")
_TERMINAL_PHASES = ("Succeeded", "Failed")


# -- time and duration formats -------------------------------------------------------


def format_go_duration(seconds: float) -> str:
    """Format seconds as Go's ``time.Duration.String()`` after truncating to milliseconds.

    The kubelet truncates pull durations to milliseconds before printing them, so
    1.5034 s reads ``1.503s``, 0.25 s ``250ms`` and 123.5 s ``2m3.5s``.
    """
    milliseconds = math.floor(max(seconds, 0.0) * 1000)
    if milliseconds == 0:
        return "0s"
    if milliseconds < 1000:
        return f"{milliseconds}ms"
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)
    text = f"{whole}.{fraction:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def _timestamp() -> str:
    """Return the current time as a Kubernetes ``metav1.Time`` string (whole seconds, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_timestamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- image references -----------------------------------------------------------------

_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}")
_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?"
)


class InvalidReferenceError(ValueError):
    """An image name that does not parse as a container image reference."""


@dataclass(frozen=True)
class ImageReference:
    """A normalized image reference, as containerd resolves it.

    ``repository`` is the path inside the registry (``library/nginx``). A reference
    without tag and digest gets the tag ``latest``, and Docker Hub names get the
    registry ``docker.io`` and, for one-part names, the ``library/`` prefix.
    """

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def repository_name(self) -> str:
        """Registry and repository, as in ``docker.io/library/nginx``."""
        return f"{self.registry}/{self.repository}"

    @property
    def name(self) -> str:
        """Full normalized reference, as in ``docker.io/library/nginx:1.27``."""
        text = self.repository_name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def endpoint(self) -> str:
        """Host that serves the registry API; Docker Hub's differs from its name."""
        return _DOCKER_HUB_ENDPOINT if self.registry == _DOCKER_HUB else self.registry

    @property
    def manifest_url(self) -> str:
        manifest = self.digest if self.digest is not None else self.tag
        return f"https://{self.endpoint}/v2/{self.repository}/manifests/{manifest}"

    def blob_url(self, digest: str) -> str:
        return f"https://{self.endpoint}/v2/{self.repository}/blobs/{digest}"

    @property
    def image_digest(self) -> str:
        """The digest containerd reports: the reference's own, or one derived from its name."""
        return self.digest if self.digest is not None else f"sha256:{_sha256(self.name)}"

    @property
    def image_id(self) -> str:
        """``imageID`` of a container status, as in ``docker.io/library/nginx@sha256:…``."""
        return f"{self.repository_name}@{self.image_digest}"


def parse_reference(image: str) -> ImageReference:
    """Parse and normalize an image reference; raise InvalidReferenceError if it is malformed."""
    if not image or image.strip() != image:
        raise InvalidReferenceError(f"invalid image reference {image!r}: empty or padded")
    rest = image
    digest: str | None = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if _DIGEST_RE.fullmatch(digest) is None:
            raise InvalidReferenceError(f"invalid image reference {image!r}: bad digest {digest!r}")
    tag: str | None = None
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if _TAG_RE.fullmatch(tag) is None:
            raise InvalidReferenceError(f"invalid image reference {image!r}: bad tag {tag!r}")

    first, separator, remainder = rest.partition("/")
    # As in Docker's reference grammar, a first component is a registry host only if
    # it looks like one, so "team/app" is a Docker Hub repository.
    is_host = "." in first or ":" in first or first == "localhost" or first != first.lower()
    if separator and is_host:
        registry, path = first, remainder
        if _HOST_RE.fullmatch(registry) is None:
            raise InvalidReferenceError(f"invalid image reference {image!r}: bad host {registry!r}")
    else:
        registry, path = _DOCKER_HUB, rest
    if registry == "index.docker.io":
        registry = _DOCKER_HUB
    components = path.split("/")
    if not all(_PATH_COMPONENT_RE.fullmatch(part) for part in components):
        raise InvalidReferenceError(
            f"invalid image reference {image!r}: repository {path!r} must be lowercase letters, digits and separators"
        )
    if registry == _DOCKER_HUB and len(components) == 1:
        path = f"library/{path}"
    if tag is None and digest is None:
        tag = "latest"
    return ImageReference(registry, path, tag, digest)


def is_ecr_registry(host: str) -> bool:
    """Return True for Amazon ECR private registry hosts (``<account>.dkr.ecr.<region>…``)."""
    return _ECR_HOST_RE.match(host) is not None


# -- pure models: registry quota, back-off, node bandwidth ----------------------------


class TokenBucket:
    """A request quota: ``rate`` requests per second refill a bucket of ``burst`` tokens."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0:
            raise ValueError(f"invalid token bucket rate {rate}: must be positive")
        if burst < 1:
            raise ValueError(f"invalid token bucket burst {burst}: must be at least 1")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def try_take(self, now: float) -> bool:
        """Take one token if the bucket contains one at ``now``; a rejected request takes none."""
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Backoff:
    """Per-key retry delays that double from ``initial`` up to ``cap``, like client-go's.

    As in the kubelet, an entry untouched for twice the cap starts again at ``initial``.
    """

    def __init__(self, initial: float, cap: float) -> None:
        if initial <= 0 or cap < initial:
            raise ValueError(f"invalid back-off {initial}..{cap}: need 0 < initial <= cap")
        self.initial = initial
        self.cap = cap
        self._entries: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)

    def next(self, group: str, key: str, now: float) -> float:
        """Record a failure at ``now`` and return the delay before the next attempt."""
        entry = self._entries[group].get(key)
        expired = entry is None or now - entry[1] > 2 * self.cap
        delay = self.initial if entry is None or expired else min(entry[0] * 2, self.cap)
        self._entries[group][key] = (delay, now)
        return delay

    def remaining(self, group: str, key: str, now: float) -> float:
        """Seconds until the delay after the last failure ends, or 0."""
        entry = self._entries.get(group, {}).get(key)
        if entry is None:
            return 0.0
        return max(0.0, entry[1] + entry[0] - now)

    def reset(self, group: str, key: str) -> None:
        self._entries.get(group, {}).pop(key, None)

    def forget(self, group: str) -> None:
        self._entries.pop(group, None)


class Link:
    """A node's download bandwidth in bytes per second, shared equally by its transfers.

    Fluid model: between two changes each of n active transfers receives bandwidth / n.
    Callers advance the model to the current time before every change, so remaining
    byte counts stay exact without periodic ticks.
    """

    # A transfer with less than half a byte left is complete; this absorbs float error.
    DONE_BYTES = 0.5

    def __init__(self, bandwidth: float) -> None:
        if bandwidth <= 0:
            raise ValueError(f"invalid bandwidth {bandwidth}: must be positive bytes per second")
        self.bandwidth = bandwidth
        self.remaining: dict[int, float] = {}
        self.updated = 0.0

    def share(self) -> float:
        return self.bandwidth / max(len(self.remaining), 1)

    def advance(self, now: float) -> None:
        if self.remaining and now > self.updated:
            sent = self.share() * (now - self.updated)
            for key, left in self.remaining.items():
                self.remaining[key] = max(0.0, left - sent)
        self.updated = max(self.updated, now)

    def add(self, key: int, size: float, now: float) -> None:
        self.advance(now)
        self.remaining[key] = float(size)

    def remove(self, key: int, now: float) -> None:
        self.advance(now)
        self.remaining.pop(key, None)

    def seconds_left(self, key: int) -> float:
        """Seconds until transfer ``key`` completes if no transfer starts or ends meanwhile."""
        left = self.remaining[key]
        if left < self.DONE_BYTES or math.isinf(self.bandwidth):
            return 0.0
        return left / self.share()


# -- configuration ---------------------------------------------------------------------


class FailureKind(enum.Enum):
    """Registry or runtime error that a FailureRule injects into matching pulls."""

    NOT_FOUND = "not-found"
    UNAUTHORIZED = "unauthorized"
    PLATFORM_MISMATCH = "platform-mismatch"
    DISK_FULL = "disk-full"
    TIMEOUT = "timeout"
    DEADLINE_EXCEEDED = "deadline-exceeded"


@dataclass
class FailureRule:
    """An injected error for pulls of one image, repository or registry.

    Set exactly one of ``image`` (a reference, matched after normalization, so
    ``nginx:1.27`` matches ``docker.io/library/nginx:1.27``), ``repository`` (every
    tag and digest) or ``registry`` (a host). ``attempts`` limits the rule to its
    first N matching pull attempts, counted over all nodes; None keeps it failing.
    ``nodes`` limits it to some node names. ``delay`` is how long, in simulated
    seconds, the failing attempt takes, as a timeout takes time before it fails.
    """

    kind: FailureKind
    image: str | None = None
    repository: str | None = None
    registry: str | None = None
    attempts: int | None = None
    nodes: frozenset[str] | None = None
    delay: float = 0.0
    fired: int = 0

    def __post_init__(self) -> None:
        targets = [t for t in (self.image, self.repository, self.registry) if t is not None]
        if len(targets) != 1:
            raise ValueError(
                f"invalid failure rule {self.kind.value}: set exactly one of image, "
                f"repository or registry, got {targets}"
            )
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"invalid failure rule attempts {self.attempts}: must be >= 1")

    def matches(self, ref: ImageReference, node: str) -> bool:
        if self.attempts is not None and self.fired >= self.attempts:
            return False
        if self.nodes is not None and node not in self.nodes:
            return False
        if self.image is not None:
            return parse_reference(self.image).name == ref.name
        if self.repository is not None:
            return parse_reference(self.repository).repository_name == ref.repository_name
        return self.registry == ref.registry


@dataclass
class ImageProfile:
    """Pull behaviour of an image; None fields fall back to the next, wider profile.

    ``size`` is in bytes and also appears in the ``Pulled`` message. ``pull_seconds``
    fixes the transfer time and takes no share of the node's bandwidth. ``layers``
    is the number of blob requests a pull makes after its manifest request, each one
    counted against the registry's quota. ``platforms`` lists ``os/arch`` pairs such
    as ``linux/amd64``; a node outside the list gets a platform mismatch.
    """

    size: int | None = None
    pull_seconds: float | None = None
    layers: int | None = None
    platforms: tuple[str, ...] | None = None


@dataclass
class RegistryProfile:
    """Request quota of one registry host, shared by all nodes, plus its image defaults.

    ``qps`` None means no quota. ``images`` applies to every image of the registry
    unless an image or repository profile sets the field.
    """

    qps: float | None = None
    burst: int = 1
    images: ImageProfile = field(default_factory=ImageProfile)


@dataclass
class KubeletConfig:
    """Settings of a SimulatedKubelet; durations are in simulated seconds.

    ``time_scale`` converts simulated to real time: 0.1 runs every transfer, fixed
    pull time, injected delay and back-off ten times faster and refills registry
    quotas ten times faster. Durations in ``Pulled`` messages are reported in
    simulated time. Profiles are looked up image first, then repository, then
    registry, then the defaults here and DEFAULT_IMAGE_SIZES.

    ``resync_delay`` is the time between a failed pull, reported as ErrImagePull,
    and the pod sync that reports ImagePullBackOff; it is capped at half the
    back-off. ``node_status_interval`` is how often, in real seconds, changed image
    stores are written to ``node.status.images`` (None turns that off).

    ``registry_pull_qps`` and ``registry_burst`` are the kubelet settings of the same
    names: every node refills ``registry_burst`` tokens at that rate, each pull
    attempt takes one, and an attempt that finds none fails with ``pull QPS
    exceeded`` before any registry request. None turns the limit off, as 0 does in a
    kubelet. ``pull_latency`` is the time a pull spends on registry round trips
    (token, manifest, config) before its first layer byte; it takes no bandwidth.
    """

    node_bandwidth: float = DEFAULT_NODE_BANDWIDTH
    node_bandwidths: dict[str, float] = field(default_factory=dict)
    default_image_size: int = DEFAULT_IMAGE_SIZE
    default_layers: int = 0
    images: dict[str, ImageProfile] = field(default_factory=dict)
    repositories: dict[str, ImageProfile] = field(default_factory=dict)
    registries: dict[str, RegistryProfile] = field(default_factory=dict)
    failures: list[FailureRule] = field(default_factory=list)
    serialize_image_pulls: bool = False
    max_parallel_image_pulls: int | None = None
    registry_pull_qps: float | None = DEFAULT_REGISTRY_PULL_QPS
    registry_burst: int = DEFAULT_REGISTRY_BURST
    pull_latency: float = 0.0
    backoff_initial: float = DEFAULT_BACKOFF_INITIAL
    backoff_max: float = DEFAULT_BACKOFF_MAX
    resync_delay: float = 1.0
    time_scale: float = 1.0
    container_events: bool = True
    node_status_interval: float | None = 10.0
    preloaded_images: tuple[str, ...] = ()
    event_writers: int = 8

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if self.node_bandwidth <= 0 or any(b <= 0 for b in self.node_bandwidths.values()):
            raise ValueError("invalid node bandwidth: must be positive bytes per second")
        if self.default_image_size < 0 or self.default_layers < 0:
            raise ValueError("invalid default image size or layer count: must be >= 0")
        if self.max_parallel_image_pulls is not None and self.max_parallel_image_pulls < 1:
            raise ValueError(f"invalid max_parallel_image_pulls {self.max_parallel_image_pulls}: must be >= 1")
        if self.time_scale <= 0:
            raise ValueError(f"invalid time_scale {self.time_scale}: must be positive")
        if self.registry_pull_qps is not None:
            TokenBucket(self.registry_pull_qps, self.registry_burst, 0.0)
        if self.pull_latency < 0:
            raise ValueError(f"invalid pull_latency {self.pull_latency}: must be >= 0")
        if self.event_writers < 1:
            raise ValueError(f"invalid event_writers {self.event_writers}: must be >= 1")
        Backoff(self.backoff_initial, self.backoff_max)
        for image in (*self.images, *self.repositories, *self.preloaded_images):
            parse_reference(image)


@dataclass(frozen=True)
class ResolvedProfile:
    """An image's pull behaviour after every fallback is applied."""

    size: int
    pull_seconds: float | None
    layers: int
    platforms: tuple[str, ...] | None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def resolve_profile(config: KubeletConfig, ref: ImageReference) -> ResolvedProfile:
    """Merge the image, repository, registry and default profiles of one image."""
    chain: list[ImageProfile] = []
    chain += [p for k, p in config.images.items() if parse_reference(k).name == ref.name]
    chain += [p for k, p in config.repositories.items() if parse_reference(k).repository_name == ref.repository_name]
    registry = config.registries.get(ref.registry)
    if registry is not None:
        chain.append(registry.images)
    size = _first(*(p.size for p in chain))
    if size is None:
        size = DEFAULT_IMAGE_SIZES.get(ref.repository_name, config.default_image_size)
    return ResolvedProfile(
        size=size,
        pull_seconds=_first(*(p.pull_seconds for p in chain)),
        layers=_first(*(p.layers for p in chain), config.default_layers),
        platforms=_first(*(p.platforms for p in chain)),
    )


# -- runtime error messages ------------------------------------------------------------


def _unpack_prefix(ref: ImageReference, code: str) -> str:
    # The kubelet prints the CRI error, so containerd's text arrives wrapped in a gRPC status.
    return f'rpc error: code = {code} desc = failed to pull and unpack image "{ref.name}": '


# The whole error of a pull that the node's registryPullQPS bucket rejected. No
# runtime wording wraps it, because the kubelet never called the runtime.
PULL_QPS_EXCEEDED = "pull QPS exceeded"


def throttled_message(ref: ImageReference, layer: int | None = None) -> str:
    """Return the runtime error for a registry request rejected with 429.

    ``layer`` None means the manifest HEAD request, otherwise the blob GET of that layer.
    """
    suffix = ": toomanyrequests: Rate exceeded" if is_ecr_registry(ref.registry) else ""
    if layer is None:
        return (
            _unpack_prefix(ref, "Unknown")
            + f'failed to resolve reference "{ref.name}": unexpected status from HEAD request '
            f"to {ref.manifest_url}: 429 Too Many Requests{suffix}"
        )
    blob = f"sha256:{_sha256(f'{ref.name}#layer{layer}')}"
    return (
        _unpack_prefix(ref, "Unknown") + f"failed to copy: httpReadSeeker: failed open: unexpected status code "
        f"{ref.blob_url(blob)}: 429 Too Many Requests{suffix}"
    )


def failure_message(kind: FailureKind, ref: ImageReference) -> str:
    """Return the runtime error text that the kubelet shows for an injected failure."""
    resolve = f'failed to resolve reference "{ref.name}": '
    if kind is FailureKind.NOT_FOUND:
        return _unpack_prefix(ref, "NotFound") + resolve + f"{ref.name}: not found"
    if kind is FailureKind.UNAUTHORIZED:
        if ref.registry == _DOCKER_HUB:
            detail = (
                "pull access denied, repository does not exist or may require authorization: "
                "server message: insufficient_scope: authorization failed"
            )
        else:
            detail = f"unexpected status from HEAD request to {ref.manifest_url}: 401 Unauthorized"
        return _unpack_prefix(ref, "Unknown") + resolve + detail
    if kind is FailureKind.PLATFORM_MISMATCH:
        return _unpack_prefix(ref, "NotFound") + "no match for platform in manifest: not found"
    if kind is FailureKind.DISK_FULL:
        layer = _sha256(f"{ref.name}#layer0")
        return (
            _unpack_prefix(ref, "Unknown") + f"failed to extract layer sha256:{layer}: write /var/lib/containerd/"
            "io.containerd.snapshotter.v1.overlayfs/snapshots/1/fs/usr/lib/data: "
            "no space left on device: unknown"
        )
    if kind is FailureKind.TIMEOUT:
        return (
            _unpack_prefix(ref, "Unknown")
            + resolve
            + f'failed to do request: Head "{ref.manifest_url}": dial tcp: lookup {ref.endpoint}: '
            "i/o timeout"
        )
    return "rpc error: code = DeadlineExceeded desc = context deadline exceeded"


# -- counters ----------------------------------------------------------------------------


@dataclass
class RequestCounts:
    """Registry requests: ``failed`` counts injected errors, ``throttled`` 429 responses."""

    total: int = 0
    succeeded: int = 0
    throttled: int = 0
    failed: int = 0


@dataclass
class PullCounts:
    """Pull attempts of one node; ``max_active`` is the peak of concurrent pulls.

    ``qps_exceeded`` counts the failed attempts that the node's own pull limit rejected.
    """

    attempts: int = 0
    succeeded: int = 0
    failed: int = 0
    qps_exceeded: int = 0
    bytes: int = 0
    active: int = 0
    max_active: int = 0


@dataclass
class PullRecord:
    """One pull attempt; times are ``time.monotonic()`` seconds.

    ``queued_at`` is when the ``Pulling`` event was sent, ``started_at`` when the
    attempt got a pull slot on its node.
    """

    node: str
    pod: str
    image: str
    queued_at: float
    started_at: float | None = None
    finished_at: float | None = None
    size: int = 0
    error: str | None = None


# -- API access ------------------------------------------------------------------------


class ApiStatusError(Exception):
    """A Kubernetes API request returned a non-2xx status."""

    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        text = body.decode(errors="replace")[:500]
        super().__init__(f"{method} {path} failed with HTTP {status}: {text}")
        self.status = status


_TRANSIENT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)
_MERGE_PATCH = "application/merge-patch+json"


async def _request(
    api: k8s_client.ApiClient,
    method: str,
    path: str,
    *,
    query: dict[str, str] | None = None,
    body: JSON | None = None,
    content_type: str = "application/json",
    request_timeout: float = 30.0,
) -> JSON:
    """Send one request through the client's session and return the decoded JSON body."""
    response = await api.call_api(
        path,
        method,
        query_params=list((query or {}).items()),
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
        _preload_content=False,
        _request_timeout=request_timeout,
    )
    try:
        data = await response.read()
    finally:
        response.release()
    if not 200 <= response.status < 300:
        raise ApiStatusError(method, path, response.status, data)
    result: JSON = json.loads(data) if data else {}
    return result


async def _stream(
    api: k8s_client.ApiClient, path: str, query: dict[str, str], read_timeout: float
) -> AsyncIterator[JSON]:
    """Yield the decoded events of one watch request until the server ends it."""
    response = await api.call_api(
        path,
        "GET",
        query_params=list(query.items()),
        header_params={"Accept": "application/json"},
        auth_settings=["BearerToken"],
        _preload_content=False,
        _request_timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=read_timeout),
    )
    try:
        if response.status != 200:
            raise ApiStatusError("WATCH", path, response.status, await response.read())
        async for line in response.content:
            if line.strip():
                yield json.loads(line)
    finally:
        response.close()


# -- per-node and per-pod state ----------------------------------------------------------


@dataclass
class StoredImage:
    """An image in a node's store."""

    ref: ImageReference
    size: int


class _NodeState:
    def __init__(self, name: str, config: KubeletConfig) -> None:
        self.name = name
        self.arch = "amd64"
        self.os = "linux"
        self.ip = "10.244.0.1"
        bandwidth = config.node_bandwidths.get(name, config.node_bandwidth)
        self.link = Link(bandwidth / config.time_scale)
        self.changed = anyio.Event()
        self.images: dict[str, StoredImage] = {}
        self.transfers: dict[str, anyio.Event] = {}
        slots = 1 if config.serialize_image_pulls else config.max_parallel_image_pulls
        self.slots = anyio.Semaphore(slots) if slots is not None else None
        qps = config.registry_pull_qps
        self.pull_bucket = (
            TokenBucket(qps / config.time_scale, config.registry_burst, time.monotonic()) if qps else None
        )

    def update(self, node: JSON) -> None:
        labels = node.get("metadata", {}).get("labels") or {}
        info = node.get("status", {}).get("nodeInfo") or {}
        self.arch = info.get("architecture") or labels.get("kubernetes.io/arch") or self.arch
        self.os = info.get("operatingSystem") or labels.get("kubernetes.io/os") or self.os
        for address in node.get("status", {}).get("addresses") or []:
            if address.get("type") == "InternalIP":
                self.ip = address["address"]

    def notify(self) -> None:
        """Wake every transfer on this node so it recomputes its bandwidth share."""
        self.changed.set()
        self.changed = anyio.Event()


class _PullError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _PodGoneError(Exception):
    """The pod no longer exists, so its worker stops."""


def _waiting(reason: str, message: str | None = None) -> JSON:
    state: JSON = {"reason": reason}
    if message:
        state["message"] = message
    return {"waiting": state}


@dataclass
class _Container:
    name: str
    image: str
    policy: str
    init: bool
    sidecar: bool
    ref: ImageReference | None
    ref_error: str | None
    state: JSON
    image_id: str = ""
    container_id: str = ""
    started: bool = False
    ready: bool = False

    @property
    def field_path(self) -> str:
        kind = "initContainers" if self.init else "containers"
        return f"spec.{kind}{{{self.name}}}"

    @property
    def waiting(self) -> bool:
        return "waiting" in self.state

    @property
    def done(self) -> bool:
        """Init containers count as done once they exited 0 or, for sidecars, started."""
        return self.started if self.sidecar else "terminated" in self.state

    def status(self) -> JSON:
        status: JSON = {
            "name": self.name,
            "image": self.ref.name if self.image_id and self.ref else self.image,
            "imageID": self.image_id,
            "ready": self.ready,
            "started": self.started,
            "restartCount": 0,
            "state": self.state,
            "lastState": {},
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status


@dataclass
class _PodRun:
    uid: str
    namespace: str
    name: str
    node: str
    restart_policy: str
    deadline_seconds: float | None
    start_time: str
    pod_ip: str
    host_ip: str
    init_containers: list[_Container]
    containers: list[_Container]
    other_conditions: list[JSON]
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    phase: str = "Pending"
    reason: str | None = None
    message: str | None = None
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)
    last_sent: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def _condition(self, kind: str, ok: bool, reason: str | None, message: str | None) -> JSON:
        status = "True" if ok else "False"
        previous = self.transitions.get(kind)
        since = previous[1] if previous and previous[0] == status else _timestamp()
        self.transitions[kind] = (status, since)
        condition: JSON = {
            "type": kind,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": since,
        }
        if not ok and reason:
            condition["reason"] = reason
        if not ok and message:
            condition["message"] = message
        return condition

    def status(self) -> JSON:
        """Build the pod status, phase and conditions from the container states."""
        pending_init = [c.name for c in self.init_containers if not c.done]
        unready = [c.name for c in self.containers if not c.ready]

        completed = self.phase == "Succeeded"
        ready_reason = "PodCompleted" if completed else "ContainersNotReady"
        ready_message = None if completed else f"containers with unready status: [{' '.join(unready)}]"
        conditions = [c for c in self.other_conditions if c.get("type") == "PodScheduled"]
        conditions += [
            self._condition("PodReadyToStartContainers", True, None, None),
            self._condition(
                "Initialized",
                not pending_init,
                "ContainersNotInitialized",
                f"containers with incomplete status: [{' '.join(pending_init)}]",
            ),
            self._condition("Ready", not unready, ready_reason, ready_message),
            self._condition("ContainersReady", not unready, ready_reason, ready_message),
        ]

        status: JSON = {
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": self.host_ip,
            "hostIPs": [{"ip": self.host_ip}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        if self.reason:
            status["reason"] = self.reason
            status["message"] = self.message
        return status

    def update_phase(self) -> None:
        """Set the phase from container states, as the kubelet's getPhase does."""
        if self.phase in _TERMINAL_PHASES:
            return
        if any(not c.done for c in self.init_containers) or any(c.waiting for c in self.containers):
            self.phase = "Pending"
        elif any("running" in c.state for c in self.containers):
            self.phase = "Running"
        elif all(c.state.get("terminated", {}).get("exitCode") == 0 for c in self.containers):
            self.phase = "Succeeded"
        else:
            self.phase = "Failed"


@dataclass
class _PodEntry:
    namespace: str
    name: str
    node: str
    run: _PodRun | None = None
    deleting: bool = False


# -- Events ----------------------------------------------------------------------------


@dataclass
class _Event:
    key: tuple[str, ...]
    namespace: str
    body: JSON


class _EventSink:
    """Writer of the Events of a subset of pods, in order, with repeats aggregated.

    client-go's recorder turns an Event identical to an earlier one (same object,
    field path, type, reason and message) into a count increase with a new
    lastTimestamp. This sink does the same with a cache of 4096 keys, as client-go's.
    """

    CACHE_SIZE = 4096

    def __init__(self, api: k8s_client.ApiClient) -> None:
        self.api = api
        self.send, self.receive = anyio.create_memory_object_stream[_Event](math.inf)
        self.seen: OrderedDict[tuple[str, ...], tuple[str, int]] = OrderedDict()

    async def run(self) -> None:
        async with self.receive:
            async for event in self.receive:
                await self._write(event)

    async def _write(self, event: _Event) -> None:
        path = f"/api/v1/namespaces/{event.namespace}/events"
        for attempt in range(3):
            try:
                await self._write_once(event, path)
                return
            except ApiStatusError as exc:
                if exc.status in (403, 404, 409, 422):
                    log.debug("event dropped: %s", exc)
                    return
                error: Exception = exc
            except _TRANSIENT_ERRORS as exc:
                error = exc
            await anyio.sleep(0.2 * 2**attempt)
        log.warning("event %s dropped after 3 attempts: %s", event.body["reason"], error)

    async def _write_once(self, event: _Event, path: str) -> None:
        previous = self.seen.get(event.key)
        if previous is not None:
            name, count = previous
            patch = {"count": count + 1, "lastTimestamp": event.body["lastTimestamp"]}
            try:
                await _request(self.api, "PATCH", f"{path}/{name}", body=patch, content_type=_MERGE_PATCH)
                self.seen[event.key] = (name, count + 1)
                self.seen.move_to_end(event.key)
                return
            except ApiStatusError as exc:
                if exc.status != 404:
                    raise
                del self.seen[event.key]
        created = await _request(self.api, "POST", path, body=event.body)
        self.seen[event.key] = (created["metadata"]["name"], 1)
        if len(self.seen) > self.CACHE_SIZE:
            self.seen.popitem(last=False)


# -- the simulator -----------------------------------------------------------------------


class SimulatedKubelet:
    """Plays the kubelet for every pod bound to a node annotated ``kwok.x-k8s.io/node: fake``.

    One list+watch on nodes keeps a per-node image store, which lives as long as the
    node. One list+watch on bound pods starts a worker per pod. Counters are public:
    ``registry_requests`` and ``node_requests`` (RequestCounts by registry host and
    node name), ``node_pulls`` (PullCounts by node) and ``pull_log`` (recent
    PullRecords). Rules and profiles in ``config`` may change while it runs, except
    the node bandwidth and pull slots of nodes already seen.
    """

    def __init__(self, api_client: k8s_client.ApiClient, config: KubeletConfig | None = None) -> None:
        self.api = api_client
        self.config = config if config is not None else KubeletConfig()
        self.config.validate()
        self.registry_requests: defaultdict[str, RequestCounts] = defaultdict(RequestCounts)
        self.node_requests: defaultdict[str, RequestCounts] = defaultdict(RequestCounts)
        self.node_pulls: defaultdict[str, PullCounts] = defaultdict(PullCounts)
        self.pull_log: deque[PullRecord] = deque(maxlen=100_000)
        self._nodes: dict[str, _NodeState] = {}
        self._other_nodes: set[str] = set()
        self._nodes_synced = False
        self._pods: dict[str, _PodEntry] = {}
        self._parked: dict[str, JSON] = {}
        self._buckets: dict[str, TokenBucket | None] = {}
        self._backoff = Backoff(
            self.config.backoff_initial * self.config.time_scale,
            self.config.backoff_max * self.config.time_scale,
        )
        self._sinks: list[_EventSink] = []
        self._task_group: TaskGroup | None = None
        self._dirty_nodes: set[str] = set()
        self._preloads: defaultdict[str, list[ImageReference]] = defaultdict(list)
        self._pod_ips = itertools.count(1)
        self._transfer_keys = itertools.count(1)
        self._event_clock = 0

    # -- public API --------------------------------------------------------------------

    @asynccontextmanager
    async def running(self, sync_timeout: float = 60.0) -> AsyncIterator[SimulatedKubelet]:
        """Run the simulator in the background; enter once nodes and pods are listed."""
        async with anyio.create_task_group() as group:
            with anyio.fail_after(sync_timeout):
                await group.start(self.run)
            try:
                yield self
            finally:
                group.cancel_scope.cancel()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch nodes and pods and run pods until cancelled; report started after the lists."""
        self._sinks = [_EventSink(self.api) for _ in range(self.config.event_writers)]
        try:
            await self._run(task_status)
        finally:
            for sink in self._sinks:
                sink.send.close()

    async def _run(self, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as group:
            self._task_group = group
            for sink in self._sinks:
                group.start_soon(sink.run)
            nodes_listed, pods_listed = anyio.Event(), anyio.Event()
            group.start_soon(self._watch, "/api/v1/nodes", {}, self._replace_nodes, self._on_node, nodes_listed)
            await nodes_listed.wait()
            group.start_soon(
                self._watch,
                "/api/v1/pods",
                {"fieldSelector": "spec.nodeName!="},
                self._replace_pods,
                self._on_pod,
                pods_listed,
            )
            await pods_listed.wait()
            group.start_soon(self._report_node_images)
            log.info("simulated kubelet started: %d fake nodes", len(self._nodes))
            task_status.started()

    def node_names(self) -> list[str]:
        """Return the names of the fake nodes seen so far, sorted."""
        return sorted(self._nodes)

    def images(self, node: str) -> frozenset[str]:
        """Return the normalized references in a node's image store (empty if unknown)."""
        state = self._nodes.get(node)
        return frozenset(state.images) if state else frozenset()

    def has_image(self, node: str, image: str) -> bool:
        return parse_reference(image).name in self.images(node)

    def preload(self, node: str, images: Iterable[str]) -> None:
        """Put images into a node's store, as if an earlier pod had pulled them.

        For a node not seen yet, the images are stored when the node appears.
        """
        refs = [parse_reference(image) for image in images]
        state = self._nodes.get(node)
        if state is None:
            self._preloads[node].extend(refs)
            return
        for ref in refs:
            self._store(state, ref)

    def add_failure(self, rule: FailureRule) -> FailureRule:
        self.config.failures.append(rule)
        return rule

    def set_registry(self, host: str, profile: RegistryProfile) -> None:
        """Set a registry's quota and image defaults; its token bucket starts full."""
        self.config.registries[host] = profile
        self._buckets.pop(host, None)

    def totals(self) -> JSON:
        """Return summed counters, for logs and benchmark records."""
        requests = RequestCounts()
        for counts in self.registry_requests.values():
            requests.total += counts.total
            requests.succeeded += counts.succeeded
            requests.throttled += counts.throttled
            requests.failed += counts.failed
        pulls = PullCounts()
        for node_counts in self.node_pulls.values():
            pulls.attempts += node_counts.attempts
            pulls.succeeded += node_counts.succeeded
            pulls.failed += node_counts.failed
            pulls.qps_exceeded += node_counts.qps_exceeded
            pulls.bytes += node_counts.bytes
            pulls.active += node_counts.active
        return {
            "nodes": len(self._nodes),
            "pods": len(self._pods),
            "requests": asdict(requests),
            "pulls": {k: v for k, v in asdict(pulls).items() if k != "max_active"},
        }

    # -- watches -----------------------------------------------------------------------

    async def _watch(
        self,
        path: str,
        query: dict[str, str],
        replace: Callable[[list[JSON]], None],
        apply: Callable[[str, JSON], None],
        listed: anyio.Event,
    ) -> None:
        """List, then watch from the list's resourceVersion; relist on 410 Gone."""
        version: str | None = None
        delay = 0.5
        while True:
            try:
                if version is None:
                    listing = await _request(self.api, "GET", path, query=query, request_timeout=60)
                    version = listing["metadata"]["resourceVersion"]
                    replace(listing.get("items") or [])
                    listed.set()
                watch_query = {
                    **query,
                    "watch": "true",
                    "resourceVersion": version,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": "300",
                }
                async for event in _stream(self.api, path, watch_query, read_timeout=330):
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            version = None
                            break
                        raise ApiStatusError("WATCH", path, int(obj.get("code") or 500), b"")
                    version = obj["metadata"]["resourceVersion"]
                    if kind != "BOOKMARK":
                        apply(str(kind), obj)
                delay = 0.5
            except (ApiStatusError, *_TRANSIENT_ERRORS, json.JSONDecodeError) as exc:
                if isinstance(exc, ApiStatusError) and exc.status == 410:
                    version = None
                log.warning("watch %s failed, retrying in %.1f s: %s", path, delay, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _replace_nodes(self, nodes: list[JSON]) -> None:
        names = {n["metadata"]["name"] for n in nodes}
        for name in [n for n in self._nodes if n not in names]:
            self._remove_node(name)
        self._other_nodes &= names
        for node in nodes:
            self._on_node("ADDED", node)
        self._nodes_synced = True

    def _on_node(self, kind: str, node: JSON) -> None:
        name = node["metadata"]["name"]
        if kind == "DELETED":
            self._remove_node(name)
            self._other_nodes.discard(name)
            return
        annotations = node["metadata"].get("annotations") or {}
        if annotations.get(FAKE_NODE_ANNOTATION) != "fake":
            self._other_nodes.add(name)
            return
        state = self._nodes.get(name)
        if state is None:
            state = _NodeState(name, self.config)
            self._nodes[name] = state
            for image in self.config.preloaded_images:
                self._store(state, parse_reference(image))
            for ref in self._preloads.pop(name, []):
                self._store(state, ref)
            log.debug("fake node %s added", name)
        state.update(node)
        waiting = [pod for pod in self._parked.values() if pod["spec"].get("nodeName") == name]
        for pod in waiting:
            self._parked.pop(pod["metadata"]["uid"], None)
            self._on_pod("ADDED", pod)

    def _remove_node(self, name: str) -> None:
        """Drop a node's image store and stop its pods; the pod GC deletes those pods."""
        if self._nodes.pop(name, None) is None:
            return
        self._dirty_nodes.discard(name)
        for uid, entry in list(self._pods.items()):
            if entry.node == name:
                self._forget_pod(uid)
        log.debug("fake node %s removed with its image store", name)

    def _replace_pods(self, pods: list[JSON]) -> None:
        uids = {p["metadata"]["uid"] for p in pods}
        for uid in [u for u in self._pods if u not in uids]:
            self._forget_pod(uid)
        for uid in [u for u in self._parked if u not in uids]:
            del self._parked[uid]
        for pod in pods:
            self._on_pod("ADDED", pod)

    def _on_pod(self, kind: str, pod: JSON) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if kind == "DELETED":
            self._forget_pod(uid)
            self._parked.pop(uid, None)
            return
        node = pod["spec"].get("nodeName")
        if not node or node in self._other_nodes:
            return
        if node not in self._nodes:
            self._parked[uid] = pod
            return
        entry = self._pods.get(uid)
        if entry is None:
            entry = _PodEntry(meta["namespace"], meta["name"], node)
            self._pods[uid] = entry
            if not meta.get("deletionTimestamp"):
                self._start_pod(entry, pod)
        if meta.get("deletionTimestamp") and not entry.deleting:
            entry.deleting = True
            if entry.run is not None:
                entry.run.scope.cancel()
            self._spawn(self._delete_pod, uid, entry)

    def _forget_pod(self, uid: str) -> None:
        entry = self._pods.pop(uid, None)
        if entry is not None and entry.run is not None:
            entry.run.scope.cancel()
        self._backoff.forget(uid)

    def _spawn(self, func: Callable[..., Any], *args: Any) -> None:
        assert self._task_group is not None, "the simulator is not running"
        self._task_group.start_soon(func, *args)

    # -- pod lifecycle -------------------------------------------------------------------

    def _start_pod(self, entry: _PodEntry, pod: JSON) -> None:
        status = pod.get("status") or {}
        if status.get("phase") in _TERMINAL_PHASES:
            return
        if _runs_already(pod):
            # Pods that a previous simulator started keep running; their images are present.
            state = self._nodes[entry.node]
            for container in pod["spec"]["containers"]:
                self._store(state, parse_reference(container["image"]))
            return
        entry.run = self._new_run(pod, entry.node)
        self._spawn(self._pod_worker, entry.run)

    def _new_run(self, pod: JSON, node: str) -> _PodRun:
        spec, meta = pod["spec"], pod["metadata"]
        status = pod.get("status") or {}
        init_specs = spec.get("initContainers") or []
        main_reason = "PodInitializing" if init_specs else "ContainerCreating"
        deadline = spec.get("activeDeadlineSeconds")
        address = next(self._pod_ips)
        return _PodRun(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            node=node,
            restart_policy=spec.get("restartPolicy") or "Always",
            deadline_seconds=float(deadline) if deadline is not None else None,
            start_time=status.get("startTime") or _timestamp(),
            pod_ip=f"10.245.{(address >> 8) & 255}.{address & 255}",
            host_ip=self._nodes[node].ip,
            init_containers=[_container(c, True, "PodInitializing") for c in init_specs],
            containers=[_container(c, False, main_reason) for c in spec["containers"]],
            other_conditions=list(status.get("conditions") or []),
        )

    async def _pod_worker(self, run: _PodRun) -> None:
        try:
            with run.scope:
                await self._run_pod(run)
        except _PodGoneError:
            log.debug("pod %s is gone; its worker stops", run.key)
        except Exception:
            log.exception("simulated kubelet failed on pod %s (uid %s)", run.key, run.uid)

    async def _run_pod(self, run: _PodRun) -> None:
        await self._send_status(run)
        remaining = math.inf
        if run.deadline_seconds is not None:
            remaining = run.deadline_seconds - (time.time() - _parse_timestamp(run.start_time))
        with anyio.move_on_after(max(remaining, 0.0)) as deadline:
            for container in run.init_containers:
                await self._ensure_image(run, container)
                self._start_container(run, container)
            if run.init_containers:
                for container in run.containers:
                    container.state = _waiting("ContainerCreating")
                await self._send_status(run)
            await self._start_main_containers(run)
            if run.restart_policy != "Always":
                for sidecar in (c for c in run.init_containers if c.sidecar):
                    self._stop_container(sidecar, exit_code=0, reason="Completed")
            run.update_phase()
            await self._send_status(run)
            if run.phase not in _TERMINAL_PHASES and math.isfinite(remaining):
                await anyio.sleep_forever()
        if deadline.cancelled_caught:
            await self._fail_deadline(run)

    async def _start_main_containers(self, run: _PodRun) -> None:
        """Start the main containers in order, as the kubelet's SyncPod does.

        A container with pull policy Never whose image is missing does not hold up the
        containers after it: the kubelet reports ErrImageNeverPull, starts the others and
        tries again at the pod's next sync, about ``backoff_initial`` seconds later.
        """
        pending = list(run.containers)
        while pending:
            missing = []
            for container in pending:
                if container.policy == "Never" and not self._present(run, container):
                    self._never_pull(run, container)
                    missing.append(container)
                    continue
                await self._ensure_image(run, container)
                self._start_container(run, container)
            if missing:
                await self._send_status(run)
                await anyio.sleep(self.config.backoff_initial * self.config.time_scale)
            pending = missing

    def _present(self, run: _PodRun, container: _Container) -> bool:
        return container.ref is not None and container.ref.name in self._nodes[run.node].images

    def _never_pull(self, run: _PodRun, container: _Container) -> None:
        if container.state.get("waiting", {}).get("reason") == "ErrImageNeverPull":
            # The kubelet reports this again at every sync, but client-go's event spam
            # filter passes 25 Events per object and then one per 5 minutes. So a repeat
            # is not written here.
            return
        message = f'Container image "{container.image}" is not present with pull policy of Never'
        self._event(run, container, "Warning", "ErrImageNeverPull", message)
        self._event(run, container, "Warning", "Failed", "Error: ErrImageNeverPull")
        container.state = _waiting("ErrImageNeverPull", message)

    async def _fail_deadline(self, run: _PodRun) -> None:
        """Kill the pod's containers and mark it Failed, as for an exceeded activeDeadlineSeconds."""
        for container in (*run.init_containers, *run.containers):
            if "running" in container.state:
                self._stop_container(container, exit_code=137, reason="Error")
                container.ready = False
        run.phase = "Failed"
        run.reason = "DeadlineExceeded"
        run.message = "Pod was active on the node longer than the specified deadline"
        await self._send_status(run)

    def _start_container(self, run: _PodRun, container: _Container) -> None:
        container.container_id = f"containerd://{_sha256(run.uid + '/' + container.name)}"
        now = _timestamp()
        if self.config.container_events:
            self._event(run, container, "Normal", "Created", f"Created container: {container.name}")
            self._event(run, container, "Normal", "Started", f"Started container {container.name}")
        container.started = True
        keeps_running = container.sidecar or (not container.init and run.restart_policy == "Always")
        if keeps_running:
            container.state = {"running": {"startedAt": now}}
            container.ready = True
        else:
            self._stop_container(container, exit_code=0, reason="Completed", started_at=now)

    @staticmethod
    def _stop_container(container: _Container, exit_code: int, reason: str, started_at: str | None = None) -> None:
        started = started_at or container.state.get("running", {}).get("startedAt") or _timestamp()
        container.state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": reason,
                "startedAt": started,
                "finishedAt": _timestamp(),
                "containerID": container.container_id,
            }
        }
        container.started = False
        container.ready = False

    async def _delete_pod(self, uid: str, entry: _PodEntry) -> None:
        """Finish a graceful deletion at once, as the kubelet does after its containers stop."""
        path = f"/api/v1/namespaces/{entry.namespace}/pods/{entry.name}"
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        for attempt in range(5):
            try:
                await _request(self.api, "DELETE", path, body=body)
                return
            except ApiStatusError as exc:
                if exc.status in (404, 409):
                    return
                error: Exception = exc
            except _TRANSIENT_ERRORS as exc:
                error = exc
            await anyio.sleep(0.5 * 2**attempt)
        log.warning("failed to delete pod %s/%s (uid %s) after 5 attempts: %s", entry.namespace, entry.name, uid, error)

    async def _send_status(self, run: _PodRun) -> None:
        """Patch the pod's status subresource unless it is unchanged since the last patch."""
        status = run.status()
        text = json.dumps(status, sort_keys=True)
        if text == run.last_sent:
            return
        path = f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status"
        body = {"metadata": {"uid": run.uid}, "status": status}
        delay = 0.2
        while True:
            try:
                await _request(self.api, "PATCH", path, body=body, content_type=_MERGE_PATCH)
                run.last_sent = text
                return
            except ApiStatusError as exc:
                if exc.status in (404, 409):
                    raise _PodGoneError(str(exc)) from exc
                if exc.status != 429 and exc.status < 500:
                    raise
                error: Exception = exc
            except _TRANSIENT_ERRORS as exc:
                error = exc
            log.warning(
                "failed to write status of pod %s (uid %s), retrying in %.1f s: %s", run.key, run.uid, delay, error
            )
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- image pulls ---------------------------------------------------------------------

    async def _ensure_image(self, run: _PodRun, container: _Container) -> None:
        """Make the container's image present, following the kubelet's EnsureImageExists."""
        if container.ref is None:
            message = (
                f'Failed to apply default image tag "{container.image}": couldn\'t parse image '
                f'name "{container.image}": invalid reference format'
            )
            self._event(run, container, "Warning", "InspectFailed", message)
            self._event(run, container, "Warning", "Failed", "Error: InvalidImageName")
            container.state = _waiting("InvalidImageName", message)
            await self._send_status(run)
            await anyio.sleep_forever()
        ref = container.ref
        assert ref is not None
        scale = self.config.time_scale
        while True:
            node = self._nodes[run.node]
            present = ref.name in node.images
            if present and container.policy != "Always":
                message = f'Container image "{container.image}" already present on machine'
                self._event(run, container, "Normal", "Pulled", message)
                container.image_id = ref.image_id
                return
            if container.policy == "Never":
                self._never_pull(run, container)
                await self._send_status(run)
                await anyio.sleep(self.config.backoff_initial * scale)
                continue
            wait = self._backoff.remaining(run.uid, container.image, time.monotonic())
            if wait > 0:
                self._event(run, container, "Normal", "BackOff", f'Back-off pulling image "{container.image}"')
                self._event(run, container, "Warning", "Failed", "Error: ImagePullBackOff")
                last_error = container.state.get("waiting", {}).get("message", "")
                if container.state.get("waiting", {}).get("reason") == "ErrImagePull":
                    # NOTE: kubelet releases word this status message differently. This form
                    # keeps the runtime error, so a reader of the status alone sees the cause.
                    container.state = _waiting(
                        "ImagePullBackOff",
                        f'Back-off pulling image "{container.image}": ErrImagePull: {last_error}',
                    )
                await self._send_status(run)
                await anyio.sleep(wait)
            try:
                await self._pull(run, container, node, ref)
            except _PullError as exc:
                self._event(
                    run,
                    container,
                    "Warning",
                    "Failed",
                    f'Failed to pull image "{container.image}": {exc.message}',
                )
                self._event(run, container, "Warning", "Failed", "Error: ErrImagePull")
                delay = self._backoff.next(run.uid, container.image, time.monotonic())
                container.state = _waiting("ErrImagePull", exc.message)
                await self._send_status(run)
                await anyio.sleep(min(self.config.resync_delay * scale, delay / 2))
                continue
            self._backoff.reset(run.uid, container.image)
            container.image_id = ref.image_id
            return

    async def _pull(self, run: _PodRun, container: _Container, node: _NodeState, ref: ImageReference) -> None:
        """Run one pull attempt from the ``Pulling`` event to ``Pulled`` or a _PullError."""
        queued = time.monotonic()
        self._event(run, container, "Normal", "Pulling", f'Pulling image "{container.image}"')
        record = PullRecord(node=node.name, pod=run.key, image=ref.name, queued_at=queued)
        self.pull_log.append(record)
        counts = self.node_pulls[node.name]
        counts.attempts += 1

        try:
            if node.slots is None:
                size = await self._pull_in_slot(node, ref, record)
            else:
                async with node.slots:
                    size = await self._pull_in_slot(node, ref, record)
        except _PullError as exc:
            record.finished_at = time.monotonic()
            record.error = exc.message
            counts.failed += 1
            raise

        finished = record.finished_at = time.monotonic()
        assert record.started_at is not None
        record.size = size
        counts.succeeded += 1
        scale = self.config.time_scale
        pulled = format_go_duration((finished - record.started_at) / scale)
        total = format_go_duration((finished - queued) / scale)
        message = (
            f'Successfully pulled image "{container.image}" in {pulled} ({total} including '
            f"waiting). Image size: {size} bytes."
        )
        self._event(run, container, "Normal", "Pulled", message)

    async def _pull_in_slot(self, node: _NodeState, ref: ImageReference, record: PullRecord) -> int:
        record.started_at = time.monotonic()
        counts = self.node_pulls[node.name]
        counts.active += 1
        counts.max_active = max(counts.max_active, counts.active)
        try:
            if node.pull_bucket is not None and not node.pull_bucket.try_take(record.started_at):
                # The kubelet's throttled image service rejects the pull before any registry request.
                counts.qps_exceeded += 1
                raise _PullError(PULL_QPS_EXCEEDED)
            profile = resolve_profile(self.config, ref)
            rule = next((r for r in self.config.failures if r.matches(ref, node.name)), None)
            fails_now = rule is not None and rule.kind is not FailureKind.DISK_FULL
            self._registry_request(node, ref, layer=None, failed=fails_now)
            if self.config.pull_latency and ref.name not in node.images:
                await anyio.sleep(self.config.pull_latency * self.config.time_scale)
            if rule is not None and fails_now:
                rule.fired += 1
                await anyio.sleep(rule.delay * self.config.time_scale)
                raise _PullError(failure_message(rule.kind, ref))
            if profile.platforms is not None and f"{node.os}/{node.arch}" not in profile.platforms:
                raise _PullError(failure_message(FailureKind.PLATFORM_MISMATCH, ref))
            if ref.name not in node.images:
                for layer in range(profile.layers):
                    self._registry_request(node, ref, layer=layer)
                await self._transfer(node, ref, profile, rule)
            counts.bytes += profile.size
            return profile.size
        finally:
            counts.active -= 1

    def _registry_request(self, node: _NodeState, ref: ImageReference, layer: int | None, failed: bool = False) -> None:
        """Count one registry request and raise a 429 _PullError if the quota rejects it.

        ``failed`` marks a request that passes the quota but gets an injected error.
        """
        both = (self.registry_requests[ref.registry], self.node_requests[node.name])
        bucket = self._bucket(ref.registry)
        throttled = bucket is not None and not bucket.try_take(time.monotonic())
        for counts in both:
            counts.total += 1
            if throttled:
                counts.throttled += 1
            elif failed:
                counts.failed += 1
            else:
                counts.succeeded += 1
        if throttled:
            raise _PullError(throttled_message(ref, layer))

    def _bucket(self, registry: str) -> TokenBucket | None:
        if registry not in self._buckets:
            profile = self.config.registries.get(registry)
            bucket = None
            if profile is not None and profile.qps is not None:
                rate = profile.qps / self.config.time_scale
                bucket = TokenBucket(rate, profile.burst, time.monotonic())
            self._buckets[registry] = bucket
        return self._buckets[registry]

    async def _transfer(
        self,
        node: _NodeState,
        ref: ImageReference,
        profile: ResolvedProfile,
        rule: FailureRule | None,
    ) -> None:
        """Download the image into the node's store; concurrent pulls of it share one download."""
        while ref.name in node.transfers:
            # containerd downloads each blob once, so a second pull waits for the first.
            await node.transfers[ref.name].wait()
            if ref.name in node.images:
                return
        finished = anyio.Event()
        node.transfers[ref.name] = finished
        try:
            if profile.pull_seconds is not None:
                await anyio.sleep(profile.pull_seconds * self.config.time_scale)
            else:
                await self._flow(node, profile.size)
            if rule is not None and rule.kind is FailureKind.DISK_FULL:
                # Unpacking fails after the download, so the bandwidth was spent.
                rule.fired += 1
                raise _PullError(failure_message(rule.kind, ref))
            self._store(node, ref, profile.size)
        finally:
            del node.transfers[ref.name]
            finished.set()

    async def _flow(self, node: _NodeState, size: int) -> None:
        """Wait until ``size`` bytes arrived over the node's shared link."""
        key = next(self._transfer_keys)
        link = node.link
        link.add(key, size, time.monotonic())
        node.notify()
        try:
            while True:
                link.advance(time.monotonic())
                left = link.seconds_left(key)
                if left <= 0:
                    return
                changed = node.changed
                with anyio.move_on_after(left):
                    await changed.wait()
        finally:
            link.remove(key, time.monotonic())
            node.notify()

    def _store(self, node: _NodeState, ref: ImageReference, size: int | None = None) -> None:
        if size is None:
            size = resolve_profile(self.config, ref).size
        node.images[ref.name] = StoredImage(ref, size)
        self._dirty_nodes.add(node.name)

    async def _report_node_images(self) -> None:
        """Write changed image stores to node.status.images, largest first, like the kubelet."""
        interval = self.config.node_status_interval
        if interval is None:
            return
        while True:
            await anyio.sleep(interval)
            dirty, self._dirty_nodes = self._dirty_nodes, set()
            for name in sorted(dirty):
                node = self._nodes.get(name)
                if node is None:
                    continue
                stored = sorted(node.images.values(), key=lambda s: s.size, reverse=True)
                images = [
                    {"names": [s.ref.image_id, s.ref.name], "sizeBytes": s.size}
                    for s in stored[:NODE_STATUS_MAX_IMAGES]
                ]
                try:
                    await _request(
                        self.api,
                        "PATCH",
                        f"/api/v1/nodes/{name}/status",
                        body={"status": {"images": images}},
                        content_type=_MERGE_PATCH,
                    )
                except (ApiStatusError, *_TRANSIENT_ERRORS) as exc:
                    log.warning("failed to write images of node %s, retrying later: %s", name, exc)
                    self._dirty_nodes.add(name)

    # -- events --------------------------------------------------------------------------

    def _event(self, run: _PodRun, container: _Container, kind: str, reason: str, message: str) -> None:
        """Queue a core/v1 Event about one container, shaped like the kubelet's."""
        now = _timestamp()
        # client-go names events "<object>.<unix nanoseconds in hex>".
        self._event_clock = max(time.time_ns(), self._event_clock + 1)
        body = {
            "metadata": {"name": f"{run.name}.{self._event_clock:x}", "namespace": run.namespace},
            "involvedObject": {
                "kind": "Pod",
                "namespace": run.namespace,
                "name": run.name,
                "uid": run.uid,
                "apiVersion": "v1",
                "fieldPath": container.field_path,
            },
            "reason": reason,
            "message": message,
            "source": {"component": "kubelet", "host": run.node},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "type": kind,
            "eventTime": None,
            "reportingComponent": "kubelet",
            "reportingInstance": run.node,
        }
        key = (run.uid, container.field_path, kind, reason, message)
        # One sink per pod keeps each pod's events in the order they happened.
        sink = self._sinks[int(run.uid.replace("-", "")[-8:], 16) % len(self._sinks)]
        sink.send.send_nowait(_Event(key, run.namespace, body))


def _container(spec: JSON, init: bool, reason: str) -> _Container:
    image = spec.get("image") or ""
    try:
        ref: ImageReference | None = parse_reference(image)
        error = None
    except InvalidReferenceError as exc:
        ref, error = None, str(exc)
    policy = spec.get("imagePullPolicy")
    if policy is None:
        # The API server defaults the policy; this mirrors its rule for objects that skipped it.
        policy = "Always" if ref is None or (ref.tag == "latest" and ref.digest is None) else "IfNotPresent"
    return _Container(
        name=spec["name"],
        image=image,
        policy=policy,
        init=init,
        sidecar=init and spec.get("restartPolicy") == "Always",
        ref=ref,
        ref_error=error,
        state=_waiting(reason),
    )


def _runs_already(pod: JSON) -> bool:
    status = pod.get("status") or {}
    statuses = status.get("containerStatuses") or []
    return (
        status.get("phase") == "Running"
        and len(statuses) == len(pod["spec"]["containers"])
        and all("running" in (s.get("state") or {}) for s in statuses)
    )


# -- command line ----------------------------------------------------------------------


def _split_assignment(text: str, option: str) -> tuple[str, str]:
    key, separator, value = text.rpartition("=")
    if not separator or not key or not value:
        raise argparse.ArgumentTypeError(f"invalid {option} value {text!r}: expected KEY=VALUE")
    return key, value


def _failure_rule(text: str, field_name: str) -> FailureRule:
    target, value = _split_assignment(text, f"--fail-{field_name}")
    kind_text, _, attempts = value.partition(":")
    try:
        kind = FailureKind(kind_text)
    except ValueError:
        kinds = ", ".join(k.value for k in FailureKind)
        raise argparse.ArgumentTypeError(f"invalid failure kind {kind_text!r}: expected one of {kinds}") from None
    limit = int(attempts) if attempts else None
    if field_name == "image":
        return FailureRule(kind, image=target, attempts=limit)
    return FailureRule(kind, registry=target, attempts=limit)


def _build_config(args: argparse.Namespace) -> KubeletConfig:
    config = KubeletConfig(
        node_bandwidth=args.bandwidth,
        default_image_size=args.default_image_size,
        serialize_image_pulls=args.serialize_image_pulls,
        max_parallel_image_pulls=args.max_parallel_image_pulls,
        backoff_initial=args.backoff_initial,
        backoff_max=args.backoff_max,
        registry_pull_qps=args.registry_pull_qps or None,
        registry_burst=args.registry_burst,
        pull_latency=args.pull_latency,
        time_scale=args.time_scale,
        node_status_interval=args.node_status_interval,
    )
    for text in args.image_size:
        image, size = _split_assignment(text, "--image-size")
        config.images.setdefault(image, ImageProfile()).size = int(size)
    for text in args.pull_time:
        image, seconds = _split_assignment(text, "--pull-time")
        config.images.setdefault(image, ImageProfile()).pull_seconds = float(seconds)
    for text in args.registry_qps:
        host, value = _split_assignment(text, "--registry-qps")
        qps, _, burst = value.partition("/")
        config.registries[host] = RegistryProfile(qps=float(qps), burst=int(burst or 1))
    config.failures += [_failure_rule(t, "image") for t in args.fail_image]
    config.failures += [_failure_rule(t, "registry") for t in args.fail_registry]
    return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.kubelet",
        description="Run the simulated kubelet for every kwok node of a test-bed cluster.",
    )
    parser.add_argument("--kubeconfig", required=True, help="admin kubeconfig of the cluster")

    # Pull timing.
    parser.add_argument(
        "--bandwidth", type=float, default=DEFAULT_NODE_BANDWIDTH, help="bandwidth of each node in bytes/s"
    )
    parser.add_argument(
        "--default-image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="size in bytes of unlisted images"
    )
    parser.add_argument(
        "--image-size", action="append", default=[], metavar="IMAGE=BYTES", help="size in bytes of one image"
    )
    parser.add_argument(
        "--pull-time",
        action="append",
        default=[],
        metavar="IMAGE=SECONDS",
        help="fixed transfer time of one image in seconds, instead of size / bandwidth",
    )

    # Registry quotas and injected failures.
    parser.add_argument(
        "--registry-qps",
        action="append",
        default=[],
        metavar="HOST=QPS[/BURST]",
        help="request quota of one registry in requests/s, shared by all nodes",
    )
    kinds = ", ".join(k.value for k in FailureKind)
    parser.add_argument(
        "--fail-image",
        action="append",
        default=[],
        metavar="IMAGE=KIND[:N]",
        help=f"inject a failure ({kinds}) for an image, for its first N attempts or always",
    )
    parser.add_argument(
        "--fail-registry",
        action="append",
        default=[],
        metavar="HOST=KIND[:N]",
        help="inject a failure for every image of a registry host",
    )

    # Kubelet settings.
    parser.add_argument("--serialize-image-pulls", action="store_true", help="pull one image at a time per node")
    parser.add_argument("--max-parallel-image-pulls", type=int, help="maximum concurrent pulls per node")
    parser.add_argument(
        "--backoff-initial", type=float, default=DEFAULT_BACKOFF_INITIAL, help="first pull back-off in seconds"
    )
    parser.add_argument("--backoff-max", type=float, default=DEFAULT_BACKOFF_MAX, help="maximum back-off in seconds")
    parser.add_argument(
        "--registry-pull-qps",
        type=float,
        default=DEFAULT_REGISTRY_PULL_QPS,
        help="pull starts per second per node, the kubelet's registryPullQPS; 0 turns the limit off",
    )
    parser.add_argument(
        "--registry-burst", type=int, default=DEFAULT_REGISTRY_BURST, help="burst of pull starts per node"
    )
    parser.add_argument(
        "--pull-latency", type=float, default=0.0, help="seconds of registry round trips before a pull's first byte"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="real seconds per simulated second; 0.1 runs pulls and back-off 10x faster",
    )

    # Reporting.
    parser.add_argument(
        "--node-status-interval", type=float, default=10.0, help="seconds between writes of node.status.images"
    )
    parser.add_argument("--stats-interval", type=float, default=10.0, help="seconds between counter log lines")
    parser.add_argument("--log-level", default="INFO", help="Python logging level, such as DEBUG or INFO")
    return parser


async def _main(args: argparse.Namespace, config: KubeletConfig) -> None:
    configuration = k8s_client.Configuration()
    await k8s_config.load_kube_config(config_file=args.kubeconfig, client_configuration=configuration)
    configuration.connection_pool_maxsize = 64
    async with k8s_client.ApiClient(configuration) as api:
        sim = SimulatedKubelet(api, config)
        async with anyio.create_task_group() as group:
            await group.start(sim.run)

            async def report() -> None:
                while True:
                    await anyio.sleep(args.stats_interval)
                    log.info("counters: %s", json.dumps(sim.totals()))

            group.start_soon(report)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("stopping on signal %s", signal.Signals(signum).name)
                    group.cancel_scope.cancel()
                    break


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = _build_config(args)
        config.validate()
    except (ValueError, argparse.ArgumentTypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    anyio.run(_main, args, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
