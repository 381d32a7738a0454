"""Run imgcache on a local cluster with fake EKS nodes: ``python -m testbed.demo``.

The demo starts a control plane in ``.cluster/demo``, installs imgcache's manifests,
runs the controller with its ServiceAccount's token and plays the kubelet of every
fake node in this process. It applies an ImageCache with every image of
``data/eks-addon-images.txt`` and adds amd64 and arm64 nodes in two batches, as
Karpenter would. While imgcache prepulls and pins the images, the demo prints what
``imgcache status`` reads from the cluster. At the end it checks through the API that
every node stores every image, prepulled and pinned, prints a summary and stops
everything it started.

Nothing contacts a host other than 127.0.0.1: the simulated kubelet pulls no real
image, and the controller runs with ``--pull-through-cache=false``, so it never calls AWS.

``--keep`` leaves the control plane, the controller and a simulated kubelet process
running, and ``--stop`` stops them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import anyio
import yaml
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from imgcache.cli import collect_status
from imgcache.kube import ApiError, KubeConfigError
from imgcache.reference import parse as parse_imgcache_reference
from testbed.controller import (
    HELPER_IMAGE,
    NAMESPACE,
    ControllerProcess,
    install_manifests,
    kubectl,
    service_account_kubeconfig,
)
from testbed.controlplane import REPO, ControlPlane
from testbed.kubelet import (
    ImageProfile,
    KubeletConfig,
    RegistryProfile,
    SimulatedKubelet,
    parse_reference,
    resolve_profile,
)
from testbed.nodes import TESTBED_LABEL, NodeFactory, wait_nodes_ready

JSON = dict[str, Any]
# Logger that main() writes to kubelet.log in the demo's folder, with the simulated kubelet's.
log = logging.getLogger("testbed.demo")
DATA = Path(__file__).resolve().parent / "data" / "eks-addon-images.txt"
DEFAULT_DIR = REPO / ".cluster" / "demo"
TESTS_DIR = REPO / "tests"
CACHE_NAMESPACE = "kube-system"
CACHE_NAME = "eks-addons"
LEASE_NAME = "imgcache-leader"
PINNER_SELECTOR = "app.kubernetes.io/component=pinner"
PROGRESS_ANNOTATION = "imgcache.io/prepull-progress"
PREPULLED_ANNOTATION = "imgcache.io/prepulled"
MAX_NODES = 20
# File that marks a folder as the demo's, so --stop and a new run may stop and delete it.
DEMO_MARKER = "made-by-testbed-demo"

MB = 1_000_000
# NOTE: rounded estimates, not measured here, of each image's compressed linux/amd64
# size in bytes. They spread pull times as on a real node. pause is a fraction of a
# megabyte, and CNI, kube-proxy and most controllers are tens of megabytes. cilium,
# argocd, grafana, vault and the OpenTelemetry collector are 100 MB or more.
IMAGE_SIZES: dict[str, int] = {
    "602401143452.dkr.ecr.us-west-2.amazonaws.com/amazon-k8s-cni:v1.19.0-eksbuild.1": 45 * MB,
    "602401143452.dkr.ecr.us-west-2.amazonaws.com/amazon-k8s-cni-init:v1.19.0-eksbuild.1": 60 * MB,
    "602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/kube-proxy:v1.31.2-minimal-eksbuild.3": 30 * MB,
    "602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/coredns:v1.11.3-eksbuild.2": 18 * MB,
    "public.ecr.aws/karpenter/controller:1.1.1": 50 * MB,
    "public.ecr.aws/eks/aws-load-balancer-controller:v2.10.1": 40 * MB,
    "public.ecr.aws/aws-observability/aws-for-fluent-bit:2.32.4": 120 * MB,
    "public.ecr.aws/docker/library/alpine:3.21": 4 * MB,
    "registry.k8s.io/metrics-server/metrics-server:v0.7.2": 20 * MB,
    "registry.k8s.io/autoscaling/cluster-autoscaler:v1.31.0": 35 * MB,
    "registry.k8s.io/external-dns/external-dns:v0.15.0": 30 * MB,
    "registry.k8s.io/ingress-nginx/controller:v1.12.0": 110 * MB,
    "registry.k8s.io/pause:3.10": 320_000,
    "quay.io/jetstack/cert-manager-controller:v1.16.2": 20 * MB,
    "quay.io/jetstack/cert-manager-webhook:v1.16.2": 18 * MB,
    "quay.io/jetstack/cert-manager-cainjector:v1.16.2": 17 * MB,
    "quay.io/cilium/cilium:v1.16.4": 200 * MB,
    "quay.io/cilium/operator-aws:v1.16.4": 35 * MB,
    "quay.io/prometheus/blackbox-exporter:v0.25.0": 12 * MB,
    "quay.io/argoproj/argocd:v2.13.2": 190 * MB,
    "ghcr.io/fluxcd/source-controller:v1.4.1": 35 * MB,
    "ghcr.io/fluxcd/kustomize-controller:v1.4.0": 35 * MB,
    "ghcr.io/external-secrets/external-secrets:v0.10.7": 40 * MB,
    "ghcr.io/kyverno/kyverno:v1.13.2": 50 * MB,
    "ghcr.io/open-telemetry/opentelemetry-collector-releases/opentelemetry-collector-contrib:0.114.0": 110 * MB,
    "docker.io/grafana/grafana:11.3.1": 130 * MB,
    "docker.io/grafana/loki:3.3.0": 30 * MB,
    "docker.io/hashicorp/vault:1.18.2": 150 * MB,
    "docker.io/library/postgres:17.2": 150 * MB,
    "docker.io/bitnami/kubectl:1.31.3": 80 * MB,
    "amazon/aws-cli:2.22.10": 140 * MB,
    "nginx:1.27.3": 70 * MB,
    "busybox:1.37.0": 2_200_000,
    "redis:7.4.1-alpine": 17 * MB,
    "mcr.microsoft.com/dotnet/aspnet:8.0": 90 * MB,
    "gcr.io/distroless/static-debian12:nonroot": 1 * MB,
}
# The helper image (the Dockerfile's "helper" target), which every prepull and pinner
# pod runs as its init container: Debian's static busybox, 1.03 MB gzip-compressed.
HELPER_IMAGE_SIZE = 1_030_000
# NOTE: an estimate of the download-plus-unpack rate that containerd reaches on one
# EC2 node of the m7i or m7g families, not a measurement. Each node has its own link.
NODE_BANDWIDTH = 125 * MB
# Blob requests that each pull sends after its manifest request. Every request counts
# against the registry's quota, as on a real registry.
LAYERS_PER_IMAGE = 3
# The simulated quay.io rejects requests above this quota, shared by all nodes, with
# 429 Too Many Requests. NOTE: the numbers are chosen so that throttling shows up
# within a few minutes. They are not a limit that quay.io publishes.
THROTTLED_REGISTRY = "quay.io"
THROTTLED_QPS = 4.0
THROTTLED_BURST = 10
# Instance type label per architecture, as on nodes that Karpenter launches.
INSTANCE_TYPES = {"amd64": "m7i.xlarge", "arm64": "m7g.xlarge"}
# Share of the nodes in the first batch. The rest join SECOND_BATCH_DELAY / speed seconds
# later, but at least 3 s later.
FIRST_BATCH_SHARE = 0.6
SECOND_BATCH_DELAY = 60.0
# Seconds between refreshes of the progress table on a terminal. Output to a file or a
# pipe gets one full table every PRINTED_TABLE_INTERVAL seconds.
LIVE_TABLE_INTERVAL = 2.0
PRINTED_TABLE_INTERVAL = 15.0
# Seconds that the demo waits at --speed 1 for every node to be warm and pinned. At
# --speed X it waits COMPLETION_TIMEOUT / X seconds plus a fixed 120 s.
COMPLETION_TIMEOUT = 480.0


# -- input and settings -----------------------------------------------------------------


def addon_images() -> list[str]:
    """Return the image references of the data file, in file order."""
    lines = (line.strip() for line in DATA.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def kubelet_config(speed: float) -> KubeletConfig:
    """Build the simulated kubelet's settings: image sizes, bandwidth and the quay.io quota."""
    images = {image: ImageProfile(size=size) for image, size in IMAGE_SIZES.items()}
    images[HELPER_IMAGE] = ImageProfile(size=HELPER_IMAGE_SIZE)
    return KubeletConfig(
        node_bandwidth=NODE_BANDWIDTH,
        default_layers=LAYERS_PER_IMAGE,
        images=images,
        registries={THROTTLED_REGISTRY: RegistryProfile(qps=THROTTLED_QPS, burst=THROTTLED_BURST)},
        time_scale=1.0 / speed,
        node_status_interval=2.0,
    )


