"""Tests of the prepull scheduler: caps, rate limits, fairness, failures, retries and restarts.

The scheduler does no I/O, so each test plays the API server: it "creates" the pods that
``plan`` requests and feeds their status back through ``pod_changed`` and ``pod_deleted``.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from imgcache.catalogue import Catalogue
from imgcache.classify import FailureClass
from imgcache.model import Node, Pod, pod_from_json
from imgcache.scheduler import DeletePod, Failure, Launch, NodeState, Progress, Scheduler, node_key, pod_name
from unit.factories import (
    EPOCH,
    FakeClock,
    catalogue_of,
    image_named,
    imagecache_json,
    launched_pod,
    node,
    pod_in_state,
    pod_json,
    registry_images,
    scheduler_for,
)

REGISTRY = "registry.example.com"
OTHER_REGISTRY = "ghcr.io"
# Generous registry limits for tests that are not about rate limiting.
FAST = {"registry_qps": 1000.0, "registry_burst": 1000}

NOT_FOUND = 'failed to resolve reference "registry.example.com/app0:v1": registry.example.com/app0:v1: not found'
UNAUTHORIZED = "failed to authorize: failed to fetch anonymous token: unexpected status: 401 Unauthorized"
PLATFORM = "no match for platform in manifest: not found"
INVALID_NAME = 'couldn\'t parse image reference "Registry/App": invalid reference format'
NETWORK = "dial tcp 10.0.0.1:443: i/o timeout"
DISK_FULL = "write /var/lib/containerd/io.containerd.content.v1.content/ingest/data: no space left on device"
THROTTLED = "429 Too Many Requests - Server message: toomanyrequests: You have reached your pull rate limit"


class Cluster:
    """Pods that the test created, each with its own uid, as the API server assigns one."""

    def __init__(self, scheduler: Scheduler, clock: FakeClock) -> None:
        self.scheduler = scheduler
        self.clock = clock
        self.uids: dict[str, str] = {}
        self.created: dict[str, float] = {}
        self._serial = itertools.count(1)

    def plan(self) -> list[Launch]:
        """Run ``plan`` and create a pod for each launch."""
        launches, _ = self.scheduler.plan()
        for launch in launches:
            self.create(launch)
        return launches

    def create(self, launch: Launch) -> None:
        self.uids[launch.pod_name] = f"{launch.pod_name}-{next(self._serial)}"
        self.created[launch.pod_name] = self.clock()

    def pod(self, launch: Launch, state: str, **fields: Any) -> Pod:
        """Return the current pod of ``launch`` in ``state``."""
        return launched_pod(
            launch, state=state, uid=self.uids[launch.pod_name], created=self.created[launch.pod_name], **fields
        )

    def report(
        self, launch: Launch, state: str, **fields: Any
    ) -> tuple[list[DeletePod], list[Failure], list[NodeState]]:
        """Feed the pod of ``launch`` in ``state`` to the scheduler."""
        return self.scheduler.pod_changed(self.pod(launch, state, **fields))


def make_scheduler(
    images: list[Any], nodes: Sequence[Node] = (), seed: int = 7, **limits: Any
) -> tuple[Scheduler, FakeClock, Cluster]:
    catalogue = catalogue_of(imagecache_json("images", images, namespace="platform"))
    scheduler, clock = scheduler_for(catalogue, seed=seed, **{**FAST, **limits})
    for item in nodes:
        scheduler.set_node(item)
    return scheduler, clock, Cluster(scheduler, clock)


def hashes(launches: list[Launch]) -> list[str]:
    return [launch.image.hash for launch in launches]


def node_names(launches: list[Launch]) -> list[str]:
    return [launch.node.name for launch in launches]


# -- launching -----------------------------------------------------------------


def test_plan_launches_each_image_once() -> None:
    scheduler, _, cluster = make_scheduler(registry_images(REGISTRY, 3), [node("n1")])

    launches = cluster.plan()

    key = node_key(node("n1"))
    assert sorted(hashes(launches)) == sorted(scheduler.catalogue.images)
    assert [launch.pod_name for launch in launches] == [pod_name(key, h) for h in hashes(launches)]
    assert all(launch.key == key for launch in launches)
    assert cluster.plan() == []
    assert scheduler.inflight == 3


def test_plan_global_cap() -> None:
    nodes = [node(f"n{index}") for index in range(5)]
    scheduler, _, cluster = make_scheduler(
        registry_images(REGISTRY, 10), nodes, max_inflight=7, max_inflight_per_node=4
    )

    launches = cluster.plan()

    assert len(launches) == 7
    assert scheduler.inflight == 7


def test_plan_per_node_cap() -> None:
    scheduler, _, cluster = make_scheduler(
        registry_images(REGISTRY, 10), [node("n1")], max_inflight=40, max_inflight_per_node=3
    )

    launches = cluster.plan()

    assert len(launches) == 3
    assert len(scheduler.nodes["n1"].inflight) == 3


def test_plan_node_selector_scope() -> None:
    scheduler, _, cluster = make_scheduler([f"{REGISTRY}/base:v1"], [node("cpu-node", labels={"pool": "cpu"})])
    scheduler.catalogue.upsert(
        imagecache_json("gpu", [f"{REGISTRY}/cuda:v1"], namespace="ml", node_selector={"pool": "gpu"})
    )

    launches = cluster.plan()

    assert [str(launch.image.resolved) for launch in launches] == [f"{REGISTRY}/base:v1"]


def test_plan_skips_prepull_false() -> None:
    _, _, cluster = make_scheduler(
        [{"image": f"{REGISTRY}/pinned:v1", "prepull": False}, f"{REGISTRY}/warm:v1"], [node("n1")]
    )

    launches = cluster.plan()

    assert [str(launch.image.resolved) for launch in launches] == [f"{REGISTRY}/warm:v1"]


def test_plan_prepull_false_only_node_complete() -> None:
    scheduler, _, cluster = make_scheduler([{"image": f"{REGISTRY}/pinned:v1", "prepull": False}], [node("n1")])

    assert cluster.plan() == []
    assert scheduler.is_complete(scheduler.nodes["n1"])


def test_plan_windows_node_gets_nothing() -> None:
    _, _, cluster = make_scheduler(registry_images(REGISTRY, 2), [node("win", os="windows")])

    assert cluster.plan() == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_caps_hold_with_completions(seed: int) -> None:
    rng = random.Random(seed)
    images = registry_images(REGISTRY, 6) + registry_images(OTHER_REGISTRY, 5) + registry_images("quay.io", 4)
    nodes = [node(f"n{index}") for index in range(6)]
    scheduler, clock, cluster = make_scheduler(
        images, nodes, seed=seed, max_inflight=7, max_inflight_per_node=3, retry_initial=1.0, retry_max=4.0
    )
    live: dict[str, Launch] = {}
    successes: Counter[tuple[str, str]] = Counter()

    for _ in range(2000):
        for launch in cluster.plan():
            assert launch.pod_name not in live
            live[launch.pod_name] = launch
        assert scheduler.inflight == len(live)
        assert scheduler.inflight <= 7
        for state in scheduler.nodes.values():
            assert len(state.inflight) <= 3, state.node.name
        for name in rng.sample(sorted(live), k=rng.randint(0, len(live))):
            launch = live.pop(name)
            if rng.random() < 0.3:
                cluster.report(launch, "pull_error", message=NETWORK)
            else:
                cluster.report(launch, "succeeded")
                successes[(launch.node.name, launch.image.hash)] += 1
        if not live and all(scheduler.is_complete(state) for state in scheduler.nodes.values()):
            break
        clock.advance(0.5)

    assert all(scheduler.is_complete(state) for state in scheduler.nodes.values())
    assert len(successes) == len(nodes) * len(images)
    assert set(successes.values()) == {1}
    assert scheduler.inflight == 0


# -- registry rate limit -------------------------------------------------------


def test_registry_bucket_limits_starts() -> None:
    _, clock, cluster = make_scheduler(
        registry_images(REGISTRY, 40),
        [node("n1")],
        max_inflight=100,
        max_inflight_per_node=100,
        registry_qps=2.0,
        registry_burst=2,
    )

    started = [len(cluster.plan())]
    for _ in range(40):
        clock.advance(0.25)
        started.append(len(cluster.plan()))

    # A burst of 2, then one start every 0.5 s for 10 s.
    assert started[0] == 2
    assert sum(started) == 22
    assert max(started[1:]) == 1


def test_registry_bucket_wake_time() -> None:
    scheduler, _, _ = make_scheduler(
        registry_images(REGISTRY, 5), [node("n1")], max_inflight_per_node=10, registry_qps=4.0, registry_burst=2
    )

    launches, wake = scheduler.plan()

    assert len(launches) == 2
    assert wake == pytest.approx(0.25)


# -- the kubelet's pull limit per node -------------------------------------------------


KUBELET_THROTTLED = "pull QPS exceeded"


def test_node_pull_limit_paces_starts() -> None:
    nodes = [node("n1"), node("n2")]
    _, clock, cluster = make_scheduler(
        registry_images(REGISTRY, 30), nodes, max_inflight=100, max_inflight_per_node=100,
        node_pull_qps=5.0, node_pull_burst=10,
    )

    first = cluster.plan()
    # Until a pod's init container has run, each pod also pulls the helper image, so a
    # burst of 10 pulls buys 5 pods per node.
    assert Counter(node_names(first)) == {"n1": 5, "n2": 5}
    for name in ("n1", "n2"):
        cluster.report(next(launch for launch in first if launch.node.name == name), "running")
    started = []
    for _ in range(10):
        clock.advance(0.2)
        started.append(Counter(node_names(cluster.plan())))

    # Then one pull, one pod, every 0.2 s on each node.
    assert all(counts == {"n1": 1, "n2": 1} for counts in started)


def test_node_pull_limit_wake_time() -> None:
    scheduler, clock, cluster = make_scheduler(
        registry_images(REGISTRY, 5), [node("n1")], max_inflight_per_node=10, node_pull_qps=4.0, node_pull_burst=2
    )

    launches, wake = scheduler.plan()
    assert len(launches) == 1
    assert wake == pytest.approx(0.5)

    cluster.create(launches[0])
    cluster.report(launches[0], "running")
    clock.advance(0.5)
    launches, wake = scheduler.plan()
    assert len(launches) == 2
    assert wake == pytest.approx(0.25)


def test_node_pull_limit_zero_disables() -> None:
    _, _, cluster = make_scheduler(
        registry_images(REGISTRY, 30), [node("n1")], max_inflight_per_node=100, max_inflight=100,
        node_pull_qps=0.0, node_pull_burst=1,
    )

    assert len(cluster.plan()) == 30


def test_kubelet_throttled_retries_soon() -> None:
    scheduler, clock, cluster = make_scheduler(
        registry_images(REGISTRY, 4), [node("n1")], max_inflight_per_node=2, registry_qps=10.0, registry_burst=10,
        node_pull_qps=5.0, node_pull_burst=10,
    )
    first, _ = cluster.plan()

    _, failures, _ = cluster.report(first, "pull_error", message=KUBELET_THROTTLED)

    state = scheduler.nodes["n1"]
    assert failures[0].failure is FailureClass.KUBELET_THROTTLED
    assert not failures[0].permanent
    # The registry did not throttle, so its rate stays.
    assert scheduler.buckets[REGISTRY].rate == 10.0
    assert 0.5 <= state.retry_at[first.image.hash] - clock() <= 1.5
    # The kubelet's bucket is empty, so the node's next start waits for one token: the
    # failed pull shows that the helper image is present.
    launches, wake = scheduler.plan()
    assert launches == []
    assert wake == pytest.approx(0.2)
    clock.advance(0.2)
    assert len(cluster.plan()) == 1


def test_launch_failed_refunds_node_tokens() -> None:
    scheduler, _, _ = make_scheduler(
        registry_images(REGISTRY, 3), [node("n1")], max_inflight_per_node=10, node_pull_qps=1.0, node_pull_burst=2
    )
    (launch,), _ = scheduler.plan()

    scheduler.launch_failed(launch, retry_after=5.0)

    (relaunch,), _ = scheduler.plan()
    assert relaunch.image.hash != launch.image.hash


def test_registry_buckets_are_separate() -> None:
    images = registry_images(REGISTRY, 5) + registry_images(OTHER_REGISTRY, 5)
    _, _, cluster = make_scheduler(images, [node("n1")], max_inflight_per_node=10, registry_qps=1.0, registry_burst=1)

    launches = cluster.plan()

    assert sorted(launch.image.resolved.registry for launch in launches) == [OTHER_REGISTRY, REGISTRY]


def test_registry_summary() -> None:
    scheduler, _, cluster = make_scheduler(
        registry_images(REGISTRY, 1), [node("n1")], registry_qps=8.0, registry_burst=8
    )
    (launch,) = cluster.plan()
    cluster.report(launch, "pull_error", message=THROTTLED)

    summary = scheduler.registry_summary()

    assert summary == {REGISTRY: {"rate": 4.0, "maxRate": 8.0, "throttled5m": 1}}


# -- fairness ------------------------------------------------------------------


def test_round_robin_nodes_alternate() -> None:
    _, _, cluster = make_scheduler(
        registry_images(REGISTRY, 10), [node("a"), node("b")], max_inflight=4, max_inflight_per_node=4
    )

    launches = cluster.plan()

    assert sorted(node_names(launches)) == ["a", "a", "b", "b"]


def test_round_robin_new_node_free_capacity() -> None:
    scheduler, _, cluster = make_scheduler(
        registry_images(REGISTRY, 40), [node("a")], max_inflight=8, max_inflight_per_node=4
    )
    assert node_names(cluster.plan()) == ["a"] * 4

    scheduler.set_node(node("b"))

    assert node_names(cluster.plan()) == ["b"] * 4


def test_round_robin_new_node_next_slot() -> None:
    scheduler, _, cluster = make_scheduler(
        registry_images(REGISTRY, 40), [node("a")], max_inflight=4, max_inflight_per_node=4
    )
    first = cluster.plan()
    assert node_names(first) == ["a"] * 4
    scheduler.set_node(node("b"))

    cluster.report(first[0], "succeeded")
    launches = cluster.plan()

    assert node_names(launches) == ["b"]


# -- outcomes ------------------------------------------------------------------


@pytest.mark.parametrize("state", ["running", "succeeded"])
def test_success_marks_done(state: str) -> None:
    scheduler, _, cluster = make_scheduler(registry_images(REGISTRY, 2), [node("n1")])
    first, _ = cluster.plan()

    deletes, failures, finished = cluster.report(first, state)

    node_state = scheduler.nodes["n1"]
    assert (deletes, failures, finished) == ([], [], [])
    assert first.image.hash in node_state.done
    assert first.image.hash in node_state.succeeded
    assert first.image.hash not in node_state.inflight
    assert node_state.dirty
    assert not node_state.complete
    assert scheduler.inflight == 1


def test_success_of_last_image_completes_node() -> None:
    scheduler, _, cluster = make_scheduler(registry_images(REGISTRY, 2), [node("n1")])
    first, second = cluster.plan()
    cluster.report(first, "succeeded")

    _, _, finished = cluster.report(second, "succeeded")

    node_state = scheduler.nodes["n1"]
    assert finished == [node_state]
    assert node_state.complete
    assert scheduler.progress(node_state).as_json() == '{"done": 2, "failed": 0, "inflight": 0, "pending": 0}'


def test_success_repeated_event_ignored() -> None:
    scheduler, _, cluster = make_scheduler(registry_images(REGISTRY, 2), [node("n1")])
    first, _ = cluster.plan()
    cluster.report(first, "running")

    result = cluster.report(first, "succeeded")

    assert result == ([], [], [])
    assert scheduler.inflight == 1


def test_pending_pod_changes_nothing() -> None:
    scheduler, _, cluster = make_scheduler(registry_images(REGISTRY, 1), [node("n1")])
    (launch,) = cluster.plan()

    result = cluster.report(launch, "pending")

    assert result == ([], [], [])
    assert launch.image.hash in scheduler.nodes["n1"].inflight


@pytest.mark.parametrize(
    ("reason", "message", "failure"),
    [
        pytest.param("ErrImagePull", NOT_FOUND, FailureClass.NOT_FOUND, id="not-found"),
        pytest.param("ImagePullBackOff", UNAUTHORIZED, FailureClass.UNAUTHORIZED, id="unauthorized"),
        pytest.param("ErrImagePull", PLATFORM, FailureClass.PLATFORM_MISMATCH, id="platform-mismatch"),
        pytest.param("InvalidImageName", INVALID_NAME, FailureClass.INVALID_NAME, id="invalid-name"),
    ],
)
def test_permanent_failure_stops(reason: str, message: str, failure: FailureClass) -> None:
    scheduler, clock, cluster = make_scheduler(registry_images(REGISTRY, 1), [node("n1")])
    (launch,) = cluster.plan()

    deletes, failures, finished = cluster.report(launch, "pull_error", reason=reason, message=message)

    node_state = scheduler.nodes["n1"]
    assert deletes == [DeletePod(launch.pod_name, f"failed_{failure.value}")]
    assert [(f.failure, f.permanent, f.gave_up) for f in failures] == [(failure, True, False)]
    assert failures[0].registry == REGISTRY
    assert failures[0].message == message
    assert failures[0].node == "n1"
    assert node_state.failed == {launch.image.hash: failure.value}
    assert finished == [node_state]
    assert scheduler.inflight == 0
    clock.advance(3600)
    assert cluster.plan() == []


@pytest.mark.parametrize(
    ("state", "fields", "failure"),
    [
        pytest.param("pull_error", {"message": NETWORK}, FailureClass.NETWORK, id="network"),
        pytest.param("pull_error", {"message": DISK_FULL}, FailureClass.DISK_FULL, id="disk-full"),
        pytest.param("pull_error", {"message": "something odd"}, FailureClass.OTHER, id="other"),
        pytest.param("failed", {}, FailureClass.OTHER, id="pod-failed"),
    ],
)
def test_transient_failure_retries(state: str, fields: dict[str, str], failure: FailureClass) -> None:
    scheduler, clock, cluster = make_scheduler(registry_images(REGISTRY, 1), [node("n1")], retry_initial=5.0)
    (launch,) = cluster.plan()

    deletes, failures, finished = cluster.report(launch, state, **fields)

    node_state = scheduler.nodes["n1"]
    retry_at = node_state.retry_at[launch.image.hash]
    assert deletes == [DeletePod(launch.pod_name, f"failed_{failure.value}")]
    assert [(f.failure, f.permanent, f.gave_up) for f in failures] == [(failure, False, False)]
    assert finished == []
    assert node_state.failed == {}
    assert 2.5 <= retry_at - clock() <= 5.0
    assert cluster.plan() == []
    clock.now = retry_at
    assert hashes(cluster.plan()) == [launch.image.hash]


def test_transient_failure_wake_time() -> None:
    scheduler, clock, cluster = make_scheduler(registry_images(REGISTRY, 1), [node("n1")])
    (launch,) = cluster.plan()
    cluster.report(launch, "pull_error", message=NETWORK)

    _, wake = scheduler.plan()

    assert wake == pytest.approx(scheduler.nodes["n1"].retry_at[launch.image.hash] - clock())


def test_transient_backoff_grows_then_succeeds() -> None:
    scheduler, clock, cluster = make_scheduler(
        registry_images(REGISTRY, 1), [node("n1")], retry_initial=5.0, retry_max=120.0
    )
    node_state = scheduler.nodes["n1"]
    delays = []

    for _ in range(7):
        (launch,) = cluster.plan()
        cluster.report(launch, "pull_error", message=NETWORK)
        retry_at = node_state.retry_at[launch.image.hash]
        delays.append(retry_at - clock())
        clock.now = retry_at

    ceilings = [5.0, 10.0, 20.0, 40.0, 80.0, 120.0, 120.0]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling, (delays, ceilings)
    # Each range [ceiling / 2, ceiling] starts where the previous one ends, until retry_max.
    assert delays[:5] == sorted(delays[:5])

    (launch,) = cluster.plan()
    _, _, finished = cluster.report(launch, "succeeded")
    assert finished == [node_state]
    assert launch.image.hash in node_state.done


def test_deadline_gives_up() -> None:
    scheduler, clock, cluster = make_scheduler(
        registry_images(REGISTRY, 1), [node("n1")], prepull_deadline=100.0, retry_initial=5.0, retry_max=10.0
    )
    node_state = scheduler.nodes["n1"]
    attempts: list[tuple[float, Failure]] = []
    finished: list[NodeState] = []

    while len(attempts) < 50:
        (launch,) = cluster.plan()
        _, failures, finished = cluster.report(launch, "pull_error", message=NETWORK)
        attempts.append((clock() - EPOCH, failures[0]))
        if failures[0].gave_up:
            break
        clock.now = node_state.retry_at[launch.image.hash]

    elapsed, last = attempts[-1]
    assert last.gave_up
    assert not last.permanent
    assert elapsed > 100.0
    assert all(elapsed <= 100.0 for elapsed, _ in attempts[:-1])
    assert not any(failure.gave_up for _, failure in attempts[:-1])
    assert finished == [node_state]
    assert node_state.failed == {launch.image.hash: "network"}
    clock.advance(3600)
    assert cluster.plan() == []


def test_throttled_lowers_registry_rate() -> None:
    images = registry_images(REGISTRY, 2) + registry_images(OTHER_REGISTRY, 1)
    scheduler, clock, cluster = make_scheduler(images, [node("n1")], registry_qps=10.0, registry_burst=10)
    launches = cluster.plan()
    throttled = next(launch for launch in launches if launch.image.resolved.registry == REGISTRY)

    _, failures, _ = cluster.report(throttled, "pull_error", message=THROTTLED)

    retry_in = scheduler.nodes["n1"].retry_at[throttled.image.hash] - clock()
    assert failures[0].failure is FailureClass.THROTTLED
    assert not failures[0].permanent
    assert scheduler.buckets[REGISTRY].rate == 5.0
    assert scheduler.buckets[OTHER_REGISTRY].rate == 10.0
    assert 0.5 <= retry_in <= 1.5


def test_throttled_burst_halves_once() -> None:
    scheduler, _, cluster = make_scheduler(
        registry_images(REGISTRY, 6), [node("n1")], max_inflight_per_node=6, registry_qps=16.0, registry_burst=16
    )

    for launch in cluster.plan():
        cluster.report(launch, "pull_error", message=THROTTLED)

    assert scheduler.buckets[REGISTRY].rate == 8.0


def test_success_raises_registry_rate() -> None:
    scheduler, _, cluster = make_scheduler(
        registry_images(REGISTRY, 2), [node("n1")], registry_qps=10.0, registry_burst=10
    )
    first, second = cluster.plan()
    cluster.report(first, "pull_error", message=THROTTLED)

    cluster.report(second, "succeeded")

    assert scheduler.buckets[REGISTRY].rate == pytest.approx(5.25)


def test_helper_image_failure_not_blamed_on_image() -> None:
    scheduler, _, cluster = make_scheduler(registry_images(REGISTRY, 1), [node("n1")])
    (launch,) = cluster.plan()
    obj = pod_json(
        "n1",
        launch.key,
        launch.image.hash,
        image=str(launch.image.resolved),
        uid=cluster.uids[launch.pod_name],
        helper_state={"waiting": {"reason": "ErrImagePull", "message": "helper.example.com/imgcache:v1: not found"}},
        container_state={"waiting": {"reason": "PodInitializing"}},
    )

    scheduler.pod_changed(pod_from_json(obj))

    assert launch.image.hash not in scheduler.nodes["n1"].failed


# -- pod bookkeeping -------------------------------------------------------------


def test_deleted_pod_events_ignored() -> None:
    scheduler, _, cluster = make_scheduler(registry_images(REGISTRY, 2), [node("n1")])
    failing, other = cluster.plan()
    cluster.report(failing, "pull_error", message=NETWORK)
    assert scheduler.inflight == 1

    again = cluster.report(failing, "pull_error", message=NOT_FOUND)
    scheduler.pod_deleted(cluster.pod(failing, "pull_error", message=NETWORK))

    assert again == ([], [], [])
    assert scheduler.nodes["n1"].failed == {}
    assert scheduler.inflight == 1
    assert list(scheduler.nodes["n1"].inflight) == [other.image.hash]


def test_pod_deleted_by_others_is_relaunched() -> None:
    scheduler, _, cluster = make_scheduler(registry_images(REGISTRY, 1), [node("n1")])
    (launch,) = cluster.plan()
    pod = cluster.pod(launch, "pending")
    scheduler.pod_changed(pod)

    scheduler.pod_deleted(pod)

    assert scheduler.inflight == 0
    assert hashes(cluster.plan()) == [launch.image.hash]


def test_pod_deleted_late_event_of_older_pod() -> None:
    scheduler, clock, cluster = make_scheduler(registry_images(REGISTRY, 1), [node("n1")])
    (launch,) = cluster.plan()
    old = cluster.pod(launch, "pull_error", message=NETWORK)
    scheduler.pod_changed(old)
    clock.now = scheduler.nodes["n1"].retry_at[launch.image.hash]
    (retry,) = cluster.plan()
    scheduler.pod_changed(cluster.pod(retry, "pending"))

    scheduler.pod_deleted(old)

    assert scheduler.nodes["n1"].inflight == {launch.image.hash: launch.pod_name}
    assert scheduler.pods[launch.pod_name].uid == cluster.uids[launch.pod_name]
    assert scheduler.inflight == 1


def test_orphan_pod_deleted_once() -> None:
    scheduler, _, _ = make_scheduler(registry_images(REGISTRY, 1), [node("n1")])
    orphan = pod_from_json(pod_in_state("gone", "0123456789", "abcdef0123", f"{REGISTRY}/app0:v1"))

    # The verdict waits for orphans(), because the pod's node may not be listed yet.
    assert scheduler.pod_changed(orphan) == ([], [], [])
    first = scheduler.orphans()
    scheduler.pod_changed(orphan)
    second = scheduler.orphans()

    assert first == [DeletePod(orphan.name, "orphaned")]
    assert second == []
    assert scheduler.inflight == 0


def test_orphan_pod_already_deleting() -> None:
    scheduler, _, _ = make_scheduler(registry_images(REGISTRY, 1), [node("n1")])
    orphan = pod_from_json(pod_in_state("gone", "0123456789", "abcdef0123", "img", deleting=True))

    assert scheduler.pod_changed(orphan) == ([], [], [])


def test_expired_pod_deleted_and_retried() -> None:
    scheduler, clock, cluster = make_scheduler(registry_images(REGISTRY, 1), [node("n1")], pod_deadline=600.0)
    (launch,) = cluster.plan()
    pod = cluster.pod(launch, "pending")
    scheduler.pod_changed(pod)

    clock.advance(600)
    assert scheduler.expired_pods() == []
    clock.advance(1)
    expired = scheduler.expired_pods()

    node_state = scheduler.nodes["n1"]
    assert expired == [DeletePod(launch.pod_name, "deadline_exceeded")]
    assert scheduler.inflight == 0
    assert scheduler.expired_pods() == []
    assert scheduler.pod_changed(pod) == ([], [], [])
    scheduler.pod_deleted(pod)
    assert scheduler.inflight == 0
    assert cluster.plan() == []
    clock.now = node_state.retry_at[launch.image.hash]
    assert hashes(cluster.plan()) == [launch.image.hash]


def test_launch_failed_releases_slot() -> None:
    scheduler, clock, _ = make_scheduler(registry_images(REGISTRY, 1), [node("n1")], registry_qps=1.0, registry_burst=1)
    launches, _ = scheduler.plan()

    scheduler.launch_failed(launches[0], retry_after=5.0)

    assert scheduler.inflight == 0
    assert scheduler.nodes["n1"].inflight == {}
    assert scheduler.plan()[0] == []
    clock.advance(5.0)
    assert hashes(scheduler.plan()[0]) == hashes(launches)


def test_progress_counts() -> None:
    scheduler, _, cluster = make_scheduler(registry_images(REGISTRY, 4), [node("n1")])
    done, failed, running, _waiting = cluster.plan()
    cluster.report(done, "succeeded")
    cluster.report(failed, "pull_error", message=NOT_FOUND)
    cluster.report(running, "pending")
    scheduler.catalogue.upsert(imagecache_json("more", [f"{REGISTRY}/extra:v1"], namespace="platform"))

    progress = scheduler.progress(scheduler.nodes["n1"])

    assert (progress.done, progress.failed, progress.inflight, progress.pending) == (1, 1, 2, 3)
    assert scheduler.queue_depth() == 1


# -- nodes -------------------------------------------------------------------------


def test_remove_node_returns_deletions() -> None:
    scheduler, _, cluster = make_scheduler(
        registry_images(REGISTRY, 3), [node("n1"), node("n2")], max_inflight_per_node=3
    )
    launches = cluster.plan()
    n1 = [launch for launch in launches if launch.node.name == "n1"]
    cluster.report(n1[0], "succeeded")

    deletes = scheduler.remove_node("n1")

    assert sorted(d.name for d in deletes) == sorted(launch.pod_name for launch in n1)
    assert {d.reason for d in deletes} == {"node_deleted"}
    assert scheduler.inflight == 3
    assert "n1" not in scheduler.nodes
    assert list(scheduler.rotation) == ["n2"]
    assert scheduler.remove_node("n1") == []


def test_warm_nodes_share_one_done_set() -> None:
    images = registry_images(REGISTRY, 3)
    scheduler, _, cluster = make_scheduler(images, [node("cold")])
    all_hashes = sorted(launch.image.hash for launch in cluster.plan())
    scheduler.set_node(node("warm-1", done=all_hashes))
    scheduler.set_node(node("warm-2", done=all_hashes))

    assert scheduler.nodes["warm-1"].done is scheduler.nodes["warm-2"].done
    assert scheduler.nodes["cold"].done == frozenset()


def record_queue_builds(scheduler: Scheduler) -> list[str]:
    """Return a list that grows by a node name each time the scheduler builds that node's queue."""
    built: list[str] = []
    waiting = scheduler._waiting

    def recording(state: NodeState, now: float) -> list[Any]:
        built.append(state.node.name)
        return waiting(state, now)

    scheduler._waiting = recording  # type: ignore[method-assign]
    return built


