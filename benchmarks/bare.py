"""Minimal Kubernetes clients written with aiohttp alone, the baselines of scenario 3.

``python -m benchmarks.bare watch-create`` watches nodes and creates a fixed number of
pods for each new node at once. ``python -m benchmarks.bare create`` creates a fixed number of pods with a fixed
number of requests in flight and prints its timing as JSON. Both authenticate with the
token of imgcache's ServiceAccount and send the same shape of pod that imgcache sends,
so each does the least work that imgcache's job needs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

JSON = dict[str, Any]
BARE_LABEL = "bench.imgcache.io/bare"


class Client:
    """One keep-alive aiohttp session to the API server of a token kubeconfig."""

    def __init__(self, kubeconfig: Path, pool: int) -> None:
        config = json.loads(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        self.server = cluster["server"]
        self.headers = {"Authorization": f"Bearer {config['users'][0]['user']['token']}",
                        "Accept": "application/json", "Content-Type": "application/json"}
        context = ssl.create_default_context(cafile=cluster["certificate-authority"])
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=pool),
                                             headers=self.headers)

    async def close(self) -> None:
        await self.session.close()

    async def create_pod(self, namespace: str, body: JSON) -> int:
        url = f"{self.server}/api/v1/namespaces/{namespace}/pods"
        async with self.session.post(url, data=json.dumps(body)) as response:
            await response.read()
            return response.status


def pod_body(name: str, node: str, node_uid: str, image: str, helper_image: str) -> JSON:
    """Build a pod of the same shape and size as an imgcache prepull pod."""
    security = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"}}
    resources = {"requests": {"cpu": "1m", "memory": "4Mi"}, "limits": {"cpu": "10m", "memory": "16Mi"}}
    mount = {"name": "helper", "mountPath": "/helper"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {BARE_LABEL: "true", "bench.imgcache.io/node": node[-60:]},
            "annotations": {"bench.imgcache.io/image": image},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid}],
        },
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "hostNetwork": True,
            "activeDeadlineSeconds": 600,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 0,
            "tolerations": [{"operator": "Exists"}],
            "securityContext": {k: security[k] for k in ("runAsNonRoot", "runAsUser", "runAsGroup",
                                                         "seccompProfile")},
            "initContainers": [{"name": "install-helper", "image": helper_image, "imagePullPolicy": "IfNotPresent",
                                "command": ["/helper/busybox", "cp"], "volumeMounts": [mount],
                                "resources": resources, "securityContext": security}],
            "containers": [{"name": "prepull", "image": image, "imagePullPolicy": "IfNotPresent",
                            "command": ["/helper/busybox", "true"], "volumeMounts": [{**mount, "readOnly": True}],
                            "resources": resources, "securityContext": security}],
            "volumes": [{"name": "helper", "emptyDir": {"sizeLimit": "16Mi"}}],
        },
    }


async def watch_create(args: argparse.Namespace) -> None:
    """Create ``--per-node`` pods at once for every node that joins, until SIGTERM."""
    client = Client(args.kubeconfig, pool=16)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks: set[asyncio.Task[int]] = set()
    try:
        url = f"{client.server}/api/v1/nodes"
        params = {"labelSelector": args.selector, "limit": "1"}
        async with client.session.get(url, params=params) as response:
            version = (await response.json())["metadata"]["resourceVersion"]
        params = {"labelSelector": args.selector, "watch": "true", "resourceVersion": version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": "3600"}
        async with client.session.get(url, params=params, timeout=aiohttp.ClientTimeout(total=None)) as response:
            print("watching", flush=True)
            reader = asyncio.ensure_future(_read_events(response, client, args, tasks))
            waiter = asyncio.ensure_future(stop.wait())
            await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
            reader.cancel()
    finally:
        await client.close()


async def _read_events(response: aiohttp.ClientResponse, client: Client, args: argparse.Namespace,
                       tasks: set[asyncio.Task[int]]) -> None:
    async for line in response.content:
        if not line.strip():
            continue
        event = json.loads(line)
        if event["type"] != "ADDED":
            continue
        meta = event["object"]["metadata"]
        for index in range(args.per_node):
            body = pod_body(f"bare-{meta['name']}-{index:03d}", meta["name"], meta["uid"], f"{args.image}-{index:03d}",
                            args.helper_image)
            task = asyncio.ensure_future(client.create_pod(args.namespace, body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


async def create(args: argparse.Namespace) -> None:
    """Create pods for every (node, image) pair with ``concurrency`` requests in flight; print timing."""
    client = Client(args.kubeconfig, pool=args.concurrency)
    nodes = json.loads(args.nodes.read_text())
    bodies = [pod_body(f"bare-{node['name']}-{index:03d}", node["name"], node["uid"],
                       f"{args.image}-{index:03d}", args.helper_image)
              for node in nodes for index in range(args.per_node)]
    queue: asyncio.Queue[JSON] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    statuses: dict[int, int] = {}

    async def worker() -> None:
        while not queue.empty():
            status = await client.create_pod(args.namespace, queue.get_nowait())
            statuses[status] = statuses.get(status, 0) + 1

    started = time.monotonic()
    try:
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    finally:
        await client.close()
    elapsed = time.monotonic() - started
    print(json.dumps({"pods": len(bodies), "seconds": elapsed, "statuses": statuses}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare", description=__doc__)
    parser.add_argument("--kubeconfig", type=Path, required=True, help="kubeconfig with a bearer token")
    parser.add_argument("--namespace", default="imgcache-system", help="namespace of the created pods")
    parser.add_argument("--image", default="bare.registry.bench/bench/image:v1", help="image of the pods")
    parser.add_argument("--helper-image", default="ghcr.io/imgcache/imgcache-helper:0.1.0", help="init container image")
    commands = parser.add_subparsers(dest="command", required=True)
    watch = commands.add_parser("watch-create", help="create pods for each node that joins")
    watch.add_argument("--selector", required=True, help="label selector of the nodes to react to")
    watch.add_argument("--per-node", type=int, default=1, help="pods created at once per node (default 1)")
    burst = commands.add_parser("create", help="create pods for a list of nodes and print the timing")
    burst.add_argument("--nodes", type=Path, required=True, help="JSON file: list of {name, uid}")
    burst.add_argument("--per-node", type=int, required=True, help="pods per node")
    burst.add_argument("--concurrency", type=int, required=True, help="requests in flight")
    args = parser.parse_args(argv)
    asyncio.run(watch_create(args) if args.command == "watch-create" else create(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
