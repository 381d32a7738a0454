"""The benchmark's own control plane, imgcache processes and the objects both need.

The suite starts a fresh control plane in ``.cluster/bench-<random>`` so it shares no
state with the tests or the demo that other people run on the same machine, and
removes it at the end. imgcache runs as a separate process with the token of its
ServiceAccount, exactly as in the cluster tests.
"""

from __future__ import annotations

import inspect
import json
import secrets
import shutil
import ssl
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.machine import revision
from testbed.controller import NAMESPACE, ControllerProcess, install_manifests, kubectl, service_account_kubeconfig
from testbed.controlplane import REPO, ControlPlane

JSON = dict[str, Any]
BENCH_NAMESPACE = "bench"
# Label on every node the suite creates; its value names the scenario and group.
GROUP_LABEL = "bench.imgcache.io/group"
EXISTING_LABEL = "bench.imgcache.io/existing"

# FlowSchemas that put every request of imgcache's ServiceAccount into one of three
# flows, so the API server's own counters attribute requests to imgcache alone. APF
# classifies a watch request under the verb "watch", and imgcache uses leases only
# for leader election. All three use the workload-low priority level, the level of
# the default "service-accounts" schema that imgcache's requests match on a stock
# cluster.
FLOW_WATCH = "bench-imgcache-watch"
FLOW_LEASE = "bench-imgcache-lease"
FLOW_OTHER = "bench-imgcache-other"
_FLOW_SCHEMAS = [
    (FLOW_WATCH, 100, {"verbs": ["watch"], "apiGroups": ["*"], "resources": ["*"], "clusterScope": True,
                       "namespaces": ["*"]}),
    (FLOW_LEASE, 101, {"verbs": ["*"], "apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                       "namespaces": ["*"]}),
    (FLOW_OTHER, 102, {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "clusterScope": True,
                       "namespaces": ["*"]}),
]


def _flow_schema(name: str, precedence: int, rule: JSON) -> JSON:
    rules: JSON = {
        "subjects": [{"kind": "ServiceAccount", "serviceAccount": {"name": "imgcache", "namespace": NAMESPACE}}],
        "resourceRules": [rule],
    }
    if name == FLOW_OTHER:
        rules["nonResourceRules"] = [{"verbs": ["*"], "nonResourceURLs": ["*"]}]
    return {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "FlowSchema",
        "metadata": {"name": name},
        "spec": {
            "matchingPrecedence": precedence,
            "priorityLevelConfiguration": {"name": "workload-low"},
            "distinguisherMethod": {"type": "ByUser"},
            "rules": [rules],
        },
    }


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse Prometheus text into {(sample name, sorted labels): value}."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def metric_sum(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum the samples of one name whose labels include ``labels``."""
    total = 0.0
    for (sample, sample_labels), value in samples.items():
        if sample != name:
            continue
        present = dict(sample_labels)
        if all(present.get(k) == v for k, v in labels.items()):
            total += value
    return total


@dataclass
class BenchCluster:
    """A control plane started for one benchmark run, with imgcache's manifests applied."""

    root: Path
    plane: ControlPlane = field(init=False)
    kubeconfig: Path = field(init=False)
    api: k8s_client.ApiClient | None = None
    controllers: list[ControllerProcess] = field(default_factory=list)
    # The commit and uncommitted imgcache/ files each controller started from, by name,
    # because other people may commit while the suite runs.
    revisions: dict[str, JSON] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.plane = ControlPlane(REPO / ".cluster" / f"bench-{secrets.token_hex(4)}")
        self.kubeconfig = self.root / "imgcache.kubeconfig"

    # -- lifecycle -----------------------------------------------------------

    def up(self) -> None:
        """Start the control plane, apply manifests/ and the FlowSchemas, write the SA kubeconfig."""
        with warnings.catch_warnings():
            # ControlPlane keeps only pid files of its components, so freeing the Popen
            # objects warns that they still run; `down` stops them by pid.
            warnings.filterwarnings("ignore", "subprocess .* is still running", ResourceWarning)
            self.plane.up()
        install_manifests(self.plane)
        service_account_kubeconfig(self.plane, self.kubeconfig)
        schemas = [_flow_schema(*spec) for spec in _FLOW_SCHEMAS]
        kubectl(self.plane, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                   "items": schemas}))
        kubectl(self.plane, "create", "namespace", BENCH_NAMESPACE)
        # A cluster that nodes join has nodes already. imgcache's pinner writes DaemonSets
        # only for platforms that have nodes, so this one makes them exist before a node joins.
        existing = plain_node("bench-existing", {EXISTING_LABEL: "true"})
        kubectl(self.plane, "create", "-f", "-", input=json.dumps(existing))
        # Pods are admitted only once the ServiceAccount controller made "default".
        deadline = time.monotonic() + 60
        while not kubectl(self.plane, "-n", BENCH_NAMESPACE, "get", "serviceaccount", "default", "-o", "name",
                          check=False).strip():
            if time.monotonic() > deadline:
                raise TimeoutError(f"ServiceAccount {BENCH_NAMESPACE}/default was not created within 60 s")
            time.sleep(0.2)

    def down(self) -> None:
        for process in self.controllers:
            process.kill()
        self.controllers.clear()
        try:
            self.plane.down()
        finally:
            shutil.rmtree(self.plane.directory, ignore_errors=True)

    async def connect(self, pool_size: int = 64) -> k8s_client.ApiClient:
        configuration = k8s_client.Configuration()
        await k8s_config.load_kube_config(config_file=str(self.plane.kubeconfig), client_configuration=configuration)
        configuration.connection_pool_maxsize = pool_size
        self.api = k8s_client.ApiClient(configuration)
        return self.api

    def versions(self) -> JSON:
        info = self.plane.info()
        with urllib.request.urlopen(f"{info.server}/version", timeout=5, context=self.plane.ssl_context()) as reply:
            version = json.loads(reply.read())
        return {"kubernetes": version.get("gitVersion"), "go": version.get("goVersion")}

    # -- API server metrics --------------------------------------------------

    def apiserver_metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Read and parse the API server's /metrics with the admin client certificate."""
        context: ssl.SSLContext = self.plane.ssl_context()
        url = f"{self.plane.info().server}/metrics"
        with urllib.request.urlopen(url, timeout=30, context=context) as reply:
            return parse_metrics(reply.read().decode())

    def imgcache_requests(self) -> dict[str, float]:
        """Return the requests the API server dispatched for imgcache, by flow (watch, lease, other)."""
        samples = self.apiserver_metrics()
        name = "apiserver_flowcontrol_dispatched_requests_total"
        return {
            "watch": metric_sum(samples, name, flow_schema=FLOW_WATCH),
            "lease": metric_sum(samples, name, flow_schema=FLOW_LEASE),
            "other": metric_sum(samples, name, flow_schema=FLOW_OTHER),
            "all_clients": metric_sum(samples, "apiserver_request_total"),
        }

    # -- imgcache ------------------------------------------------------------

    async def start_controller(self, name: str, args: Iterable[str], profile: Path | None = None) -> ControllerProcess:
        """Start ``imgcache run`` with ``args``, optionally under cProfile, and wait until it leads."""
        await self.reset_leader()
        self.revisions[name] = revision(REPO)
        process = ControllerProcess(self.kubeconfig, self.root / f"{name}.log", list(args), name)
        if profile is not None:
            # argv is [python, -m, imgcache, run, ...], and cProfile runs the same module.
            process.argv[1:1] = ["-m", "cProfile", "-o", str(profile)]
        process.start()
        self.controllers.append(process)
        await anyio.to_thread.run_sync(lambda: process.wait_ready(120.0))
        await poll(lambda: "imgcache_leader 1.0" in process.metrics(), 60, f"imgcache {name} to lead", 0.1)
        return process

    async def stop_controller(self, process: ControllerProcess) -> int:
        code = await anyio.to_thread.run_sync(process.stop)
        if process in self.controllers:
            self.controllers.remove(process)
        return code

    async def reset_leader(self) -> None:
        kubectl(self.plane, "-n", NAMESPACE, "delete", "lease", "imgcache-leader", "--ignore-not-found")

    async def cleanup_imgcache(self) -> None:
        """Delete ImageCaches, imgcache's DaemonSets and pods, and every pod the suite created."""
        plane = self.plane
        kubectl(plane, "delete", "imagecaches", "--all", "--all-namespaces", "--wait=true", "--timeout=120s",
                check=False)
        for namespace in (NAMESPACE, BENCH_NAMESPACE):
            kubectl(plane, "-n", namespace, "delete", "daemonsets", "--all", "--wait=true", "--timeout=120s",
                    check=False)
            kubectl(plane, "delete", "--raw", f"/api/v1/namespaces/{namespace}/pods?gracePeriodSeconds=0",
                    check=False)
            kubectl(plane, "delete", "--raw", f"/api/v1/namespaces/{namespace}/events", check=False)

    async def cleanup_after_failure(self) -> None:
        """Stop every controller and remove what a failed scenario left, so the next one starts clean."""
        for process in list(self.controllers):
            await self.stop_controller(process)
        await self.cleanup_imgcache()
        await self.delete_nodes(GROUP_LABEL)

    # -- objects -------------------------------------------------------------

    async def create_image_cache(self, name: str, images: list[str], node_selector: Mapping[str, str]) -> None:
        assert self.api is not None
        body = {
            "apiVersion": "imgcache.io/v1alpha1",
            "kind": "ImageCache",
            "metadata": {"name": name},
            "spec": {"images": [{"image": image} for image in images], "nodeSelector": dict(node_selector)},
        }
        custom = k8s_client.CustomObjectsApi(self.api)
        await custom.create_namespaced_custom_object("imgcache.io", "v1alpha1", BENCH_NAMESPACE, "imagecaches", body)

    async def delete_nodes(self, selector: str, timeout: float = 300.0) -> None:
        """Delete the nodes matching a label selector and wait until they are gone."""
        assert self.api is not None
        core = k8s_client.CoreV1Api(self.api)
        await core.delete_collection_node(label_selector=selector)

        async def gone() -> bool:
            return not (await core.list_node(label_selector=selector, limit=1)).items

        await poll(gone, timeout, f"nodes {selector} to be deleted")