def test_node_at_cap_reuses_its_queue() -> None:
    scheduler, _, cluster = make_scheduler(
        registry_images(REGISTRY, 10), [node("n1")], max_inflight_per_node=2, node_pull_qps=0.0
    )
    built = record_queue_builds(scheduler)
    first = cluster.plan()
    assert len(first) == 2
    assert scheduler.last_queue_depth == 10

    # At its cap the node starts nothing, so its queue is not built again.
    assert cluster.plan() == []
    assert built == ["n1"]
    assert scheduler.last_queue_depth == 8
    assert "n1" in scheduler.rotation

    cluster.report(first[0], "succeeded")
    (launch,) = cluster.plan()
    assert built == ["n1", "n1"]
    assert launch.image.hash not in hashes(first)


def test_node_out_of_tokens_reuses_its_queue() -> None:
    scheduler, clock, cluster = make_scheduler(
        registry_images(REGISTRY, 5), [node("n1")], max_inflight_per_node=10, node_pull_qps=1.0, node_pull_burst=2
    )
    built = record_queue_builds(scheduler)
    (first,) = cluster.plan()

    assert cluster.plan() == []
    assert built == ["n1"]
    assert scheduler.last_queue_depth == 4

    # Deleted by someone else, the pod's image goes back into the queue.
    cluster.scheduler.pod_deleted(cluster.pod(first, "pending"))
    clock.advance(2.0)
    (again,) = cluster.plan()
    assert built == ["n1", "n1"]
    assert again.image.hash == first.image.hash


