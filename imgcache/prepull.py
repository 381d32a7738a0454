"""The prepull worker: carries out the scheduler's decisions against the API.

It creates one pod per (node, image), deletes pods that finished or failed, and writes
each node's progress annotations. Successful pods are deleted in batches together with
the annotation write that records them, so a crash between the two repeats nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import anyio
import structlog

from imgcache.catalogue import Catalogue
from imgcache.classify import FailureClass, hint
from imgcache.kube import NODES, PODS, ApiError, Kube
from imgcache.metrics import Metrics
from imgcache.model import (
    DONE_ANNOTATION,
    FAILED_ANNOTATION,
    IMAGE_ANNOTATION,
    IMAGE_HASH_LABEL,
    JSON,
    NODE_LABEL,
    NODE_NAME_ANNOTATION,
    PROGRESS_ANNOTATION,
    Node,
    Pod,
)
from imgcache.podspec import (
    HELPER,
    helper_init_container,
    helper_volume,
    image_container,
    labels,
    pod_security,
    tolerate_everything,
)
from imgcache.reference import InvalidReference, parse
from imgcache.scheduler import (
    PREPULL_COMPONENT,
    PREPULL_CONTAINER,
    DeletePod,
    Failure,
    Launch,
    NodeState,
    Scheduler,
)

log = structlog.get_logger(__name__)

# API requests the worker keeps in flight at once.
_API_CONCURRENCY = 16
# Seconds between two searches for pods past their deadline. Each search walks every
# prepull pod, and during a burst of creates every pod event wakes the run loop, so a
# search on each wake-up costs CPU time that grows with the square of the pod count.
_EXPIRY_CHECK_INTERVAL = 1.0


def prepull_pod(launch: Launch, namespace: str, helper_image: str, host_network: bool, deadline: int) -> JSON:
    node = launch.node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": launch.pod_name,
            "namespace": namespace,
            "labels": labels(PREPULL_COMPONENT, **{NODE_LABEL: launch.key, IMAGE_HASH_LABEL: launch.image.hash}),
            "annotations": {IMAGE_ANNOTATION: str(launch.image.resolved), NODE_NAME_ANNOTATION: node.name},
            # The node owns its prepull pods, so garbage collection removes them with it.
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node.name, "uid": node.uid}],
        },
        "spec": {
            "nodeName": node.name,
            "restartPolicy": "Never",
            "hostNetwork": host_network,
            "activeDeadlineSeconds": deadline,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 0,
            "tolerations": tolerate_everything(),
            "securityContext": pod_security(),
            "initContainers": [helper_init_container(helper_image)],
            "containers": [image_container(PREPULL_CONTAINER, str(launch.image.resolved), [HELPER, "true"])],
            "volumes": [helper_volume()],
        },
    }


def _registry_of(image: str) -> str:
    try:
        return parse(image).registry
    except InvalidReference:
        return "unknown"


class FailureLog:
    """Logs each (node, image, class) failure once and counts the repeats."""

    def __init__(self) -> None:
        self.repeats: dict[tuple[str, str, str], int] = {}

    def report(self, failure: Failure) -> None:
        key = (failure.node, failure.image, failure.failure.value)
        if key in self.repeats:
            self.repeats[key] += 1
            return
        self.repeats[key] = 0
        log.warning(
            "pull.failed",
            node=failure.node,
            image=failure.image,
            registry=failure.registry,
            pod=failure.pod,
            failure_class=failure.failure.value,
            helper_image=failure.helper,
            permanent=failure.permanent,
            gave_up=failure.gave_up,
            message=failure.message,
            hint=hint(failure.failure, failure.registry),
        )

    def summarize(self) -> None:
        repeated = {key: count for key, count in self.repeats.items() if count}
        for (node, image, failure_class), count in sorted(repeated.items()):
            log.info("pull.failed_repeats", node=node, image=image, failure_class=failure_class, repeats=count)
            self.repeats[(node, image, failure_class)] = 0


class PrepullWorker:
    """Runs the scheduler: plans, creates pods, reacts to pod changes, flushes progress."""

    def __init__(
        self,
        kube: Kube,
        scheduler: Scheduler,
        catalogue: Catalogue,
        metrics: Metrics,
        namespace: str,
        helper_image: str,
        host_network: bool,
        pod_deadline: int,
        progress_interval: float,
        clock: Callable[[], float] = time.time,
        on_node_finished: Callable[[], None] | None = None,
    ) -> None:
        self.kube = kube
        self.scheduler = scheduler
        self.catalogue = catalogue
        self.metrics = metrics
        self.namespace = namespace
        self.helper_image = helper_image
        self.host_network = host_network
        self.pod_deadline = pod_deadline
        self.progress_interval = progress_interval
        self.clock = clock
        self.on_node_finished = on_node_finished
        self.failures = FailureLog()
        self.active = False
        self._wake = anyio.Event()
        self._limiter = anyio.CapacityLimiter(_API_CONCURRENCY)
        self._forbidden_logged: set[str] = set()
        self._group: anyio.abc.TaskGroup | None = None
        self._next_expiry_check = 0.0

    def wake(self) -> None:
        self._wake.set()

    # -- watch handlers ----------------------------------------------------

    def node_upserted(self, node: Node, resource_version: str) -> None:
        self._delete_all(self.scheduler.set_node(node, resource_version))
        for pod in self.scheduler.take_unbound(node.name):
            self.pod_upserted(pod)
        self.wake()

    def node_removed(self, name: str) -> None:
        state = self.scheduler.nodes.get(name)
        actions = self.scheduler.remove_node(name)
        if state is not None and self.active and self._group is not None:
            log.info("prepull.node_removed", node=name, cancelled=len(actions))
            self._group.start_soon(self._delete_node_pods, state.key)
        self.wake()

    def pod_upserted(self, pod: Pod) -> None:
        if pod.component != PREPULL_COMPONENT:
            return
        deletes, failures, finished = self.scheduler.pod_changed(pod)
        for failure in failures:
            if failure.helper:
                failure = replace(failure, image=self.helper_image, registry=_registry_of(self.helper_image))
            self.metrics.pull_failures.labels(registry=failure.registry, **{"class": failure.failure.value}).inc()
            if failure.failure is FailureClass.THROTTLED:
                self.metrics.registry_throttled.labels(registry=failure.registry, source="kubelet").inc()
            self.metrics.prepull_pods.labels(outcome="failed").inc()
            self.failures.report(failure)
        self._delete_all(deletes)
        for state in finished:
            self._node_finished(state)
        self.wake()

    def pod_removed(self, pod: Pod) -> None:
        if pod.component == PREPULL_COMPONENT:
            self.scheduler.pod_deleted(pod)
            self.wake()

    # -- loops -------------------------------------------------------------

    async def run(self) -> None:
        """Plan and launch until cancelled; the caller runs it only while leading."""
        self.active = True
        async with anyio.create_task_group() as group:
            self._group = group
            group.start_soon(self._flush_loop)
            for state in list(self.scheduler.nodes.values()):
                if state.dirty or (state.complete and state.succeeded):
                    group.start_soon(self.flush, state)
            while True:
                self._wake = anyio.Event()
                launches, wake_in = self.scheduler.plan()
                for launch in launches:
                    group.start_soon(self._create, launch)
                self._delete_all(self.scheduler.orphans())
                if time.monotonic() >= self._next_expiry_check:
                    self._next_expiry_check = time.monotonic() + _EXPIRY_CHECK_INTERVAL
                    for delete in self.scheduler.expired_pods():
                        self.metrics.prepull_pods.labels(outcome="deadline_exceeded").inc()
                        group.start_soon(self._delete_pod, delete)
                self._update_gauges()
                timeout = min(wake_in if wake_in is not None else self.progress_interval, self.progress_interval)
                with anyio.move_on_after(max(timeout, 0.01)):
                    await self._wake.wait()

    async def _flush_loop(self) -> None:
        while True:
            await anyio.sleep(self.progress_interval)
            self._check_taint_deadlines()
            self._update_node_gauges()
            for state in list(self.scheduler.nodes.values()):
                if state.dirty:
                    await self.flush(state)
            self.failures.summarize()

    # -- API actions -------------------------------------------------------

    async def _create(self, launch: Launch) -> None:
        body = prepull_pod(launch, self.namespace, self.helper_image, self.host_network, self.pod_deadline)
        async with self._limiter:
            try:
                await self.kube.create(PODS, body, self.namespace)
            except ApiError as error:
                if error.already_exists and not self.scheduler.is_being_deleted(launch.pod_name):
                    # Created before a restart; the pod watch reports its state.
                    log.debug("prepull.pod_exists", pod=launch.pod_name, node=launch.node.name)
                    return
                if error.already_exists:
                    # The failed attempt's pod is still being removed: try again shortly.
                    self.scheduler.launch_failed(launch, retry_after=1.0)
                    self.wake()
                    return
                self._log_api_error("create", "pods", error, pod=launch.pod_name, node=launch.node.name)
                self.scheduler.launch_failed(launch, retry_after=5.0)
                self.wake()
                return
        self.metrics.prepull_pods.labels(outcome="created").inc()
        log.debug("prepull.pod_created", pod=launch.pod_name, node=launch.node.name, image=str(launch.image.resolved))

    def _delete_all(self, deletes: list[DeletePod]) -> None:
        if not deletes or self._group is None or not self.active:
            return
        for delete in deletes:
            self._group.start_soon(self._delete_pod, delete)

    async def _delete_pod(self, delete: DeletePod) -> None:
        async with self._limiter:
            try:
                await self.kube.delete(PODS, delete.name, self.namespace, grace_period_seconds=0)
            except ApiError as error:
                self._log_api_error("delete", "pods", error, pod=delete.name)
                return
        log.debug("prepull.pod_deleted", pod=delete.name, reason=delete.reason)

    async def _delete_node_pods(self, key: str) -> None:
        async with self._limiter:
            try:
                await self.kube.delete_collection(
                    PODS, self.namespace, label_selector=f"{NODE_LABEL}={key}", grace_period_seconds=0
                )
            except ApiError as error:
                self._log_api_error("deletecollection", "pods", error, node_key=key)

    async def flush(self, state: NodeState) -> None:
        """Record a node's results in its annotations, then delete its finished pods."""
        state.dirty = False
        succeeded = sorted(state.succeeded)
        progress = self.scheduler.progress(state)
        patch: JSON = {
            "metadata": {
                "annotations": {
                    DONE_ANNOTATION: ",".join(sorted(state.done)),
                    FAILED_ANNOTATION: ",".join(f"{h}:{c}" for h, c in sorted(state.failed.items())) or None,
                    PROGRESS_ANNOTATION: progress.as_json(),
                }
            }
        }
        taint = self._taint_to_remove(state)
        if taint is not None:
            patch["metadata"]["resourceVersion"] = state.resource_version
            patch["spec"] = {"taints": [t for t in taint]}
        async with self._limiter:
            try:
                await self.kube.merge_patch(NODES, state.node.name, patch)
            except ApiError as error:
                state.dirty = True
                if error.conflict:
                    log.debug("prepull.node_conflict", node=state.node.name)
                elif error.not_found:
                    return
                else:
                    self._log_api_error("patch", "nodes", error, node=state.node.name)
                return
            if taint is not None:
                log.info("prepull.taint_removed", node=state.node.name, taint=self.scheduler.limits.startup_taint)
            if not succeeded:
                return
            selector = f"{NODE_LABEL}={state.key},{self._hash_selector(succeeded)}"
            try:
                await self.kube.delete_collection(PODS, self.namespace, label_selector=selector, grace_period_seconds=0)
            except ApiError as error:
                self._log_api_error("deletecollection", "pods", error, node=state.node.name)
                return
        state.succeeded.difference_update(succeeded)
        self.metrics.prepull_pods.labels(outcome="succeeded").inc(len(succeeded))

    @staticmethod
    def _hash_selector(hashes: list[str]) -> str:
        return f"{IMAGE_HASH_LABEL} in ({','.join(hashes)})"

    def _taint_to_remove(self, state: NodeState) -> list[JSON] | None:
        key = self.scheduler.limits.startup_taint
        if key is None or not state.node.has_taint(key):
            return None
        overdue = self.clock() - state.node.created > self.scheduler.limits.startup_taint_deadline
        if not (state.complete or overdue):
            return None
        return [
            {"key": t.key, "value": t.value, "effect": t.effect} if t.value else {"key": t.key, "effect": t.effect}
            for t in state.node.taints
            if t.key != key
        ]

    def _check_taint_deadlines(self) -> None:
        key = self.scheduler.limits.startup_taint
        if key is None:
            return
        for state in self.scheduler.nodes.values():
            if state.node.has_taint(key) and self._taint_to_remove(state) is not None:
                if not state.complete:
                    log.warning(
                        "prepull.taint_deadline",
                        node=state.node.name,
                        taint=key,
                        pending=self.scheduler.progress(state).pending,
                    )
                state.dirty = True

    def _node_finished(self, state: NodeState) -> None:
        progress = self.scheduler.progress(state)
        if not state.warm_recorded:
            state.warm_recorded = True
            if progress.failed == 0 and state.node.created:
                seconds = max(0.0, self.clock() - state.node.created)
                self.metrics.node_warmup.labels(platform=state.node.platform).observe(seconds)
            log.info("prepull.node_done", node=state.node.name, done=progress.done, failed=progress.failed)
            if self.on_node_finished is not None:
                self.on_node_finished()
        if self.active and self._group is not None:
            self._group.start_soon(self.flush, state)

    def _log_api_error(self, verb: str, resource: str, error: ApiError, **ids: str) -> None:
        if error.forbidden:
            permission = f"{verb} {resource}"
            if permission not in self._forbidden_logged:
                self._forbidden_logged.add(permission)
                log.error(
                    "api.forbidden",
                    verb=verb,
                    resource=resource,
                    namespace=self.namespace,
                    error=error.message,
                    hint=(
                        f"grant '{verb}' on {resource} to imgcache's ServiceAccount "
                        "(see manifests/base/clusterrole.yaml and manifests/base/role.yaml)"
                    ),
                    **ids,
                )
            return
        log.warning("api.failed", verb=verb, resource=resource, status=error.status, error=error.message, **ids)

    def _update_node_gauges(self) -> None:
        counts = {"warming": 0, "warm": 0, "failed": 0, "skipped": 0}
        oldest = 0.0
        now = self.clock()
        for state in self.scheduler.nodes.values():
            progress = self.scheduler.progress(state)
            if progress.done + progress.pending + progress.failed == 0:
                counts["skipped"] += 1
            elif progress.pending:
                counts["warming"] += 1
                oldest = max(oldest, now - state.node.created) if state.node.created else oldest
            elif progress.failed:
                counts["failed"] += 1
            else:
                counts["warm"] += 1
        for name, value in counts.items():
            self.metrics.nodes.labels(state=name).set(value)
        self.metrics.oldest_warming.set(oldest)

    def _update_gauges(self) -> None:
        self.metrics.inflight.set(self.scheduler.inflight)
        self.metrics.queue_depth.set(self.scheduler.last_queue_depth)
        for registry, bucket in self.scheduler.buckets.items():
            self.metrics.registry_rate.labels(registry=registry).set(bucket.rate)
