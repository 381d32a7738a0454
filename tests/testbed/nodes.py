"""Create, await and delete kwok-managed fake nodes on the test-bed cluster.

imgcache reacts to nodes joining and leaving, so tests need nodes with chosen names,
labels, taints, architectures and operating systems. kwok makes a node Ready only if
it carries the annotation ``kwok.x-k8s.io/node: fake``, and reads the node's
architecture and OS from the ``kubernetes.io/arch`` and ``kubernetes.io/os`` labels,
so every node built here has them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import anyio
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio.client.exceptions import ApiException

from testbed.controlplane import FAKE_NODE_ANNOTATION

JSON = dict[str, Any]
ARCHITECTURES = ("amd64", "arm64")
OPERATING_SYSTEMS = ("linux", "windows")
# Label set on every node made here, so a test can list or clean up exactly those nodes.
TESTBED_LABEL = "testbed.imgcache.io/fake-node"
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def node_manifest(
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    taints: Sequence[Mapping[str, str]] = (),
    arch: str = "amd64",
    os: str = "linux",
    annotations: Mapping[str, str] | None = None,
) -> JSON:
    """Build a fake Node object; raise ValueError for an invalid name, arch, OS or taint.

    Each taint is a mapping with ``key``, optional ``value`` and ``effect``.
    """
    if len(name) > 253 or _NAME_RE.fullmatch(name) is None:
        raise ValueError(f"invalid node name {name!r}: expected a DNS-1123 subdomain")
    if arch not in ARCHITECTURES:
        raise ValueError(f"invalid architecture {arch!r}: expected one of {ARCHITECTURES}")
    if os not in OPERATING_SYSTEMS:
        raise ValueError(f"invalid operating system {os!r}: expected one of {OPERATING_SYSTEMS}")
    for taint in taints:
        if not taint.get("key") or taint.get("effect") not in TAINT_EFFECTS:
            raise ValueError(f"invalid taint {dict(taint)}: needs a key and an effect in {TAINT_EFFECTS}")
    all_labels = {
        TESTBED_LABEL: "true",
        **(labels or {}),
        "kubernetes.io/arch": arch,
        "kubernetes.io/os": os,
        "kubernetes.io/hostname": name,
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": all_labels,
            "annotations": {**(annotations or {}), FAKE_NODE_ANNOTATION: "fake"},
        },
        "spec": {"taints": [dict(t) for t in taints]},
    }


def node_names(prefix: str, count: int, start: int = 0) -> list[str]:
    """Return ``count`` names ``<prefix>-<i>``, zero-padded so they sort in creation order."""
    width = max(len(str(start + count - 1)), 1)
    return [f"{prefix}-{i:0{width}d}" for i in range(start, start + count)]


async def create_nodes(
    api: k8s_client.ApiClient,
    count: int,
    *,
    prefix: str = "fake",
    start: int = 0,
    labels: Mapping[str, str] | None = None,
    taints: Sequence[Mapping[str, str]] = (),
    arch: str = "amd64",
    os: str = "linux",
    annotations: Mapping[str, str] | None = None,
    parallelism: int = 16,
) -> list[str]:
    """Create ``count`` fake nodes named ``<prefix>-<i>`` and return their names.

    Creates at most ``parallelism`` nodes at a time. Raises ApiException, for example
    409 when a node of that name exists.
    """
    names = node_names(prefix, count, start)
    manifests = [
        node_manifest(n, labels=labels, taints=taints, arch=arch, os=os, annotations=annotations) for n in names
    ]
    core = k8s_client.CoreV1Api(api)
    limit = anyio.Semaphore(parallelism)

    async def create(manifest: JSON) -> None:
        async with limit:
            await core.create_node(manifest)

    async with anyio.create_task_group() as group:
        for manifest in manifests:
            group.start_soon(create, manifest)
    return names


def _is_ready(node: Any) -> bool:
    conditions = (node.status.conditions if node.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


async def wait_nodes_ready(
    api: k8s_client.ApiClient, names: Iterable[str], *, deadline: float = 60.0, poll: float = 0.25
) -> None:
    """Wait until every named node reports Ready; raise TimeoutError naming the others."""
    core = k8s_client.CoreV1Api(api)
    pending = set(names)
    try:
        with anyio.fail_after(deadline):
            while pending:
                listing = await core.list_node(label_selector=TESTBED_LABEL)
                ready = {n.metadata.name for n in listing.items if _is_ready(n)}
                pending -= ready
                if pending:
                    await anyio.sleep(poll)
    except TimeoutError:
        shown = ", ".join(sorted(pending)[:5])
        raise TimeoutError(
            f"{len(pending)} nodes not Ready after {deadline:.0f} s (first: {shown}); "
            "check that kwok runs and its log in the cluster folder"
        ) from None


async def delete_nodes(
    api: k8s_client.ApiClient,
    names: Iterable[str],
    *,
    wait: bool = True,
    deadline: float = 60.0,
    parallelism: int = 16,
) -> None:
    """Delete the named nodes, ignoring those already gone; optionally wait until they are."""
    core = k8s_client.CoreV1Api(api)
    targets = list(names)
    limit = anyio.Semaphore(parallelism)

    async def delete(name: str) -> None:
        async with limit:
            try:
                await core.delete_node(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise

    async with anyio.create_task_group() as group:
        for name in targets:
            group.start_soon(delete, name)
    if not wait:
        return
    remaining = set(targets)
    with anyio.fail_after(deadline):
        while remaining:
            listing = await core.list_node(label_selector=TESTBED_LABEL)
            remaining &= {n.metadata.name for n in listing.items}
            if remaining:
                await anyio.sleep(0.25)


class NodeFactory:
    """Creates fake nodes and remembers them, so ``cleanup`` deletes exactly those."""

    def __init__(self, api: k8s_client.ApiClient, prefix: str) -> None:
        self.api = api
        self.prefix = prefix
        self.created: list[str] = []
        self._next = 0

    async def create(
        self,
        count: int = 1,
        *,
        prefix: str | None = None,
        ready: bool = True,
        deadline: float = 60.0,
        **options: Any,
    ) -> list[str]:
        """Create ``count`` nodes, by default waiting until they are Ready; return their names.

        ``options`` are create_nodes' keyword arguments (labels, taints, arch, os, annotations).
        Names continue one sequence per factory unless ``prefix`` is given.
        """
        start = 0 if prefix is not None else self._next
        try:
            names = await create_nodes(self.api, count, prefix=prefix or self.prefix, start=start, **options)
        finally:
            # Record every name that may exist, so cleanup also removes a partial batch.
            self.created += node_names(prefix or self.prefix, count, start)
            if prefix is None:
                self._next += count
        if ready:
            await wait_nodes_ready(self.api, names, deadline=deadline)
        return names

    async def delete(self, names: Iterable[str], wait: bool = True) -> None:
        targets = list(names)
        await delete_nodes(self.api, targets, wait=wait)
        self.created = [n for n in self.created if n not in set(targets)]

    async def cleanup(self) -> None:
        """Delete every node this factory created and wait until they are gone."""
        if self.created:
            await delete_nodes(self.api, self.created, wait=True)
            self.created = []