def test_idle_nodes_leave_rotation_until_work_returns() -> None:
    scheduler, _, cluster = make_scheduler(registry_images(REGISTRY, 2), max_inflight=200, max_inflight_per_node=2)
    all_hashes = sorted(scheduler.catalogue.images)
    for index in range(50):
        scheduler.set_node(node(f"warm-{index}", done=all_hashes))
    assert cluster.plan() == []
    assert list(scheduler.rotation) == []

    scheduler.set_node(node("new"))
    first = cluster.plan()
    rotation_after_first = list(scheduler.rotation)
    images = [*registry_images(REGISTRY, 2), f"{REGISTRY}/added:v1"]
    scheduler.catalogue.upsert(imagecache_json("images", images, namespace="platform", generation=2))
    second = cluster.plan()

    assert node_names(first) == ["new", "new"]
    assert rotation_after_first == ["new"]
    # "new" has both of its slots taken, so only the warm nodes start the added image.
    assert sorted(node_names(second)) == sorted(f"warm-{index}" for index in range(50))
    assert {launch.image.resolved.repository for launch in second} == {"added"}


def test_progress_of_warm_nodes_follows_catalogue() -> None:
    scheduler, _, _ = make_scheduler(registry_images(REGISTRY, 2))
    all_hashes = sorted(scheduler.catalogue.images)
    scheduler.set_node(node("warm-1", done=all_hashes))
    scheduler.set_node(node("warm-2", done=all_hashes))
    scheduler.set_node(node("half", done=all_hashes[:1]))
    before = {name: scheduler.progress(state) for name, state in scheduler.nodes.items()}

    images = [*registry_images(REGISTRY, 2), f"{REGISTRY}/added:v1"]
    scheduler.catalogue.upsert(imagecache_json("images", images, namespace="platform", generation=2))
    after = {name: scheduler.progress(state) for name, state in scheduler.nodes.items()}

    assert before["warm-1"] == before["warm-2"] == Progress(done=2, pending=0, failed=0, inflight=0)
    assert before["half"] == Progress(done=1, pending=1, failed=0, inflight=0)
    assert after["warm-2"] == Progress(done=2, pending=1, failed=0, inflight=0)
    assert after["half"] == Progress(done=1, pending=2, failed=0, inflight=0)