def controller_args(speed: float) -> list[str]:
    """Return the controller flags of the demo. All other settings keep imgcache's defaults.

    Progress and status are written more often than by default, so the table moves
    smoothly. The retry back-off (5 s doubling to 120 s by default) shrinks with
    ``--speed`` like the simulated pulls, but the per-registry rates do not.
    """
    return [
        "--progress-interval=2",
        "--status-interval=5",
        f"--retry-initial={5.0 / speed:g}",
        f"--retry-max={120.0 / speed:g}",
    ]


def node_batches(count: int) -> list[list[str]]:
    """Split ``count`` nodes into two batches and return each batch's architectures.

    Architectures alternate, starting with amd64, so both appear from two nodes on.
    """
    architectures = ["amd64" if i % 2 == 0 else "arm64" for i in range(count)]
    first = max(1, round(count * FIRST_BATCH_SHARE))
    return [batch for batch in (architectures[:first], architectures[first:]) if batch]


def image_cache_manifest(images: list[str]) -> JSON:
    return {
        "apiVersion": "imgcache.io/v1alpha1",
        "kind": "ImageCache",
        "metadata": {"name": CACHE_NAME, "namespace": CACHE_NAMESPACE},
        # pin and prepull default to true, so every image is pinned and prepulled.
        "spec": {"images": [{"image": image} for image in images]},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.demo",
        description="Run imgcache on a local cluster with fake EKS nodes and print what it does.",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the cluster, the controller and the simulated kubelet running at the end (Ctrl-C still stops all)",
    )
    parser.add_argument("--stop", action="store_true", help="stop what an earlier --keep run left running, then exit")
    parser.add_argument("--nodes", type=int, default=5, help=f"fake nodes to add, 1 to {MAX_NODES} (default 5)")
    parser.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="how many times faster than real time image pulls, registry quotas and retry back-off run (default 1)",
    )
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help="folder for the cluster's state and logs (default .cluster/demo)"
    )
    parser.add_argument("--summary-json", type=Path, help="also write the summary as JSON to this file")
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= MAX_NODES:
        parser.error(f"invalid --nodes {args.nodes}: expected 1 to {MAX_NODES}")
    if not (args.speed > 0 and math.isfinite(args.speed)):
        parser.error(f"invalid --speed {args.speed}: expected a number greater than 0")
    args.dir = args.dir.resolve()
    return args


# -- output -------------------------------------------------------------------------------