async def poll(check: Callable[[], Any], timeout: float, description: str, interval: float = 0.5) -> Any:
    """Call ``check`` (sync or async) until it returns a truthy value; return it or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {description}")
        await anyio.sleep(interval)


def plain_node(name: str, labels: Mapping[str, str], annotations: Mapping[str, str] | None = None) -> JSON:
    """Build a Node that neither kwok nor the simulated kubelet manages: it stays as created.

    Such nodes cost the control plane nothing after creation, so thousands of them fit
    on this machine. Their pods are never started.
    """
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {**labels, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                       "kubernetes.io/hostname": name},
            "annotations": dict(annotations or {}),
        },
    }


async def create_node_objects(api: k8s_client.ApiClient, bodies: list[JSON], parallelism: int = 16) -> None:
    core = k8s_client.CoreV1Api(api)
    limit = anyio.Semaphore(parallelism)

    async def create(body: JSON) -> None:
        async with limit:
            for attempt in range(5):
                try:
                    await core.create_node(body)
                    return
                except ApiException as error:
                    if error.status == 409:
                        return
                    if (error.status < 500 and error.status != 429) or attempt == 4:
                        raise
                await anyio.sleep(0.5 * 2**attempt)

    async with anyio.create_task_group() as group:
        for body in bodies:
            group.start_soon(create, body)


def read_rss(pid: int) -> int:
    """Return the resident set size of a process in bytes, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS line in /proc/{pid}/status")


def controller_metrics(process: ControllerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return parse_metrics(process.metrics())