def test_removed_node_pod_events_harmless() -> None:
    scheduler, _, cluster = make_scheduler(registry_images(REGISTRY, 2), [node("n1"), node("n2")])
    launches = cluster.plan()
    scheduler.remove_node("n1")
    removed_launch = next(launch for launch in launches if launch.node.name == "n1")

    scheduler.pod_deleted(cluster.pod(removed_launch, "pending"))

    assert scheduler.inflight == 2


def test_recreated_node_resets_state() -> None:
    old = node("n1", uid="uid-old")
    scheduler, _, cluster = make_scheduler(registry_images(REGISTRY, 2), [old])
    first, second = cluster.plan()
    cluster.report(first, "succeeded")

    new = node("n1", uid="uid-new")
    deletes = scheduler.set_node(new)

    node_state = scheduler.nodes["n1"]
    assert sorted(d.name for d in deletes) == sorted([first.pod_name, second.pod_name])
    assert node_state.key == node_key(new)
    assert node_state.key != first.key
    assert node_state.done == set()
    assert scheduler.inflight == 0
    relaunched = cluster.plan()
    assert sorted(hashes(relaunched)) == sorted([first.image.hash, second.image.hash])
    assert all(launch.key == node_key(new) for launch in relaunched)
    stale = cluster.report(second, "succeeded")
    assert stale == ([], [], [])
    assert scheduler.orphans() == [DeletePod(second.pod_name, "orphaned")]
    assert scheduler.inflight == 2