def shown_path(path: Path) -> str:
    """Return ``path`` relative to the repository root when it lies inside it."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def clock(seconds: float) -> str:
    """Format elapsed seconds as m:ss."""
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}:{rest:02d}"


def format_size(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.0f} MB"


def format_rate(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


class Screen:
    """Prints event lines and a progress table that follows them.

    On a terminal the table stays below the last event line and is redrawn in place.
    Otherwise each table is printed in full, at most every PRINTED_TABLE_INTERVAL seconds.
    """

    def __init__(self, stream: TextIO, started: float) -> None:
        self.stream: TextIO | None = stream
        self.started = started
        self.live = stream.isatty() and os.environ.get("TERM") != "dumb"
        self.table: list[str] = []
        self.drawn = 0
        self.printed_at = -math.inf

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        """Print one event line stamped with the time since the demo started."""
        self.plain(f"{clock(self.elapsed()):>5}  {text}")

    def detail(self, text: str) -> None:
        """Print a line that continues the last event line, indented under its text."""
        self.plain(f"{'':7}{text}")

    def plain(self, text: str = "") -> None:
        self._write(self._erase() + text + "\n" + self._draw())

    def show_table(self, lines: list[str]) -> None:
        if self.live:
            erase = self._erase()
            self.table = lines
            self._write(erase + self._draw())
        elif time.monotonic() - self.printed_at >= PRINTED_TABLE_INTERVAL:
            self.printed_at = time.monotonic()
            self._write("\n".join(lines) + "\n\n")

    def close(self) -> None:
        """Remove the live table, so the summary follows the last event line."""
        self._write(self._erase())
        self.table = []

    def _erase(self) -> str:
        if not self.drawn:
            return ""
        # Move to the first line of the table and clear from there to the end of the screen.
        text = f"\x1b[{self.drawn}F\x1b[J"
        self.drawn = 0
        return text

    def _draw(self) -> str:
        if not self.live or not self.table:
            return ""
        width = shutil.get_terminal_size().columns - 1
        self.drawn = len(self.table)
        return "".join(line[:width] + "\n" for line in self.table)

    def _write(self, text: str) -> None:
        if self.stream is None or not text:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            # The reader went away, as with `| head`. The demo runs on without output, so
            # that its teardown still completes, and the interpreter's final flush of
            # stdout finds /dev/null instead of the closed pipe.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
            self.stream = None


# -- what the demo observes ---------------------------------------------------------------


@dataclass
class NodeRecord:
    """One fake node and when, in time.monotonic() seconds, it reached each stage."""

    name: str
    arch: str
    created: float
    warm: float | None = None
    pinned: float | None = None
    progress: JSON = field(default_factory=dict)
    pinner_phase: str = "-"


class Observer:
    """Polls the API once a second and records when each node became warm and pinned.

    Warm means the node's ``imgcache.io/prepull-progress`` annotation reports every
    image done and none pending. Pinned means a pinner pod runs on the node with
    every container ready, shown as "Ready" in the PINNER column.
    """

    def __init__(self, api: k8s_client.ApiClient, sim: SimulatedKubelet, images: list[str], screen: Screen) -> None:
        self.core = k8s_client.CoreV1Api(api)
        self.sim = sim
        self.expected = {parse_reference(image).name for image in images}
        self.total = len(images)
        self.screen = screen
        self.nodes: dict[str, NodeRecord] = {}
        self.all_added = False
        self.finished = anyio.Event()

    def add(self, name: str, arch: str, created: float) -> None:
        self.nodes[name] = NodeRecord(name, arch, created)

    def has_all_images(self, node: str) -> bool:
        return self.expected <= self.sim.images(node)

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except (ApiException, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("polling the API failed, retrying in 1 s: %s", exc)
            await anyio.sleep(1.0)

    async def refresh(self) -> None:
        now = time.monotonic()
        nodes = await self.core.list_node(label_selector=TESTBED_LABEL)
        for node in nodes.items:
            record = self.nodes.get(node.metadata.name)
            if record is None:
                continue
            raw = (node.metadata.annotations or {}).get(PROGRESS_ANNOTATION)
            record.progress = json.loads(raw) if raw else {}
            if record.warm is None and self._reports_warm(record.progress):
                record.warm = now
                self.screen.say(
                    f"{record.name} warm: {self.total}/{self.total} images prepulled "
                    f"{now - record.created:.0f} s after it joined"
                )
        pods = await self.core.list_namespaced_pod(NAMESPACE, label_selector=PINNER_SELECTOR)
        phases: dict[str, str] = {}
        for pod in pods.items:
            if pod.metadata.deletion_timestamp is not None:
                continue
            statuses = pod.status.container_statuses or []
            ready = len(statuses) == len(pod.spec.containers) and all(s.ready for s in statuses)
            phase = "Ready" if pod.status.phase == "Running" and ready else str(pod.status.phase)
            # During a pinner rollout a node has an old and a new pod, and either one counts once ready.
            if phases.get(pod.spec.node_name) != "Ready":
                phases[pod.spec.node_name] = phase
            record = self.nodes.get(pod.spec.node_name or "")
            if record is not None and record.pinned is None and phase == "Ready":
                record.pinned = now
                self.screen.say(
                    f"{record.name} pinned: pinner pod runs {len(pod.spec.containers)} sleeping containers "
                    f"({now - record.created:.0f} s after it joined)"
                )
        for record in self.nodes.values():
            record.pinner_phase = phases.get(record.name, "-")
        if self.all_added and all(self._complete(r) for r in self.nodes.values()):
            self.finished.set()

    def _reports_warm(self, progress: JSON) -> bool:
        return progress.get("done") == self.total and progress.get("pending") == 0

    def _complete(self, record: NodeRecord) -> bool:
        return record.warm is not None and record.pinned is not None and self.has_all_images(record.name)

    def missing(self) -> list[str]:
        """Describe each node that is not yet warm and pinned, or lacks an image in its store."""
        lines = []
        for record in self.nodes.values():
            gaps = []
            if record.warm is None:
                gaps.append(f"prepull progress {record.progress or 'not written'}")
            if record.pinned is None:
                gaps.append(f"pinner pod {record.pinner_phase}")
            if not self.has_all_images(record.name):
                gaps.append(f"{len(self.expected - self.sim.images(record.name))} images missing from its store")
            if gaps:
                lines.append(f"{record.name}: " + "; ".join(gaps))
        return lines


class StatusView:
    """Renders ``imgcache status`` data as the progress table and reports rate changes."""

    def __init__(self, kubeconfig: Path, observer: Observer, screen: Screen) -> None:
        self.kubeconfig = kubeconfig
        self.observer = observer
        self.screen = screen
        self.lowered: set[str] = set()
        self.report: JSON = {}

    async def run(self) -> None:
        while True:
            await self.refresh()
            await anyio.sleep(LIVE_TABLE_INTERVAL)

    async def refresh(self) -> None:
        try:
            self.report = await collect_status(str(self.kubeconfig), NAMESPACE, LEASE_NAME)
        except (ApiError, KubeConfigError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.warning("reading imgcache status failed, retrying in %.0f s: %s", LIVE_TABLE_INTERVAL, exc)
            self.screen.show_table([f"reading imgcache status failed, retrying: {exc}"])
            return
        self._announce_rate_changes()
        self.screen.show_table(self.table())

    def _announce_rate_changes(self) -> None:
        """Print when a registry's rate first drops below its maximum and when it is back there."""
        for row in self.report.get("registries", []):
            registry, current, maximum = row["registry"], float(row["rate"]), float(row["maxRate"])
            lowered = current < maximum - 1e-6
            if lowered and registry not in self.lowered:
                self.screen.say(
                    f"{registry} returned 429s, so imgcache lowered its rate to {current:.1f} of {maximum:.1f} pulls/s"
                )
            elif not lowered and registry in self.lowered:
                self.screen.say(f"{registry}: imgcache's rate is back at {maximum:.1f} pulls/s")
            if lowered:
                self.lowered.add(registry)
            else:
                self.lowered.discard(registry)

    def table(self) -> list[str]:
        lines = [f"-- {clock(self.screen.elapsed())}  imgcache status " + "-" * 40]
        lines.append(
            f"{'NODE':10} {'PLATFORM':12} {'DONE':>4} {'PENDING':>7} {'FAILED':>6} {'PULLING':>7}  WARM   PINNER"
        )
        for row in self.report.get("nodes", []):
            record = self.observer.nodes.get(row["node"])
            warm = f"{record.warm - record.created:.0f} s" if record and record.warm else "-"
            pinner = record.pinner_phase if record else "-"
            lines.append(
                f"{row['node'][:10]:10} {row['platform']:12} {row.get('done', '-'):>4} {row.get('pending', '-'):>7} "
                f"{row.get('failed', '-'):>6} {row.get('inflight', '-'):>7}  {warm:6} {pinner}"
            )
        for row in self.report.get("imagecaches", []):
            reason = f" ({row['reason']})" if row["reason"] else ""
            lines.append(f"ImageCache {row['imagecache']}: {row['images']} images, Ready={row['ready']}{reason}")
        lines.append(f"{'REGISTRY':24} {'RATE/S':>6} {'MAX/S':>6} {'THROTTLED(5m)':>14}")
        registries = self.report.get("registries", [])
        if not registries:
            lines.append("(no prepull pod started yet)")
        calm = []
        for row in registries:
            if row["throttled5m"] or row["rate"] < row["maxRate"]:
                lines.append(
                    f"{row['registry'][:24]:24} {format_rate(row['rate']):>6} {format_rate(row['maxRate']):>6} "
                    f"{row['throttled5m']:>14}"
                )
            else:
                calm.append(row)
        if calm:
            other = "other " if len(calm) < len(registries) else ""
            label = f"{len(calm)} {other}registries" if len(calm) > 1 else calm[0]["registry"][:24]
            lines.append(f"{label:24} {format_rate(calm[0]['rate']):>6} {format_rate(calm[0]['maxRate']):>6} {0:>14}")
        return lines


