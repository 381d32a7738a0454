"""Wires the controller together and supervises its tasks.

Every long-running part is a named task in one anyio task group. When any of them ends,
for whatever reason, the process logs which one and why and exits non-zero, so that
Kubernetes restarts it from the cluster's state. SIGTERM cancels the group and the
process exits 0 within the shutdown timeout.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog

from imgcache.catalogue import Catalogue
from imgcache.config import Settings
from imgcache.kube import DAEMONSETS, EVENTS, IMAGECACHES, NODES, PODS, ApiError, Kube
from imgcache.leader import ElectionSettings, LeaderElector
from imgcache.metrics import Metrics
from imgcache.model import (
    COMPONENT,
    JSON,
    MANAGED_BY,
    MANAGER,
    REGISTRIES_ANNOTATION,
    Node,
    Pod,
    node_from_json,
    pod_from_json,
    slim_node,
)
from imgcache.pinner import PINNER_COMPONENT, PinnerOptions
from imgcache.pinning import PinnerReconciler
from imgcache.prepull import PrepullWorker
from imgcache.pull_events import PullEventObserver
from imgcache.pullthrough import PullThroughRefresher
from imgcache.rewrite import Rewriter
from imgcache.scheduler import PREPULL_COMPONENT, Limits, Scheduler
from imgcache.serving import build_app, serve
from imgcache.status import StatusWriter
from imgcache.watching import Reflector, WatchSettings

log = structlog.get_logger(__name__)


class TaskExited(Exception):
    """A supervised task ended although it should run until shutdown."""


class ShutdownRequested(Exception):
    """SIGTERM or SIGINT arrived."""


class StartupError(Exception):
    """The controller cannot start; the message names what to fix."""


@dataclass
class NodeStore:
    """Watch Handler for nodes: typed copies for the pinner, events for the scheduler.

    ``on_platforms`` is called only when the set of node platforms changes, because that
    is all the pinner needs to know. A routine node update costs no pass over all nodes.
    ``on_membership`` is called when a node joins or leaves.
    """

    worker: PrepullWorker
    on_platforms: Callable[[], None]
    on_membership: Callable[[], None]
    nodes: dict[str, Node] = field(default_factory=dict)
    platforms: Counter[str] = field(default_factory=Counter)

    def replace(self, objects: list[JSON]) -> None:
        fresh = {}
        for obj in objects:
            node = node_from_json(obj)
            fresh[node.name] = node
            self.worker.node_upserted(node, str(obj["metadata"].get("resourceVersion", "")))
        for name in set(self.nodes) - set(fresh):
            self.worker.node_removed(name)
        self.nodes = fresh
        self.platforms = Counter(node.platform for node in fresh.values())
        self.on_platforms()
        self.on_membership()

    def upsert(self, obj: JSON) -> None:
        node = node_from_json(obj)
        old = self.nodes.get(node.name)
        self.nodes[node.name] = node
        self.worker.node_upserted(node, str(obj["metadata"].get("resourceVersion", "")))
        if old is None:
            self.on_membership()
        if old is None or old.platform != node.platform:
            self._count(node.platform, +1)
            if old is not None:
                self._count(old.platform, -1)

    def remove(self, obj: JSON) -> None:
        name = str(obj["metadata"]["name"])
        old = self.nodes.pop(name, None)
        self.worker.node_removed(name)
        if old is not None:
            self.on_membership()
            self._count(old.platform, -1)

    def _count(self, platform: str, delta: int) -> None:
        before = self.platforms[platform] > 0
        self.platforms[platform] += delta
        if self.platforms[platform] <= 0:
            del self.platforms[platform]
        if before != (platform in self.platforms):
            self.on_platforms()


@dataclass
class PodStore:
    """Watch Handler for imgcache's prepull pods."""

    worker: PrepullWorker
    pods: dict[str, Pod] = field(default_factory=dict)

    def replace(self, objects: list[JSON]) -> None:
        fresh = {pod.name: pod for pod in (pod_from_json(obj) for obj in objects)}
        for pod in fresh.values():
            self.worker.pod_upserted(pod)
        for name in set(self.pods) - set(fresh):
            # Deleted while the watch was down: report it with its last known state.
            self.worker.pod_removed(self.pods[name])
        self.pods = fresh

    def upsert(self, obj: JSON) -> None:
        pod = pod_from_json(obj)
        self.pods[pod.name] = pod
        self.worker.pod_upserted(pod)

    def remove(self, obj: JSON) -> None:
        pod = pod_from_json(obj)
        self.pods.pop(pod.name, None)
        self.worker.pod_removed(pod)


@dataclass
class CatalogueHandler:
    catalogue: Catalogue
    status: StatusWriter

    def replace(self, objects: list[JSON]) -> None:
        for obj in objects:
            self.status.seed(obj)
        self.catalogue.replace(objects)

    def upsert(self, obj: JSON) -> None:
        self.catalogue.upsert(obj)

    def remove(self, obj: JSON) -> None:
        self.catalogue.remove(obj)