def test_set_node_same_uid_merges_annotations() -> None:
    scheduler, _, _ = make_scheduler(
        registry_images(REGISTRY, 3), [node("n1", done=["h1"], failed={"h2": "not_found"})]
    )

    scheduler.set_node(node("n1", done=["h3"], failed={"h2": "other", "h4": "unauthorized"}))

    node_state = scheduler.nodes["n1"]
    assert node_state.done == {"h1", "h3"}
    assert node_state.failed == {"h2": "not_found", "h4": "unauthorized"}
    assert list(scheduler.rotation) == ["n1"]


# -- restart -----------------------------------------------------------------------


def restart_setup() -> tuple[Scheduler, Node, list[str], Pod]:
    """Return a fresh scheduler, a node whose annotations record two of four images,
    and the pod of a third image that an earlier leader created."""
    catalogue = catalogue_of(imagecache_json("images", registry_images(REGISTRY, 4), namespace="platform"))
    image_hashes = [image_named(catalogue, ref).hash for ref in registry_images(REGISTRY, 4)]
    worker = node("n1", done=[image_hashes[0]], failed={image_hashes[1]: "not_found"})
    scheduler, clock = scheduler_for(catalogue, **FAST)
    clock.advance(120)
    key = node_key(worker)
    adopted = pod_from_json(
        pod_in_state("n1", key, image_hashes[2], f"{REGISTRY}/app2:v1", created=EPOCH + 90, uid="before-restart")
    )
    return scheduler, worker, image_hashes, adopted


