"""Prometheus metrics of imgcache, declared in one place on an explicit registry.

Label values are bounded: registry host, failure class, platform, verb, status code.
Node names and full image references never become labels, because a cluster can have
thousands of them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

# Image pulls take from well under a second (a cached layer) to many minutes (multi-GB
# images on a throttled registry). The buckets roughly double up to 20 min.
_PULL_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 240, 480, 900, 1200)
# Compressed image sizes span ~1 MB (pause) to several GB (ML images); powers of 4 from 1 MiB.
_SIZE_BUCKETS = tuple(float(2**20 * 4**i) for i in range(9))
# A node warms up in seconds (few small images) to tens of minutes (large catalogue).
_WARMUP_BUCKETS = (5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 900, 1800, 3600)


class Metrics:
    """Every metric imgcache exports, bound to one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # process_* (memory, CPU, start time) and python_info, as the default registry has.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.pull_duration = Histogram(
            "imgcache_pull_duration_seconds",
            "Image pull time reported by the kubelet's Pulled event, from the runtime's start of the pull.",
            ["registry"],
            buckets=_PULL_BUCKETS,
            registry=r,
        )
        self.pull_wait_duration = Histogram(
            "imgcache_pull_duration_including_waiting_seconds",
            "Image pull time including the wait behind other pulls on the node, from the Pulling event.",
            ["registry"],
            buckets=_PULL_BUCKETS,
            registry=r,
        )
        self.pull_cached = Counter(
            "imgcache_pull_already_present_total",
            "Pulled events saying the image was already present on the node (no registry request).",
            ["registry"],
            registry=r,
        )
        self.pull_size = Histogram(
            "imgcache_pull_image_size_bytes",
            "Image size reported by the kubelet's Pulled event.",
            ["registry"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.pull_failures = Counter(
            "imgcache_pull_failures_total",
            "Failed image pulls by registry and failure class.",
            ["registry", "class"],
            registry=r,
        )
        self.registry_throttled = Counter(
            "imgcache_registry_throttled_total",
            "Throttling responses by registry and source (kubelet pulls or aws_api calls).",
            ["registry", "source"],
            registry=r,
        )
        self.node_warmup = Histogram(
            "imgcache_node_warmup_seconds",
            "Time from node creation until every applicable prepull image is present.",
            ["platform"],
            buckets=_WARMUP_BUCKETS,
            registry=r,
        )
        self.nodes = Gauge(
            "imgcache_nodes",
            "Nodes by warm-up state: warming, warm, failed (some image failed) or skipped.",
            ["state"],
            registry=r,
        )
        self.oldest_warming = Gauge(
            "imgcache_oldest_warming_node_age_seconds",
            "Age of the oldest node that still waits for prepull images (0 if none).",
            registry=r,
        )
        self.queue_depth = Gauge(
            "imgcache_prepull_queue_depth",
            "Prepull (node, image) pairs waiting for a slot.",
            registry=r,
        )
        self.inflight = Gauge(
            "imgcache_prepull_inflight_pods",
            "Prepull pods created and not yet finished.",
            registry=r,
        )
        self.prepull_pods = Counter(
            "imgcache_prepull_pods_total",
            "Prepull pods by outcome: created, succeeded, failed, deadline_exceeded.",
            ["outcome"],
            registry=r,
        )
        self.registry_rate = Gauge(
            "imgcache_registry_rate_limit",
            "Current adaptive prepull rate per registry, in pulls per second.",
            ["registry"],
            registry=r,
        )
        self.catalogue_images = Gauge(
            "imgcache_catalogue_images",
            "Distinct images in the catalogue, by use.",
            ["use"],
            registry=r,
        )
        self.catalogue_invalid = Gauge(
            "imgcache_catalogue_invalid_entries",
            "ImageCache entries rejected by validation.",
            registry=r,
        )
        self.watch_restarts = Counter(
            "imgcache_watch_restarts_total",
            "Watch stream restarts by resource and reason (gone, read_timeout, connection, error, forbidden).",
            ["resource", "reason"],
            registry=r,
        )
        self.api_errors = Counter(
            "imgcache_api_errors_total",
            "Failed Kubernetes API requests by verb and HTTP status (0 = no response).",
            ["verb", "code"],
            registry=r,
        )
        self.leader = Gauge(
            "imgcache_leader",
            "1 while this replica holds the leader Lease, else 0.",
            registry=r,
        )
        self.pinner_daemonsets = Gauge(
            "imgcache_pinner_daemonsets",
            "Pinner DaemonSets the controller wants to exist.",
            registry=r,
        )
        self.ecr_quota = Gauge(
            "imgcache_ecr_rate_quota",
            "ECR API rate quota of the account, in requests per second.",
            ["api"],
            registry=r,
        )

    def count_api_error(self, verb: str, status: int) -> None:
        self.api_errors.labels(verb=verb, code=str(status)).inc()

    def count_watch_restart(self, resource: str, reason: str) -> None:
        self.watch_restarts.labels(resource=resource, reason=reason).inc()