async def resolve_helper_image(kube: Kube, settings: Settings) -> str:
    if settings.helper_image:
        return settings.helper_image
    if not settings.pod_name:
        raise StartupError(
            "--helper-image is required when imgcache runs outside a pod: set it to the imgcache "
            "image that contains /usr/local/lib/imgcache/busybox (or set POD_NAME in the pod)"
        )
    try:
        pod = await kube.get(PODS, settings.pod_name, settings.namespace)
    except ApiError as error:
        raise StartupError(
            f"cannot read this pod {settings.namespace}/{settings.pod_name} to find the helper image "
            f"({error.status} {error.message}); set --helper-image"
        ) from error
    containers = (pod.get("spec") or {}).get("containers") or []
    for container in containers:
        if container.get("name") == "imgcache":
            return str(container["image"])
    if containers:
        return str(containers[0]["image"])
    raise StartupError("this pod has no containers to take the helper image from; set --helper-image")


class Controller:
    """All parts of one imgcache process; ``run`` blocks until shutdown."""

    def __init__(self, settings: Settings, kube: Kube, metrics: Metrics, helper_image: str) -> None:
        self.settings = settings
        self.kube = kube
        self.metrics = metrics
        self.started = time.time()
        rules = settings.pull_through_rules if settings.pull_through_cache else ()
        self.catalogue = Catalogue(Rewriter(rules))
        limits = Limits(
            max_inflight=settings.max_inflight,
            max_inflight_per_node=settings.max_inflight_per_node,
            registry_qps=settings.registry_qps,
            registry_burst=settings.registry_burst,
            registry_min_qps=settings.registry_min_qps,
            node_pull_qps=settings.node_pull_qps,
            node_pull_burst=settings.node_pull_burst,
            prepull_deadline=settings.prepull_deadline,
            pod_deadline=float(settings.pod_deadline),
            retry_initial=settings.retry_initial,
            retry_max=settings.retry_max,
            startup_taint=settings.startup_taint,
            startup_taint_deadline=settings.startup_taint_deadline,
        )
        self.scheduler = Scheduler(self.catalogue, limits, clock=time.time)
        self.status = StatusWriter(kube, self.catalogue, self.scheduler, settings.status_interval, settings.identity)
        self.worker = PrepullWorker(
            kube,
            self.scheduler,
            self.catalogue,
            metrics,
            settings.namespace,
            helper_image,
            settings.host_network,
            settings.pod_deadline,
            settings.progress_interval,
            on_node_finished=self.status.poke,
        )
        options = PinnerOptions(
            settings.namespace, helper_image, settings.priority_class, settings.host_network, prepull=settings.prepull
        )
        self.nodes = NodeStore(self.worker, self.pinner_platforms_changed, self.status.poke)
        self.pinner = PinnerReconciler(
            kube, self.catalogue, lambda: list(self.nodes.nodes.values()), options, metrics, settings.pin_debounce
        )
        self.pull_through = PullThroughRefresher(settings, self.catalogue, self.scheduler, metrics)
        self.catalogue.subscribe(self._catalogue_changed)
        watch = WatchSettings(server_timeout=settings.watch_timeout, read_timeout=settings.watch_read_timeout)
        ns = settings.namespace
        managed = f"{MANAGED_BY}={MANAGER}"

        def reflector(**kwargs: Any) -> Reflector:
            return Reflector(
                kube, settings=watch, on_restart=metrics.count_watch_restart, on_synced=self._reflector_synced, **kwargs
            )

        self.reflectors: dict[str, Reflector] = {
            "watch.imagecaches": reflector(resource=IMAGECACHES, handler=CatalogueHandler(self.catalogue, self.status)),
            "watch.nodes": reflector(resource=NODES, handler=self.nodes, slim=slim_node),
            "watch.pods": reflector(
                resource=PODS,
                handler=PodStore(self.worker),
                namespace=ns,
                label_selector=f"{managed},{COMPONENT}={PREPULL_COMPONENT}",
            ),
            "watch.daemonsets": reflector(
                resource=DAEMONSETS,
                handler=self.pinner,
                namespace=ns,
                label_selector=f"{managed},{COMPONENT}={PINNER_COMPONENT}",
            ),
            "watch.events": reflector(
                resource=EVENTS,
                namespace=None if settings.watch_cluster_events else ns,
                handler=PullEventObserver(metrics, ns, self.started),
            ),
        }
        self.elector = LeaderElector(
            kube,
            ElectionSettings(
                ns,
                settings.lease_name,
                settings.identity,
                settings.lease_duration,
                settings.renew_deadline,
                settings.retry_period,
            ),
            on_change=lambda leading: metrics.leader.set(1 if leading else 0),
            annotations=self._lease_annotations,
        )
        self.synced = anyio.Event()
        self.catalogue_synced = anyio.Event()

    def _lease_annotations(self) -> dict[str, str]:
        return {REGISTRIES_ANNOTATION: json.dumps(self.scheduler.registry_summary(), sort_keys=True)}

    def pinner_platforms_changed(self) -> None:
        self.pinner.request()

    def _reflector_synced(self) -> None:
        if self.reflectors["watch.imagecaches"].synced:
            self.catalogue_synced.set()
        if self.ready():
            self.synced.set()

    def ready(self) -> bool:
        return all(r.synced for r in self.reflectors.values())

    def _catalogue_changed(self) -> None:
        images = list(self.catalogue.images.values())
        self.metrics.catalogue_images.labels(use="pin").set(sum(1 for i in images if any(s.pin for s in i.scopes)))
        self.metrics.catalogue_images.labels(use="prepull").set(
            sum(1 for i in images if any(s.prepull for s in i.scopes))
        )
        self.metrics.catalogue_invalid.set(
            sum(1 for r in self.catalogue.reports.values() for e in r.entries if e.error)
        )
        self.worker.wake()
        self.pinner.request()

    async def lead(self) -> None:
        """Write to the cluster: runs only on the leader, after every cache is synced."""
        await self.synced.wait()
        log.info("controller.leading", nodes=len(self.nodes.nodes), images=len(self.catalogue.images))
        async with anyio.create_task_group() as group:
            if self.settings.prepull:
                supervise(group, "prepull", self.worker.run)
            if self.settings.pinner:
                self.pinner.request()
                supervise(group, "pinner", self.pinner.run)
            supervise(group, "status", self.status.run)

    async def _watch_pods(self) -> None:
        # A finished pod marks its node complete when no applicable image is left, and
        # before the ImageCache list arrives no image is applicable. Pods are therefore
        # listed only after the catalogue is, or a restarted controller would take nodes
        # with images still missing for complete and remove their startup taint.
        await self.catalogue_synced.wait()
        await self.reflectors["watch.pods"].run()

    async def run(self) -> None:
        app = build_app(self.metrics.registry, self.ready, lambda: True, self.pull_through.request_refresh)
        async with anyio.create_task_group() as group:
            supervise(group, "http", lambda: serve(app, self.settings.http_address, self.settings.http_port))
            for name, reflector in self.reflectors.items():
                supervise(group, name, self._watch_pods if name == "watch.pods" else reflector.run)
            supervise(group, "pullthrough", self.pull_through.run)
            if self.settings.leader_election:
                supervise(group, "leader", lambda: self.elector.run(self.lead))
            else:
                self.metrics.leader.set(1)
                supervise(group, "leader", self.lead)
            supervise(group, "signals", lambda: _wait_for_signal(group.cancel_scope, self.settings.shutdown_timeout))