def test_restart_adopts_and_repeats_nothing() -> None:
    scheduler, worker, image_hashes, adopted = restart_setup()
    scheduler.set_node(worker)

    result = scheduler.pod_changed(adopted)
    launches, _ = scheduler.plan()

    node_state = scheduler.nodes["n1"]
    assert result == ([], [], [])
    assert hashes(launches) == [image_hashes[3]]
    assert node_state.inflight == {image_hashes[2]: adopted.name, image_hashes[3]: launches[0].pod_name}
    assert node_state.first_try[image_hashes[2]] == EPOCH + 90
    assert scheduler.inflight == 2


def test_restart_adopted_pod_completes() -> None:
    scheduler, worker, image_hashes, adopted = restart_setup()
    scheduler.set_node(worker)
    scheduler.pod_changed(adopted)
    (launch,) = scheduler.plan()[0]
    scheduler.pod_changed(launched_pod(launch, state="succeeded", uid="after-restart"))

    finished_pod = pod_in_state("n1", adopted.node_key, adopted.image_hash, adopted.image, state="succeeded")
    finished_pod["metadata"]["uid"] = adopted.uid
    _, _, finished = scheduler.pod_changed(pod_from_json(finished_pod))

    node_state = scheduler.nodes["n1"]
    assert finished == [node_state]
    assert node_state.done == {image_hashes[0], image_hashes[2], image_hashes[3]}
    assert scheduler.plan()[0] == []


