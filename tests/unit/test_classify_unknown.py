"""Kubelet pull errors the classifier has no rule for.

Runtimes and kubelet releases word their errors differently, and new wordings appear.
Such a message must become the class ``other``, be retried and be logged once, and
never raise. The same holds for the kubelet's own pull-error reasons besides
ErrImagePull and ImagePullBackOff, which must not leave a pod waiting until its deadline.
"""

from __future__ import annotations

import pytest
import structlog

from imgcache.catalogue import Catalogue
from imgcache.classify import FailureClass, classify, hint
from imgcache.metrics import Metrics
from imgcache.model import pod_from_json
from imgcache.prepull import PrepullWorker
from imgcache.scheduler import Scheduler
from unit.factories import catalogue_of, imagecache_json, node, pod_in_state, registry_images, scheduler_for

REGISTRY = "registry.example.com"

NOVEL_MESSAGES = [
    pytest.param(
        'rpc error: code = Unknown desc = failed to pull and unpack image "registry.example.com/app0:v1": '
        "unexpected media type application/vnd.example.future.v9+json for sha256:" + "c" * 64,
        id="unknown-media-type",
    ),
    pytest.param("", id="empty"),
    pytest.param("Fehler beim Abrufen des Images: Zeitüberschreitung der Prüfsumme ✗", id="non-english"),
    pytest.param('{"error": {"code": "E_WEIRD", "detail": [1, 2, {"x": null}]}}', id="json-text"),
    pytest.param("%s %d {0} {image} \\x00 ${HOME}", id="format-characters"),
    pytest.param("layer verification failed: " + "x" * 100_000, id="100k-characters"),
    pytest.param(
        "image pull failed for registry.example.com/app0:v1 because the signature validation failed: "
        "no trusted signature",
        id="signature",
    ),
]


def launched(scheduler: Scheduler):  # type: ignore[no-untyped-def]
    launches, _ = scheduler.plan()
    assert len(launches) == 1
    return launches[0]


def setup() -> tuple[Scheduler, Catalogue]:
    catalogue = catalogue_of(imagecache_json("team", registry_images(REGISTRY, 1)))
    scheduler, _ = scheduler_for(catalogue, registry_qps=1000.0, registry_burst=1000)
    scheduler.set_node(node("n1"))
    return scheduler, catalogue


@pytest.mark.parametrize("message", NOVEL_MESSAGES)
def test_novel_message_is_other(message: str) -> None:
    assert classify(message, "ErrImagePull") is FailureClass.OTHER
    assert hint(FailureClass.OTHER, REGISTRY)


@pytest.mark.parametrize("message", NOVEL_MESSAGES)
@pytest.mark.parametrize("reason", ["ErrImagePull", "ImagePullBackOff", "ImageInspectError"])
def test_novel_message_retried(message: str, reason: str) -> None:
    scheduler, _ = setup()
    launch = launched(scheduler)
    pod = pod_from_json(
        pod_in_state("n1", launch.key, launch.image.hash, str(launch.image.resolved), "pull_error",
                     reason=reason, message=message)
    )

    deletes, failures, finished = scheduler.pod_changed(pod)

    state = scheduler.nodes["n1"]
    assert [d.name for d in deletes] == [launch.pod_name]
    assert [f.failure for f in failures] == [FailureClass.OTHER]
    assert failures[0].permanent is False
    assert failures[0].message == message
    assert finished == []
    assert state.failed == {}
    assert launch.image.hash in state.retry_at


def test_registry_unavailable_is_network() -> None:
    scheduler, _ = setup()
    launch = launched(scheduler)
    message = "image pull failed for registry.example.com/app0:v1 because the registry is unavailable"
    pod = pod_from_json(
        pod_in_state("n1", launch.key, launch.image.hash, str(launch.image.resolved), "pull_error",
                     reason="RegistryUnavailable", message=message)
    )

    _, failures, _ = scheduler.pod_changed(pod)

    assert [f.failure for f in failures] == [FailureClass.NETWORK]
    assert failures[0].permanent is False


def test_novel_message_logged_once() -> None:
    scheduler, catalogue = setup()
    worker = PrepullWorker(None, scheduler, catalogue, Metrics(), "imgcache-system", "helper:1", True, 600, 1.0)  # type: ignore[arg-type]
    message = "the runtime returned an error text that no rule matches"
    with structlog.testing.capture_logs() as logs:
        for attempt in range(3):
            launch = launched(scheduler)
            pod = pod_from_json(
                pod_in_state("n1", launch.key, launch.image.hash, str(launch.image.resolved), "pull_error",
                             message=message, uid=f"uid-{attempt}")
            )
            worker.pod_upserted(pod)
            scheduler.pod_deleted(pod)
            scheduler.nodes["n1"].retry_at.clear()

    failures = [entry for entry in logs if entry["event"] == "pull.failed"]
    assert len(failures) == 1
    assert failures[0]["failure_class"] == "other"
    assert failures[0]["message"] == message
    assert failures[0]["hint"]
    assert worker.failures.repeats[("n1", failures[0]["image"], "other")] == 2
