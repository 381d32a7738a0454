"""Prepull decisions: which (node, image) pairs to start next, and what a pod's state means.

This module does no I/O. It holds the cluster's prepull state (rebuilt from node
annotations and existing prepull pods after a restart) and returns actions for the
prepull worker to carry out, so tests can drive every decision with plain objects and
an injected clock.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from imgcache.catalogue import Catalogue, CatalogueImage
from imgcache.classify import PERMANENT, FailureClass, classify
from imgcache.model import Node, Pod
from imgcache.ratelimit import AdaptiveBucket

log = structlog.get_logger(__name__)

# The kubelet's image errors (pkg/kubelet/images/types.go), which it sets as the waiting
# reason of a container whose image it could not inspect or pull.
PULL_ERROR_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "ImageInspectError",
        "RegistryUnavailable",
    }
)
PREPULL_CONTAINER = "prepull"
PREPULL_COMPONENT = "prepull"


@dataclass(frozen=True)
class Limits:
    """Concurrency and retry limits of the prepull scheduler (seconds, pulls per second)."""

    max_inflight: int = 40
    max_inflight_per_node: int = 4
    registry_qps: float = 20.0
    registry_burst: int = 20
    registry_min_qps: float = 0.5
    # Pull starts per node, below the kubelet's own limit (registryPullQPS 5 and
    # registryBurst 10 by default): a pull over it fails with "pull QPS exceeded" and
    # backs off. The margin covers pods whose pulls reach the kubelet late and then
    # together. 0 turns pacing off.
    node_pull_qps: float = 4.0
    node_pull_burst: int = 8
    prepull_deadline: float = 900.0
    pod_deadline: float = 600.0
    retry_initial: float = 5.0
    retry_max: float = 120.0
    startup_taint: str | None = None
    startup_taint_deadline: float = 600.0


def node_key(node: Node) -> str:
    """Return a short id of one node incarnation; a re-created node gets a new key."""
    return hashlib.sha256(f"{node.name}/{node.uid}".encode()).hexdigest()[:10]


def pod_name(key: str, image_hash: str) -> str:
    return f"imgcache-prepull-{key}-{image_hash}"


@dataclass(frozen=True)
class Launch:
    """Create the prepull pod for one image on one node."""

    node: Node
    key: str
    image: CatalogueImage
    pod_name: str


@dataclass(frozen=True)
class DeletePod:
    name: str
    reason: str


@dataclass(frozen=True)
class Failure:
    """A classified pull failure, reported once per (node, image, class) by the caller."""

    node: str
    pod: str
    image: str
    registry: str
    failure: FailureClass
    message: str
    permanent: bool
    gave_up: bool
    helper: bool = False


@dataclass
class NodeState:
    """Prepull progress of one node incarnation."""

    node: Node
    key: str
    # Replaced, never changed in place, so that warm nodes share the set parsed from
    # their identical annotations. At thousands of nodes these sets were most of the memory.
    done: frozenset[str]
    failed: dict[str, str]
    inflight: dict[str, str] = field(default_factory=dict)
    retry_at: dict[str, float] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    first_try: dict[str, float] = field(default_factory=dict)
    succeeded: set[str] = field(default_factory=set)
    dirty: bool = False
    complete: bool = False
    warm_recorded: bool = False
    # The node's applicable images, valid while the catalogue keeps this version.
    applicable_version: int = -1
    applicable_images: list[CatalogueImage] = field(default_factory=list)
    resource_version: str = ""
    # Mirror of the kubelet's pull-start bucket; None until the node's first launch.
    pull_tokens: float | None = None
    pull_stamp: float = 0.0
    # Length of the node's queue after its last plan, and the catalogue version of that
    # queue (-1 when something outside plan() changed it). plan() reuses the length while
    # the node cannot start a pod.
    queue_length: int = 0
    queue_version: int = -1
    # Whether a prepull pod's init container ran here, so the helper image is present.
    # Until then every pod costs two pulls: the helper image and its own image.
    helper_seen: bool = False


@dataclass(frozen=True)
class Progress:
    """Counts for one node's progress annotation."""

    done: int
    pending: int
    failed: int
    inflight: int

    def as_json(self) -> str:
        return json.dumps(
            {"done": self.done, "pending": self.pending, "failed": self.failed, "inflight": self.inflight},
            sort_keys=True,
        )