def test_restart_pod_seen_before_node() -> None:
    scheduler, worker, image_hashes, adopted = restart_setup()

    scheduler.pod_changed(adopted)
    scheduler.set_node(worker)
    scheduler.pod_changed(adopted)
    launches, _ = scheduler.plan()

    assert hashes(launches) == [image_hashes[3]]


def test_restart_finished_pod_of_done_image_deleted() -> None:
    scheduler, worker, image_hashes, _ = restart_setup()
    scheduler.set_node(worker)
    leftover = pod_from_json(
        pod_in_state("n1", node_key(worker), image_hashes[0], f"{REGISTRY}/app0:v1", state="succeeded")
    )

    deletes, _, _ = scheduler.pod_changed(leftover)

    queued = image_hashes[0] in scheduler.nodes["n1"].succeeded
    assert queued or leftover.name in [delete.name for delete in deletes]


def test_restart_annotated_node_complete_without_pods() -> None:
    catalogue = catalogue_of(imagecache_json("images", registry_images(REGISTRY, 2), namespace="platform"))
    done = [image.hash for image in catalogue.images.values()]
    scheduler, _ = scheduler_for(catalogue, **FAST)

    scheduler.set_node(node("n1", done=done))

    assert scheduler.plan()[0] == []
    assert scheduler.is_complete(scheduler.nodes["n1"])


def test_catalogue_change_reaches_scheduler() -> None:
    scheduler, _, cluster = make_scheduler(registry_images(REGISTRY, 1), [node("n1")])
    cluster.plan()
    catalogue: Catalogue = scheduler.catalogue

    catalogue.upsert(imagecache_json("late", [f"{OTHER_REGISTRY}/late:v1"], namespace="team-b"))

    assert [str(launch.image.resolved) for launch in cluster.plan()] == [f"{OTHER_REGISTRY}/late:v1"]