# -- checks and summary ---------------------------------------------------------------------


@dataclass
class Check:
    ok: bool
    text: str


def nodes_check(passed: list[str], names: list[str], text: str) -> Check:
    """Return a check that passes when every node in ``names`` is in ``passed``, naming the others."""
    failed = [name for name in names if name not in passed]
    suffix = f" (not on {', '.join(failed)})" if failed else ""
    return Check(not failed, f"{len(names) - len(failed)}/{len(names)} nodes: {text}{suffix}")


async def node_checks(core: k8s_client.CoreV1Api, names: list[str], images: list[str]) -> list[Check]:
    """Check each node's prepull annotations and the images that node.status.images lists."""
    total = len(images)
    expected = {parse_reference(image).name for image in images}
    listing = await core.list_node(label_selector=TESTBED_LABEL)
    by_name = {node.metadata.name: node for node in listing.items}
    progress_ok, prepulled_ok, status_ok = [], [], []
    for name in names:
        node = by_name.get(name)
        if node is None:
            continue
        annotations = node.metadata.annotations or {}
        progress = json.loads(annotations.get(PROGRESS_ANNOTATION) or "{}")
        if progress.get("done") == total and progress.get("pending") == 0 and progress.get("failed") == 0:
            progress_ok.append(name)
        if len([h for h in annotations.get(PREPULLED_ANNOTATION, "").split(",") if h]) == total:
            prepulled_ok.append(name)
        reported = {n for image in node.status.images or [] for n in image.names or []}
        if expected <= reported:
            status_ok.append(name)
    return [
        nodes_check(progress_ok, names, f"{PROGRESS_ANNOTATION} reports done={total} pending=0 failed=0"),
        nodes_check(prepulled_ok, names, f"{PREPULLED_ANNOTATION} lists {total} images"),
        nodes_check(status_ok, names, f"node.status.images lists all {total} images"),
    ]


async def pinner_checks(api: k8s_client.ApiClient, nodes: dict[str, NodeRecord], images: list[str]) -> list[Check]:
    """Check the pinner DaemonSet of each architecture and the pinner pod on each node."""
    expected = {str(parse_imgcache_reference(image)) for image in images}
    checks = []
    daemonsets = await k8s_client.AppsV1Api(api).list_namespaced_daemon_set(NAMESPACE, label_selector=PINNER_SELECTOR)
    by_name = {ds.metadata.name: ds for ds in daemonsets.items}
    for arch in sorted({record.arch for record in nodes.values()}):
        ds_name = f"imgcache-pinner-linux-{arch}"
        ds = by_name.get(ds_name)
        if ds is None:
            checks.append(Check(False, f"DaemonSet {ds_name} not found"))
            continue
        containers = {c.image for c in ds.spec.template.spec.containers}
        wanted = sum(1 for record in nodes.values() if record.arch == arch)
        ready = ds.status.number_ready or 0
        checks.append(
            Check(
                containers == expected and ready == wanted,
                f"DaemonSet {ds_name}: {len(containers)} image containers, {ready}/{wanted} pods ready",
            )
        )

    pods = await k8s_client.CoreV1Api(api).list_namespaced_pod(NAMESPACE, label_selector=PINNER_SELECTOR)
    pinned = []
    for pod in pods.items:
        statuses = pod.status.container_statuses or []
        covers = {c.image for c in pod.spec.containers} >= expected
        ready = bool(statuses) and all(s.ready for s in statuses)
        if pod.status.phase == "Running" and covers and ready and pod.metadata.deletion_timestamp is None:
            pinned.append(pod.spec.node_name)
    text = f"a Running pinner pod whose containers cover all {len(images)} images"
    checks.append(nodes_check(pinned, list(nodes), text))
    return checks