class Scheduler:
    """Prepull state machine for every node; see the module docstring."""

    def __init__(
        self,
        catalogue: Catalogue,
        limits: Limits,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.limits = limits
        self.clock = clock
        self.rng = rng or random.Random()
        self.nodes: dict[str, NodeState] = {}
        self.pods: dict[str, Pod] = {}
        self.buckets: dict[str, AdaptiveBucket] = {}
        # Nodes that may have work, in turn order. A node leaves when plan() finds it idle
        # and comes back through _activate(), so planning costs nothing for warm nodes.
        self.rotation: deque[str] = deque()
        self._rotating: set[str] = set()
        self._rotation_version = catalogue.version
        # Progress of nodes with no failures and nothing in flight, keyed by the ids of
        # their shared image list and done set. Each entry keeps references to both
        # objects, so their ids cannot be reused while the entry exists.
        self._progress_memo: dict[tuple[int, int], tuple[list[CatalogueImage], frozenset[str], Progress]] = {}
        self.inflight = 0
        self.quota_caps: dict[str, float] = {}
        self.last_queue_depth = 0
        # Pods this scheduler asked to delete; their later events are ignored.
        self.deleting: set[str] = set()
        # Names of pods being deleted, so a create that meets one of them is retried.
        self.deleting_names: dict[str, str] = {}
        # Pods whose node is unknown or a different incarnation; see orphans().
        self.unbound: dict[str, Pod] = {}

    # -- nodes -------------------------------------------------------------

    def set_node(self, node: Node, resource_version: str = "") -> list[DeletePod]:
        """Record a node; a new uid under a known name replaces the old incarnation."""
        actions: list[DeletePod] = []
        state = self.nodes.get(node.name)
        if state is not None and state.node.uid != node.uid:
            actions += self.remove_node(node.name)
            state = None
        if state is None:
            state = NodeState(node=node, key=node_key(node), done=node.done, failed=dict(node.failed))
            self.nodes[node.name] = state
            # A new node goes to the front: it has had no share of the slots yet.
            self._activate(state, front=True)
        else:
            if (node.labels, node.os, node.arch) != (state.node.labels, state.node.os, state.node.arch):
                state.applicable_version = -1
            state.node = node
            state.queue_version = -1
            self._activate(state)
            # Annotations written by an earlier leader are merged, never dropped.
            if node.done >= state.done:
                state.done = node.done
            elif not node.done <= state.done:
                state.done = state.done | node.done
            for image_hash, failure in node.failed.items():
                state.failed.setdefault(image_hash, failure)
        state.resource_version = resource_version
        return actions

    def remove_node(self, name: str) -> list[DeletePod]:
        state = self.nodes.pop(name, None)
        if state is None:
            return []
        self.inflight -= len(state.inflight)
        if name in self._rotating:
            self._rotating.discard(name)
            self.rotation = deque(n for n in self.rotation if n != name)
        return [
            DeletePod(p, "node_deleted")
            for p in list(state.inflight.values()) + sorted(pod_name(state.key, h) for h in state.succeeded)
        ]

    def _activate(self, state: NodeState, front: bool = False) -> None:
        """Put the node back in the rotation, because something may have given it work."""
        name = state.node.name
        if name in self._rotating:
            return
        self._rotating.add(name)
        if front:
            self.rotation.appendleft(name)
        else:
            self.rotation.append(name)

    def applicable(self, state: NodeState) -> list[CatalogueImage]:
        version = self.catalogue.version
        if state.applicable_version != version:
            state.applicable_images = self.catalogue.prepull_images(state.node)
            state.applicable_version = version
        return state.applicable_images

    def progress(self, state: NodeState) -> Progress:
        images = self.applicable(state)
        if state.failed or state.inflight:
            return self._progress(state, images)
        key = (id(images), id(state.done))
        memo = self._progress_memo.get(key)
        if memo is not None and memo[0] is images and memo[1] is state.done:
            return memo[2]
        progress = self._progress(state, images)
        if len(self._progress_memo) >= 256:
            self._progress_memo.clear()
        self._progress_memo[key] = (images, state.done, progress)
        return progress

    def _progress(self, state: NodeState, images: list[CatalogueImage]) -> Progress:
        hashes = {image.hash for image in images}
        done = len(hashes & state.done)
        failed = len(hashes & set(state.failed))
        inflight = len(hashes & set(state.inflight))
        return Progress(done=done, pending=len(hashes) - done - failed, failed=failed, inflight=inflight)

    def is_complete(self, state: NodeState) -> bool:
        return all(image.hash in state.done or image.hash in state.failed for image in self.applicable(state))

    # -- planning ----------------------------------------------------------

    def bucket(self, registry: str) -> AdaptiveBucket:
        bucket = self.buckets.get(registry)
        if bucket is None:
            limits = self.limits
            bucket = AdaptiveBucket(limits.registry_qps, limits.registry_burst, limits.registry_min_qps, self.clock())
            if registry in self.quota_caps:
                bucket.cap(self.quota_caps[registry])
            self.buckets[registry] = bucket
        return bucket

    def registry_summary(self) -> dict[str, dict[str, float]]:
        """Return each registry's adaptive rate and its throttling in the last 5 minutes."""
        now = self.clock()
        return {
            registry: {
                "rate": round(bucket.rate, 3),
                "maxRate": round(bucket.max_rate, 3),
                "throttled5m": bucket.recent_throttles(now),
            }
            for registry, bucket in sorted(self.buckets.items())
        }

    def queue_depth(self) -> int:
        now = self.clock()
        return sum(len(self._waiting(state, now)) for state in self.nodes.values())

    def _waiting(self, state: NodeState, now: float) -> list[CatalogueImage]:
        return [
            image
            for image in self.applicable(state)
            if image.hash not in state.done
            and image.hash not in state.failed
            and image.hash not in state.inflight
            and state.retry_at.get(image.hash, 0.0) <= now
        ]

    def plan(self) -> tuple[list[Launch], float | None]:
        """Choose pods to start now, one image per node per round, and when to plan again.

        Nodes take turns, so a node that joins during another node's backlog gets the next
        free slot instead of waiting for that backlog to drain.
        """
        now = self.clock()
        launches: list[Launch] = []
        wake: float | None = None
        version = self.catalogue.version
        if version != self._rotation_version:
            # A catalogue change can give any node new images.
            self._rotation_version = version
            for state in self.nodes.values():
                self._activate(state)
        cap = self.limits.max_inflight_per_node
        queues: dict[str, list[CatalogueImage]] = {}
        depth = 0
        for name in self.rotation:
            state = self.nodes[name]
            blocked = len(state.inflight) >= cap or self._node_wait(state, now, _pull_cost(state)) > 0
            if blocked and not state.retry_at and state.queue_version == version:
                # A node at its cap or out of pull tokens starts nothing in this plan. Its
                # queue changes only through retries, a new catalogue or the events that
                # reset queue_version, because a completion removes an image in flight.
                depth += state.queue_length
                continue
            queues[name] = self._waiting(state, now)
            depth += len(queues[name])
        self.last_queue_depth = depth
        # Nodes with something to start now take turns, and nodes with a retry due later
        # keep their order behind them. The others leave the rotation, even with pods in
        # flight, because a failure, retry or deletion brings them back via _activate().
        active = deque(
            name for name in self.rotation if (queues[name] if name in queues else self.nodes[name].queue_length)
        )
        waiting = [name for name in queues if not queues[name] and self.nodes[name].retry_at]
        self._rotating = set(active) | set(waiting)
        empty: dict[str, float] = {}
        progressed = True
        while progressed and self.inflight < self.limits.max_inflight:
            progressed = False
            for _ in range(len(active)):
                # Check the cap before the node takes its turn, so a node reached while
                # every slot is taken keeps its place at the front for the next free slot.
                if self.inflight >= self.limits.max_inflight:
                    break
                name = active[0]
                active.rotate(-1)
                state = self.nodes[name]
                if len(state.inflight) >= self.limits.max_inflight_per_node:
                    continue
                cost = _pull_cost(state)
                node_wait = self._node_wait(state, now, cost)
                if node_wait > 0:
                    wake = node_wait if wake is None else min(wake, node_wait)
                    continue
                launch, retry_in = self._take(state, queues[name], now, empty)
                if retry_in is not None:
                    wake = retry_in if wake is None else min(wake, retry_in)
                if launch is not None:
                    if state.pull_tokens is not None:
                        state.pull_tokens -= cost
                    launches.append(launch)
                    progressed = True
        for name, queue in queues.items():
            state = self.nodes[name]
            state.queue_length = len(queue)
            state.queue_version = version
        active.extend(waiting)
        self.rotation = active
        for name in self.rotation:
            for at in self.nodes[name].retry_at.values():
                if at > now:
                    wake = at - now if wake is None else min(wake, at - now)
        return launches, wake

    def _node_wait(self, state: NodeState, now: float, cost: float) -> float:
        """Refill the node's pull-start bucket; return seconds until it contains ``cost`` tokens."""
        qps = self.limits.node_pull_qps
        if qps <= 0:
            return 0.0
        burst = float(self.limits.node_pull_burst)
        if state.pull_tokens is None:
            state.pull_tokens = burst
        elif now > state.pull_stamp:
            state.pull_tokens = min(burst, state.pull_tokens + (now - state.pull_stamp) * qps)
        state.pull_stamp = now
        # A cost above the burst could never be met, so a full bucket pays it and goes negative.
        need = min(cost, burst)
        return 0.0 if state.pull_tokens >= need else (need - state.pull_tokens) / qps

    def _take(
        self, state: NodeState, queue: list[CatalogueImage], now: float, empty: dict[str, float]
    ) -> tuple[Launch | None, float | None]:
        """Start the node's first queued image whose registry has a token.

        ``empty`` maps each registry whose bucket ran dry during this plan() to its wait.
        The clock does not move within a plan, so such a bucket is not asked again.
        """
        retry_in: float | None = None
        for index, image in enumerate(queue):
            registry = image.resolved.registry
            if registry not in empty:
                bucket = self.bucket(registry)
                if bucket.try_acquire(now):
                    queue.pop(index)
                    name = pod_name(state.key, image.hash)
                    state.inflight[image.hash] = name
                    state.first_try.setdefault(image.hash, now)
                    self.inflight += 1
                    return Launch(state.node, state.key, image, name), retry_in
                empty[registry] = bucket.wait_time(now)
            wait = empty[registry]
            retry_in = wait if retry_in is None else min(retry_in, wait)
        return None, retry_in

    def launch_failed(self, launch: Launch, retry_after: float) -> None:
        """Undo a reservation whose pod could not be created."""
        state = self.nodes.get(launch.node.name)
        self.bucket(launch.image.resolved.registry).release()
        if state is None or state.inflight.get(launch.image.hash) != launch.pod_name:
            return
        state.queue_version = -1
        if state.pull_tokens is not None:
            state.pull_tokens = min(float(self.limits.node_pull_burst), state.pull_tokens + _pull_cost(state))
        del state.inflight[launch.image.hash]
        self.inflight -= 1
        state.retry_at[launch.image.hash] = self.clock() + retry_after
        self._activate(state)

    # -- pods --------------------------------------------------------------

    def pod_changed(self, pod: Pod) -> tuple[list[DeletePod], list[Failure], list[NodeState]]:
        """Interpret a prepull pod's state; return pods to delete, failures, and finished nodes."""
        if pod.uid in self.deleting:
            return [], [], []
        state = self._state_for(pod)
        if state is None:
            # The pod's node may simply not be listed yet; orphans() decides once the
            # node watch is synced and the worker runs.
            if not pod.deleting:
                self.unbound[pod.name] = pod
            return [], [], []
        self.unbound.pop(pod.name, None)
        self.pods[pod.name] = pod
        if pod.image_hash not in state.inflight and (pod.image_hash in state.done or pod.image_hash in state.failed):
            # Finished before a restart and already recorded on the node: only remove it.
            if pod.deleting:
                return [], [], []
            if pod.image_hash in state.done:
                if pod.image_hash not in state.succeeded:
                    state.succeeded.add(pod.image_hash)
                    state.dirty = True
                return [], [], []
            return [self._delete(pod, "already_failed")], [], []
        if pod.image_hash not in state.inflight and not pod.deleting:
            # A pod created before a restart: adopt it instead of starting another.
            state.inflight[pod.image_hash] = pod.name
            state.first_try.setdefault(pod.image_hash, pod.created or self.clock())
            self.inflight += 1
            state.queue_version = -1
        if pod.deleting or state.inflight.get(pod.image_hash) != pod.name:
            return [], [], []
        image = self.catalogue.images.get(pod.image_hash)
        registry = image.resolved.registry if image else _registry_of(pod.image)
        if _pulled(pod):
            state.helper_seen = True
            return [], [], self._succeeded(state, pod, registry)
        failure = _pull_failure(pod)
        if not state.helper_seen and (
            any(c.image_id or c.terminated for c in pod.init_containers)
            or (failure is not None and failure[2] == PREPULL_CONTAINER)
        ):
            # Init containers finish before the kubelet pulls the prepull container's image.
            state.helper_seen = True
        if failure is not None:
            reason, message, container = failure
            helper = container != PREPULL_CONTAINER
            return self._failed(state, pod, registry, classify(message, reason), message, helper=helper)
        if pod.phase == "Failed":
            message = f"pod failed with reason {pod.reason or 'unknown'} before the image was pulled"
            return self._failed(state, pod, registry, FailureClass.OTHER, message)
        return [], [], []

    def pod_deleted(self, pod: Pod) -> None:
        was_ours = pod.uid in self.deleting
        self.deleting.discard(pod.uid)
        if self.deleting_names.get(pod.name) == pod.uid:
            del self.deleting_names[pod.name]
        self.unbound.pop(pod.name, None)
        current = self.pods.get(pod.name)
        if current is not None and current.uid != pod.uid:
            return  # A late event of an older pod with the same name.
        self.pods.pop(pod.name, None)
        state = self._state_for(pod)
        if state is None or was_ours:
            return
        if state.inflight.get(pod.image_hash) == pod.name:
            # Deleted by someone else before it finished: run it again.
            del state.inflight[pod.image_hash]
            self.inflight -= 1
            state.queue_version = -1
            self._activate(state)

    def expired_pods(self) -> list[DeletePod]:
        """Return pods running longer than the pod deadline; they are retried."""
        now = self.clock()
        expired = []
        for pod in list(self.pods.values()):
            state = self._state_for(pod)
            if state is None or state.inflight.get(pod.image_hash) != pod.name or pod.deleting:
                continue
            if pod.created and now - pod.created > self.limits.pod_deadline:
                del state.inflight[pod.image_hash]
                self.inflight -= 1
                self._schedule_retry(state, pod.image_hash, now)
                expired.append(self._delete(pod, "deadline_exceeded"))
        return expired

    def orphans(self) -> list[DeletePod]:
        """Return pods whose node is gone or was re-created; call only with synced watches."""
        deletes = []
        for pod in list(self.unbound.values()):
            state = self.nodes.get(pod.node_name)
            if state is None or state.key != pod.node_key:
                del self.unbound[pod.name]
                deletes.append(self._delete(pod, "orphaned"))
        return deletes

    def take_unbound(self, node_name: str) -> list[Pod]:
        """Remove and return the pods that waited for ``node_name`` to be known."""
        pods = [pod for pod in self.unbound.values() if pod.node_name == node_name]
        for pod in pods:
            del self.unbound[pod.name]
        return pods

    def is_being_deleted(self, name: str) -> bool:
        return name in self.deleting_names

    def _delete(self, pod: Pod, reason: str) -> DeletePod:
        self.deleting.add(pod.uid)
        self.deleting_names[pod.name] = pod.uid
        self.pods.pop(pod.name, None)
        return DeletePod(pod.name, reason)

    def _state_for(self, pod: Pod) -> NodeState | None:
        state = self.nodes.get(pod.node_name)
        if state is None or state.key != pod.node_key:
            return None
        return state

    def _succeeded(self, state: NodeState, pod: Pod, registry: str) -> list[NodeState]:
        now = self.clock()
        del state.inflight[pod.image_hash]
        self.inflight -= 1
        state.done = state.done | {pod.image_hash}
        state.succeeded.add(pod.image_hash)
        state.retry_at.pop(pod.image_hash, None)
        state.dirty = True
        self.bucket(registry).on_success(now)
        if self.is_complete(state) and not state.inflight:
            state.complete = True
            return [state]
        return []

    def _failed(
        self,
        state: NodeState,
        pod: Pod,
        registry: str,
        failure: FailureClass,
        message: str,
        helper: bool = False,
    ) -> tuple[list[DeletePod], list[Failure], list[NodeState]]:
        now = self.clock()
        del state.inflight[pod.image_hash]
        self.inflight -= 1
        # A failure of the helper image tells nothing about the cached image, so it is
        # never recorded against that image and is always retried.
        permanent = failure in PERMANENT and not helper
        if failure is FailureClass.THROTTLED and not helper:
            self.bucket(registry).on_throttled(now)
        throttled = failure in (FailureClass.THROTTLED, FailureClass.KUBELET_THROTTLED)
        if failure is FailureClass.KUBELET_THROTTLED and state.pull_tokens is not None:
            # The kubelet's bucket is empty now, also when pulls of other pods emptied it.
            state.pull_tokens = 0.0
            state.pull_stamp = now
        gave_up = not permanent and now - state.first_try.get(pod.image_hash, now) > self.limits.prepull_deadline
        if permanent or gave_up:
            state.failed[pod.image_hash] = failure.value
            state.retry_at.pop(pod.image_hash, None)
            state.dirty = True
        else:
            self._schedule_retry(state, pod.image_hash, now, throttled=throttled)
        report = Failure(
            node=state.node.name,
            pod=pod.name,
            image=pod.image,
            registry=registry,
            failure=failure,
            message=message,
            permanent=permanent,
            gave_up=gave_up,
            helper=helper,
        )
        finished = []
        if (permanent or gave_up) and self.is_complete(state) and not state.inflight:
            state.complete = True
            finished.append(state)
        return [self._delete(pod, f"failed_{failure.value}")], [report], finished

    def _schedule_retry(self, state: NodeState, image_hash: str, now: float, throttled: bool = False) -> None:
        attempts = state.attempts.get(image_hash, 0) + 1
        state.attempts[image_hash] = attempts
        if throttled:
            # The registry's and the node's token buckets already space out retries; a
            # short jitter keeps retries of many nodes from lining up.
            delay = self.rng.uniform(0.5, 1.5)
        else:
            ceiling = min(self.limits.retry_max, self.limits.retry_initial * 2 ** (attempts - 1))
            delay = self.rng.uniform(ceiling / 2, ceiling)
        state.retry_at[image_hash] = now + delay
        self._activate(state)


def _pull_cost(state: NodeState) -> float:
    """Return the kubelet pulls one more prepull pod costs on this node."""
    return 1.0 if state.helper_seen else 2.0


def _pulled(pod: Pod) -> bool:
    if pod.phase == "Succeeded":
        return True
    for container in pod.containers:
        if container.name == PREPULL_CONTAINER and (container.image_id or container.running or container.terminated):
            return True
    return False


def _pull_failure(pod: Pod) -> tuple[str, str, str] | None:
    """Return (reason, message, container name) of the first container failing to pull."""
    for container in pod.init_containers + pod.containers:
        if container.waiting_reason in PULL_ERROR_REASONS:
            return container.waiting_reason, container.waiting_message, container.name
    return None


def _registry_of(image: str) -> str:
    first = image.split("/", 1)[0]
    return first if "/" in image and ("." in first or ":" in first or first == "localhost") else "docker.io"
