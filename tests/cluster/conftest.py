"""Fixtures that run imgcache itself against the session's control plane.

The manifests are applied once per session, exactly as a user applies them, and every
controller process authenticates with a token of the ``imgcache`` ServiceAccount. After
each test, everything imgcache and the test created is removed, so tests sharing the
cluster cannot see each other's objects.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from kubernetes_asyncio import client as k8s_client

from testbed.controller import NAMESPACE, ControllerProcess, install_manifests, kubectl, service_account_kubeconfig
from testbed.controlplane import ControlPlane

StartController = Callable[..., Awaitable[ControllerProcess]]


@pytest.fixture(scope="session")
def installed(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Apply manifests/ and return a kubeconfig holding the imgcache ServiceAccount's token."""
    install_manifests(cluster)
    return service_account_kubeconfig(cluster, tmp_path_factory.mktemp("imgcache") / "kubeconfig")


def cleanup_imgcache(plane: ControlPlane) -> None:
    kubectl(plane, "delete", "imagecaches", "--all", "--all-namespaces", "--wait=true", "--timeout=60s", check=False)
    kubectl(
        plane,
        "-n",
        NAMESPACE,
        "delete",
        "daemonsets,pods",
        "-l",
        "app.kubernetes.io/managed-by=imgcache",
        "--grace-period=0",
        "--force",
        "--wait=true",
        "--timeout=60s",
        check=False,
    )
    kubectl(plane, "-n", NAMESPACE, "delete", "lease", "imgcache-leader", "--ignore-not-found", check=False)
    # One deletecollection request; `kubectl delete events --all` deletes them one by one.
    kubectl(plane, "delete", "--raw", f"/api/v1/namespaces/{NAMESPACE}/events", check=False)


@pytest.fixture
async def start_controller(cluster: ControlPlane, installed: Path, tmp_path: Path) -> AsyncIterator[StartController]:
    """Return ``await start(*args, identity=...)``, which starts imgcache and waits until ready."""
    processes: list[ControllerProcess] = []

    async def start(*args: str, identity: str | None = None, ready: bool = True) -> ControllerProcess:
        name = identity or f"imgcache-{secrets.token_hex(3)}"
        process = ControllerProcess(installed, tmp_path / f"{name}.log", list(args), name).start()
        processes.append(process)
        if ready:
            await anyio.to_thread.run_sync(process.wait_ready)
        return process

    yield start
    for process in processes:
        await anyio.to_thread.run_sync(process.kill)
    await anyio.to_thread.run_sync(cleanup_imgcache, cluster)


@pytest.fixture
async def custom(api_client: k8s_client.ApiClient) -> k8s_client.CustomObjectsApi:
    return k8s_client.CustomObjectsApi(api_client)