async def image_cache_check(api: k8s_client.ApiClient) -> Check:
    custom = k8s_client.CustomObjectsApi(api)
    cache = await custom.get_namespaced_custom_object(
        "imgcache.io", "v1alpha1", CACHE_NAMESPACE, "imagecaches", CACHE_NAME
    )
    conditions = {c.get("type"): c for c in (cache.get("status") or {}).get("conditions") or []}
    ready = conditions.get("Ready", {}).get("status", "Unknown")
    return Check(ready == "True", f"ImageCache {CACHE_NAMESPACE}/{CACHE_NAME}: Ready={ready}")


async def verify(api: k8s_client.ApiClient, observer: Observer, images: list[str]) -> list[Check]:
    """Check through the API and the simulator that every node stores every image, prepulled and pinned."""
    names = list(observer.nodes)
    checks = await node_checks(k8s_client.CoreV1Api(api), names, images)
    checks += await pinner_checks(api, observer.nodes, images)
    stored = [name for name in names if observer.has_all_images(name)]
    checks.append(nodes_check(stored, names, f"the simulated kubelet's image store contains all {len(images)} images"))
    checks.append(await image_cache_check(api))
    return checks


async def verify_until_passing(
    api: k8s_client.ApiClient, observer: Observer, images: list[str], timeout: float
) -> list[Check]:
    """Repeat ``verify`` until every check passes or ``timeout`` seconds pass, and return the last result.

    node.status.images and the ImageCache status are written on intervals, so they
    may lag the pulls by a few seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        checks = await verify(api, observer, images)
        if all(check.ok for check in checks) or time.monotonic() >= deadline:
            return checks
        await anyio.sleep(1.0)


def node_rows(observer: Observer, sim: SimulatedKubelet, images: list[str], started: float) -> list[JSON]:
    """Return one summary row per node, built from the observer and the simulator's pull log."""
    expected = {parse_reference(image).name for image in images}
    sizes = {parse_reference(image).name: resolve_profile(sim.config, parse_reference(image)).size for image in images}
    rows = []
    for record in observer.nodes.values():
        first_success: dict[str, float] = {}
        pulls = {"prepull": 0, "pinner": 0}
        failed_pulls = {"prepull": 0, "pinner": 0}
        for pull in sim.pull_log:
            # A pull without finished_at is still running, for example a pinner pod's.
            if pull.node != record.name or pull.image not in expected or pull.finished_at is None:
                continue
            kind = "prepull" if "/imgcache-prepull-" in pull.pod else "pinner"
            if pull.error is not None:
                failed_pulls[kind] += 1
                continue
            first_success[pull.image] = min(first_success.get(pull.image, math.inf), pull.finished_at)
            pulls[kind] += 1
        present = max(first_success.values()) if len(first_success) == len(expected) else None
        rows.append(
            {
                "node": record.name,
                "platform": f"linux/{record.arch}",
                "joined_after_start": round(record.created - started, 1),
                "images_present_after": round(present - record.created, 1) if present else None,
                "reported_warm_after": round(record.warm - record.created, 1) if record.warm else None,
                "pinned_after": round(record.pinned - record.created, 1) if record.pinned else None,
                "prepull_pulls": pulls["prepull"],
                "pinner_pulls": pulls["pinner"],
                "prepull_failed_pulls": failed_pulls["prepull"],
                "pinner_failed_pulls": failed_pulls["pinner"],
                "throttled_requests": sim.node_requests[record.name].throttled,
                "failed_images": record.progress.get("failed"),
                "images_stored": len(expected & sim.images(record.name)),
                "bytes_stored": sum(sizes[name] for name in expected & sim.images(record.name)),
            }
        )
    return rows


def format_seconds(value: float | None) -> str:
    return f"{value:.0f} s" if value is not None else "never"


def summary_lines(summary: JSON) -> list[str]:
    total = summary["images"]
    lines = [
        "",
        f"Summary: {summary['nodes']} nodes, {total} images each, run time {clock(summary['run_seconds'])}",
        "",
        f"{'NODE':10} {'PLATFORM':12} {'JOINED':>6} {'IMAGES IN':>9} {'REPORTED':>8} {'PINNED':>6} "
        f"{'PULLS':>5} {'429s':>5} {'FAILED':>6} {'STORED':>8}",
    ]
    for row in summary["node_rows"]:
        lines.append(
            f"{row['node'][:10]:10} {row['platform']:12} {clock(row['joined_after_start']):>6} "
            f"{format_seconds(row['images_present_after']):>9} {format_seconds(row['reported_warm_after']):>8} "
            f"{format_seconds(row['pinned_after']):>6} {row['prepull_pulls'] + row['pinner_pulls']:>5} "
            f"{row['throttled_requests']:>5} {row['failed_images'] if row['failed_images'] is not None else '-':>6} "
            f"{format_size(row['bytes_stored']):>8}"
        )
    lines += [
        "  JOINED     when the node was created, after the demo started",
        "  IMAGES IN  seconds from joining until the last image was in the node's store",
        "  REPORTED   seconds until imgcache's progress annotation reported every image done",
        "  PINNED     seconds until the node's pinner pod ran with every container ready.",
        "             It trails REPORTED by up to about 10 s: a pin of a prepulled image waits",
        "             with pull policy Never, and the kubelet retries it every 10 s.",
        "  PULLS      successful image pulls on the node, by prepull and pinner pods together",
        "  429s       registry requests from the node rejected with 429 Too Many Requests",
        "  FAILED     images that imgcache reports failed on the node",
        "",
        f"{'REGISTRY':46} {'REQUESTS':>8} {'429s':>5} {'RATE/S':>6} {'MAX/S':>6}",
    ]
    for row in summary["registry_rows"]:
        lines.append(
            f"{row['registry'][:46]:46} {row['requests']:>8} {row['throttled']:>5} "
            f"{format_rate(row['rate']):>6} {format_rate(row['max_rate']):>6}"
        )
    pulls = summary["pulls"]
    lines += [
        "  RATE/S is imgcache's adaptive limit of prepull pod starts per second, at the end.",
        "  A 429 halves it, at most once per 2 s, and each successful pull raises it a little.",
        "",
        f"Pulls: {pulls['prepull']} by prepull pods and {pulls['pinner']} by pinner pods.",
        f"Failed pull attempts, retried later: {pulls['prepull_failed']} by prepull pods and "
        f"{pulls['pinner_failed']} by pinner pods.",
        f"Registry requests throttled: {pulls['throttled']}. Images failed: {pulls['failed_images']}.",
        "  A pinner pod pulls what its node still lacks, outside imgcache's per-registry rate.",
        "",
        "Checks through the API and the simulated kubelet:",
    ]
    lines += [f"  {'ok  ' if check['ok'] else 'FAIL'}  {check['text']}" for check in summary["checks"]]
    return lines