def supervise(group: anyio.abc.TaskGroup, name: str, target: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``target`` as a named task; its end, by return or error, stops the process."""

    async def runner() -> None:
        try:
            await target()
        except (anyio.get_cancelled_exc_class(), ShutdownRequested):
            raise
        except Exception as error:
            log.error("task.failed", task=name, error=str(error), error_type=type(error).__name__, exc_info=True)
            raise TaskExited(f"task {name} failed: {error}") from error
        log.error("task.exited", task=name)
        raise TaskExited(f"task {name} returned unexpectedly")

    group.start_soon(runner, name=name)


async def _wait_for_signal(scope: anyio.CancelScope, timeout: float) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for received in signals:
            log.info("controller.stopping", signal=signal.Signals(received).name, timeout_seconds=timeout)
            raise ShutdownRequested(signal.Signals(received).name)


async def main(settings: Settings) -> int:
    """Run the controller; return the process exit code."""
    metrics = Metrics()
    kube = await Kube.connect(settings.kubeconfig, on_error=metrics.count_api_error)
    try:
        try:
            await kube.version()
        except ApiError as error:
            log.error(
                "controller.start_failed",
                server=kube.server,
                kubeconfig=settings.kubeconfig,
                error=_access_problem(error),
            )
            return 2
        try:
            helper_image = await resolve_helper_image(kube, settings)
        except StartupError as error:
            log.error("controller.start_failed", error=str(error))
            return 2
        controller = Controller(settings, kube, metrics, helper_image)
        log.info(
            "controller.starting",
            identity=settings.identity,
            namespace=settings.namespace,
            server=kube.server,
            helper_image=helper_image,
        )
        try:
            await controller.run()
        except BaseExceptionGroup as group:
            return _exit_code(group)
        return 1
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(settings.shutdown_timeout):
            await kube.close()


def _access_problem(error: ApiError) -> str:
    """Describe why the first request to the API server failed, and what to fix."""
    if error.status == 0:
        return (
            f"cannot reach the API server ({error.reason}: {error.message}); check the server address "
            "in the kubeconfig and that the API server is running"
        )
    if error.status == 401:
        return (
            "the API server rejected the credentials (401 Unauthorized): the token or client certificate "
            "is invalid or expired, so create a new one"
        )
    return f"the API server failed the first request with {error.status} {error.reason}: {error.message}"


def _exit_code(group: BaseExceptionGroup) -> int:
    """Return 0 for a requested shutdown and 1 when a task ended; re-raise anything else."""
    shutdown, rest = group.split(ShutdownRequested)
    if rest is None and shutdown is not None:
        log.info("controller.stopped")
        return 0
    exited, _ = group.split(TaskExited)
    if exited is not None:
        log.error("controller.exiting", reason=str(exited.exceptions[0]))
        return 1
    raise group