def build_summary(
    observer: Observer,
    sim: SimulatedKubelet,
    status: JSON,
    checks: list[Check],
    images: list[str],
    started: float,
) -> JSON:
    rows = node_rows(observer, sim, images, started)
    adaptive = {row["registry"]: row for row in status.get("registries", [])}
    registries = sorted({parse_reference(image).registry for image in images})
    registry_rows = []
    for registry in registries:
        counts = sim.registry_requests.get(registry)
        row = adaptive.get(registry, {})
        registry_rows.append(
            {
                "registry": registry,
                "requests": counts.total if counts else 0,
                "throttled": counts.throttled if counts else 0,
                "rate": row.get("rate"),
                "max_rate": row.get("maxRate"),
            }
        )
    return {
        "nodes": len(rows),
        "images": len(images),
        "run_seconds": round(time.monotonic() - started, 1),
        "node_rows": rows,
        "registry_rows": registry_rows,
        "pulls": {
            "prepull": sum(row["prepull_pulls"] for row in rows),
            "pinner": sum(row["pinner_pulls"] for row in rows),
            "prepull_failed": sum(row["prepull_failed_pulls"] for row in rows),
            "pinner_failed": sum(row["pinner_failed_pulls"] for row in rows),
            "throttled": sum(row["throttled"] for row in registry_rows),
            "failed_images": sum(row["failed_images"] or 0 for row in rows),
        },
        "checks": [{"ok": check.ok, "text": check.text} for check in checks],
        "passed": all(check.ok for check in checks),
    }


# -- processes the demo starts ---------------------------------------------------------------


class DetachedController(ControllerProcess):
    """An ``imgcache run`` process in its own session.

    Ctrl-C in the terminal then reaches only the demo, which stops the controller with
    SIGTERM in order, and ``--keep`` can leave it running after the demo exits.
    """

    def start(self) -> DetachedController:
        # The same environment as ControllerProcess.start: no IMGCACHE_, AWS_ or
        # KUBERNETES_ variable of the caller reaches the controller.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGCACHE_", "AWS_", "KUBERNETES_"))}
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )
        return self


def kubelet_process_argv(config: KubeletConfig, kubeconfig: Path) -> list[str]:
    """Return the ``python -m testbed.kubelet`` command line with the demo's settings.

    NOTE: that command line has no flag for layer counts, so the kept simulator sends
    one registry request per pull instead of LAYERS_PER_IMAGE + 1.
    """
    argv = [
        sys.executable,
        "-m",
        "testbed.kubelet",
        f"--kubeconfig={kubeconfig}",
        f"--bandwidth={config.node_bandwidth:g}",
        f"--time-scale={config.time_scale:g}",
        f"--node-status-interval={config.node_status_interval:g}",
    ]
    argv += [f"--image-size={image}={profile.size}" for image, profile in config.images.items()]
    for host, registry in config.registries.items():
        if registry.qps is not None:
            argv.append(f"--registry-qps={host}={registry.qps:g}/{registry.burst}")
    return argv


def pid_path(directory: Path, name: str) -> Path:
    return directory / "run" / f"demo-{name}.pid"


def demo_process(directory: Path, name: str) -> int | None:
    """Return the pid of the demo's ``controller`` or ``kubelet`` process of this folder, if it runs.

    The command line must name the folder, so a reused pid is never taken for it.
    """
    try:
        pid = int(pid_path(directory, name).read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None
    marker = "imgcache run" if name == "controller" else "testbed.kubelet"
    if marker not in command or str(directory) not in command or state == "Z":
        return None
    return pid


def stop_process(pid: int, timeout: float = 25.0) -> None:
    """Send SIGTERM to ``pid``, then SIGKILL after ``timeout`` seconds, and return once it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def stop_everything(directory: Path) -> list[str]:
    """Stop the demo's controller, kubelet process and control plane in ``directory``, and list what ran."""
    stopped = []
    for name in ("controller", "kubelet"):
        pid = demo_process(directory, name)
        if pid is not None:
            stop_process(pid)
            stopped.append(f"{name} (pid {pid})")
        pid_path(directory, name).unlink(missing_ok=True)
    plane = ControlPlane(directory)
    if plane.running():
        stopped.append("control plane (" + ", ".join(plane.running()) + ")")
        plane.down()
    return stopped


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM, so a second Ctrl-C cannot cut the teardown short."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- the demo ------------------------------------------------------------------------------------


class DemoFailedError(Exception):
    """A step of the demo failed. The message names the step and what to do."""


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.directory: Path = args.dir
        self.images = addon_images()
        self.started = time.monotonic()
        self.screen = Screen(sys.stdout, self.started)
        self.plane = ControlPlane(self.directory)
        self.controller: DetachedController | None = None
        self.kept_kubelet: subprocess.Popen[bytes] | None = None
        self.config = kubelet_config(args.speed)
        self.summary: JSON | None = None
        self.completed = False
        # Set once the folder is known to be the demo's. Only then does finish() stop anything.
        self.owns_directory = False

    @property
    def log_path(self) -> Path:
        return self.directory / "imgcache.log"

    # -- setup, in the main thread, so Ctrl-C interrupts it with KeyboardInterrupt

    def introduce(self) -> None:
        batches = node_batches(self.args.nodes)
        architectures = [arch for batch in batches for arch in batch]
        counts = " and ".join(f"{architectures.count(a)} {a}" for a in ("amd64", "arm64") if a in architectures)
        plan = f"{len(batches[0])} at once"
        if len(batches) > 1:
            plan += f", {len(batches[1])} more {self.second_batch_delay():.0f} s later"
        sizes = [resolve_profile(self.config, parse_reference(image)).size for image in self.images]
        lines = [
            "imgcache demo: prepull and pin EKS add-on images on new nodes",
            f"  images:    {len(self.images)} from {shown_path(DATA)}, "
            f"{min(sizes) / MB:.1f} MB to {max(sizes) / MB:.0f} MB each",
            f"  nodes:     {self.args.nodes} fake node{'s' if self.args.nodes > 1 else ''} ({counts}): {plan}",
            f"  kubelet:   simulated, {NODE_BANDWIDTH / MB:.0f} MB/s per node, "
            f"{LAYERS_PER_IMAGE + 1} registry requests per pull",
            f"  registry:  {THROTTLED_REGISTRY} allows {THROTTLED_QPS:g} requests/s (burst {THROTTLED_BURST}) "
            "and returns 429 above that",
        ]
        if self.args.speed != 1:
            lines.append(f"  speed:     pulls, quotas and back-off run {self.args.speed:g}x faster than real time")
        lines += ["  Everything runs on 127.0.0.1, and no image is downloaded.", ""]
        for line in lines:
            self.screen.plain(line)

    def second_batch_delay(self) -> float:
        return max(3.0, SECOND_BATCH_DELAY / self.args.speed)

    def prepare_directory(self) -> None:
        """Stop what an earlier demo left running in the folder, then empty the folder.

        Raise DemoFailedError for a folder with other content, such as another test-bed
        cluster, so that the demo never stops or deletes what it did not make.
        """
        if self.directory.exists() and any(self.directory.iterdir()):
            if not (self.directory / DEMO_MARKER).exists():
                raise DemoFailedError(
                    f"{self.directory} is not empty and was not made by the demo; pass a new or empty folder with --dir"
                )
            stopped = stop_everything(self.directory)
            if stopped:
                self.screen.say(
                    f"stopped what an earlier demo left running in {shown_path(self.directory)}: " + ", ".join(stopped)
                )
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.owns_directory = True
        (self.directory / DEMO_MARKER).write_text(
            "This folder belongs to `python -m testbed.demo`, which stops and deletes it on its next run.\n"
        )

    def start_cluster(self) -> None:
        self.screen.say(f"starting a local control plane in {shown_path(self.directory)} ...")
        began = time.monotonic()
        with warnings.catch_warnings():
            # ControlPlane keeps only the pid of each component, so Python would warn
            # that a released Popen object still runs. The pid files track them.
            warnings.filterwarnings("ignore", "subprocess .* is still running", ResourceWarning)
            info = self.plane.up()
        self.screen.say(f"control plane ready at {info.server} ({time.monotonic() - began:.0f} s)")
        install_manifests(self.plane)
        self.screen.say(f"installed imgcache's manifests: CRD, RBAC, namespace {NAMESPACE}")

    def start_controller(self) -> None:
        kubeconfig = service_account_kubeconfig(self.plane, self.directory / "imgcache.kubeconfig")
        self.controller = DetachedController(
            kubeconfig, self.log_path, controller_args(self.args.speed), identity="imgcache-demo"
        ).start()
        assert self.controller.process is not None
        pid_path(self.directory, "controller").write_text(str(self.controller.process.pid))
        self.controller.wait_ready(timeout=60)
        self.screen.say(f"imgcache controller ready, running as ServiceAccount {NAMESPACE}/imgcache")
        self.screen.detail(f"its JSON log: {shown_path(self.log_path)}")

    # -- the main part, in the event loop

    async def run(self) -> bool:
        configuration = k8s_client.Configuration()
        await k8s_config.load_kube_config(config_file=str(self.plane.kubeconfig), client_configuration=configuration)
        configuration.connection_pool_maxsize = 64
        async with k8s_client.ApiClient(configuration) as api:
            sim = SimulatedKubelet(api, self.config)
            async with sim.running():
                self.screen.say("simulated kubelet running")
                self.screen.detail(f"its log: {shown_path(self.directory / 'kubelet.log')}")
                passed = await self.warm_up(api, sim)
            if self.args.keep:
                self.start_kept_kubelet()
        return passed

    async def warm_up(self, api: k8s_client.ApiClient, sim: SimulatedKubelet) -> bool:
        manifest_path = self.directory / f"{CACHE_NAME}.yaml"
        manifest_path.write_text(yaml.safe_dump(image_cache_manifest(self.images), sort_keys=False))
        await anyio.to_thread.run_sync(lambda: kubectl(self.plane, "apply", "-f", str(manifest_path)))
        self.screen.say(
            f"applied ImageCache {CACHE_NAMESPACE}/{CACHE_NAME}: {len(self.images)} images, pinned and prepulled"
        )
        self.screen.detail(f"its manifest: {shown_path(manifest_path)}")

        observer = Observer(api, sim, self.images, self.screen)
        status = StatusView(self.plane.kubeconfig, observer, self.screen)
        timeout = COMPLETION_TIMEOUT / self.args.speed + 120.0
        async with anyio.create_task_group() as group:
            group.start_soon(observer.run)
            group.start_soon(status.run)
            with anyio.move_on_after(timeout) as waiting:
                await self.add_nodes(api, observer)
                await observer.finished.wait()
            group.cancel_scope.cancel()
        await status.refresh()
        self.screen.close()
        if waiting.cancelled_caught:
            self.screen.say(f"timed out after {timeout:.0f} s waiting for every node to be warm and pinned:")
            for line in observer.missing():
                self.screen.detail(line)
        else:
            self.completed = True
            self.screen.say("every node is warm and pinned, now checking through the API ...")

        checks = await verify_until_passing(api, observer, self.images, timeout=15.0 if self.completed else 0.0)
        self.summary = build_summary(observer, sim, status.report, checks, self.images, self.started)
        for line in summary_lines(self.summary):
            self.screen.plain(line)
        if self.args.summary_json:
            self.args.summary_json.write_text(json.dumps(self.summary, indent=2))
        return bool(self.summary["passed"]) and self.completed

    async def add_nodes(self, api: k8s_client.ApiClient, observer: Observer) -> None:
        factory = NodeFactory(api, prefix="demo")
        for index, batch in enumerate(node_batches(self.args.nodes)):
            if index:
                await anyio.sleep(self.second_batch_delay())
            names = []
            for arch in batch:
                created = time.monotonic()
                labels = {"node.kubernetes.io/instance-type": INSTANCE_TYPES[arch], "karpenter.sh/nodepool": "default"}
                (name,) = await factory.create(1, arch=arch, labels=labels, ready=False)
                observer.add(name, arch, created)
                names.append(name)
            await wait_nodes_ready(api, names)
            joined = ", ".join(f"{name} ({arch})" for name, arch in zip(names, batch, strict=True))
            self.screen.say(f"{len(names)} node{'s' if len(names) > 1 else ''} joined: {joined}")
        observer.all_added = True

    def start_kept_kubelet(self) -> None:
        """Start the simulated kubelet as its own process, so the kept cluster keeps working."""
        log_path = self.directory / "kubelet-process.log"
        with log_path.open("ab") as log:
            self.kept_kubelet = subprocess.Popen(
                kubelet_process_argv(self.config, self.plane.kubeconfig),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=TESTS_DIR,
                start_new_session=True,
            )
        pid_path(self.directory, "kubelet").write_text(str(self.kept_kubelet.pid))

    # -- the end

    def finish(self, interrupted: bool) -> None:
        """Stop everything, unless --keep asked to leave it running and no Ctrl-C came."""
        self.screen.close()
        if not self.owns_directory:
            return
        if self.args.keep and not interrupted and self.plane.running():
            self.print_keep_instructions()
            return
        began = time.monotonic()
        self.screen.say("stopping everything the demo started ...")
        if self.controller is not None:
            code = self.controller.stop()
            pid_path(self.directory, "controller").unlink(missing_ok=True)
            if code != 0:
                self.screen.say(f"the controller exited with code {code}, see {shown_path(self.log_path)}")
        stop_everything(self.directory)
        if self.kept_kubelet is not None:
            self.kept_kubelet.wait()
        # etcd's data is the bulk of the folder and is useless without the cluster.
        shutil.rmtree(self.directory / "etcd-data", ignore_errors=True)
        self.screen.say(f"stopped in {time.monotonic() - began:.0f} s, and nothing the demo started runs")
        logs = [name for name in ("imgcache.log", "kubelet.log", "logs") if (self.directory / name).exists()]
        if logs:
            self.screen.detail(f"logs kept in {shown_path(self.directory)}/: {', '.join(logs)}")

    def print_keep_instructions(self) -> None:
        kubeconfig = shown_path(self.plane.kubeconfig)
        kubectl_command = f"{shown_path(self.plane.bin_dir / 'kubectl')} --kubeconfig {kubeconfig}"
        stop = "cd tests && python3 -m uv run python -m testbed.demo --stop"
        if self.directory != DEFAULT_DIR:
            stop += f" --dir {self.directory}"
        lines = [
            "",
            "Still running (--keep):",
            f"  control plane      {shown_path(self.directory)}, kubeconfig {kubeconfig}",
        ]
        controller_pid = demo_process(self.directory, "controller")
        if controller_pid is not None:
            lines.append(f"  imgcache           pid {controller_pid}, log {shown_path(self.log_path)}")
        kubelet_pid = demo_process(self.directory, "kubelet")
        if kubelet_pid is not None:
            log_path = shown_path(self.directory / "kubelet-process.log")
            lines.append(f"  simulated kubelet  pid {kubelet_pid}, log {log_path}")
        lines += [
            "From the repository root, try:",
            f"  {kubectl_command} get imagecaches -A",
            f"  {kubectl_command} -n {NAMESPACE} get ds,pods",
            f"  python3 -m uv run imgcache status --kubeconfig {kubeconfig}",
            f"  {kubectl_command} -n {CACHE_NAMESPACE} edit imagecache {CACHE_NAME}",
            "Stop it all with:",
            f"  {stop}",
            "(make cluster-down stops only .cluster/local, not this cluster.)",
        ]
        for line in lines:
            self.screen.plain(line)


def stop_command(directory: Path) -> int:
    if not (directory / DEMO_MARKER).exists():
        print(f"error: {directory} was not made by the demo, so --stop leaves it alone", file=sys.stderr)
        return 2
    stopped = stop_everything(directory)
    if stopped:
        print(f"stopped in {shown_path(directory)}: " + ", ".join(stopped))
    else:
        print(f"nothing of the demo runs in {shown_path(directory)}")
    return 0


def _sigterm_as_sigint(signum: int, frame: Any) -> None:
    """Handle SIGTERM like Ctrl-C, so that it also tears everything down.

    While the event loop runs, the SIGINT handler is asyncio's, which cancels the
    demo's main task. Before and after the loop, it raises KeyboardInterrupt. A
    process that started with SIGINT ignored gets KeyboardInterrupt here directly.
    """
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stop:
        return stop_command(args.dir)
    signal.signal(signal.SIGTERM, _sigterm_as_sigint)
    demo = Demo(args)
    passed = False
    interrupted = False
    try:
        demo.introduce()
        demo.prepare_directory()
        logging.basicConfig(
            filename=args.dir / "kubelet.log", level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
        )
        demo.start_cluster()
        demo.start_controller()
        passed = anyio.run(demo.run)
    except KeyboardInterrupt:
        interrupted = True
        demo.screen.close()
        demo.screen.plain()
        demo.screen.say("interrupted")
    except (DemoFailedError, RuntimeError, TimeoutError, ApiException) as exc:
        demo.screen.close()
        demo.screen.say(f"demo failed: {exc}")
    finally:
        with signals_ignored():
            demo.finish(interrupted)
    if passed:
        demo.screen.plain("\nDemo passed: every image is prepulled and pinned on every node.")
    elif interrupted:
        demo.screen.plain("\nDemo interrupted.")
    else:
        demo.screen.plain("\nDemo FAILED: see the lines above and the logs.")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
