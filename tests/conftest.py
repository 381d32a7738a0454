"""Shared pytest fixtures: one local control plane per session and what tests build on it.

Starting etcd, kube-apiserver, controller-manager, scheduler and kwok takes several
seconds, so the ``cluster`` fixture starts them once per session, and only when a
test requests it. Unit tests never start it. Every other fixture is per test and
removes what it created: namespaces, fake nodes, API clients and the simulated
kubelet, which runs in the test's own event loop.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import warnings
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from testbed.controlplane import REPO, ControlPlane
from testbed.kubelet import KubeletConfig, SimulatedKubelet
from testbed.nodes import NodeFactory

# Label on every namespace the ``namespace`` fixture creates.
TEST_NAMESPACE_LABEL = "testbed.imgcache.io/test"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def start_plane(plane: ControlPlane) -> None:
    """Run ``plane.up()`` without the ResourceWarnings of its released Popen objects.

    ``ControlPlane.start`` keeps only the pid of each component, so Python warns that a
    subprocess is still running when the Popen object is freed, and the suite turns
    warnings into errors. The components are tracked by pid files and stopped by ``down``.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "subprocess .* is still running", ResourceWarning)
        plane.up()


@pytest.fixture(scope="session")
def cluster() -> Iterator[ControlPlane]:
    """Start a control plane in ``.cluster/test-<random>``; stop it and remove the folder after."""
    directory = REPO / ".cluster" / f"test-{secrets.token_hex(4)}"
    plane = ControlPlane(directory)
    try:
        start_plane(plane)
        yield plane
    finally:
        try:
            plane.down()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


async def new_api_client(plane: ControlPlane, pool_size: int = 64) -> k8s_client.ApiClient:
    """Return an ApiClient for the cluster's admin kubeconfig; the caller closes it."""
    configuration = k8s_client.Configuration()
    await k8s_config.load_kube_config(config_file=str(plane.kubeconfig), client_configuration=configuration)
    # Watches hold connections, and the simulated kubelet writes from many pods at once.
    configuration.connection_pool_maxsize = pool_size
    return k8s_client.ApiClient(configuration)


@pytest.fixture
async def api_client(cluster: ControlPlane) -> AsyncIterator[k8s_client.ApiClient]:
    """An admin (system:masters) ApiClient, closed after the test."""
    api = await new_api_client(cluster)
    async with api:
        yield api


@pytest.fixture
async def namespace(api_client: k8s_client.ApiClient) -> AsyncIterator[str]:
    """Name of a fresh namespace whose ``default`` ServiceAccount exists; deleted after the test.

    The deletion is not awaited: the namespace controller finishes it in the background.
    """
    core = k8s_client.CoreV1Api(api_client)
    name = f"t-{secrets.token_hex(4)}"
    body = {"metadata": {"name": name, "labels": {TEST_NAMESPACE_LABEL: "true"}}}
    await core.create_namespace(body)
    # The API server rejects pods until the ServiceAccount controller made "default".
    with anyio.fail_after(30):
        while True:
            try:
                await core.read_namespaced_service_account("default", name)
                break
            except ApiException as exc:
                if exc.status != 404:
                    raise
                await anyio.sleep(0.1)
    yield name
    with contextlib.suppress(ApiException):
        await core.delete_namespace(name)


@pytest.fixture
async def nodes(api_client: k8s_client.ApiClient) -> AsyncIterator[NodeFactory]:
    """A NodeFactory with a unique name prefix; deletes the nodes it created after the test."""
    factory = NodeFactory(api_client, prefix=f"n{secrets.token_hex(3)}")
    yield factory
    await factory.cleanup()


@pytest.fixture
def kubelet_config() -> KubeletConfig:
    """Simulator settings for tests: small images, fast back-off, quick node status.

    Override this fixture in a test module, or change ``kubelet.config`` in a test;
    profiles, registries and failure rules apply from the next pull on.
    """
    return KubeletConfig(
        node_bandwidth=10_000_000,
        default_image_size=1_000_000,
        backoff_initial=0.5,
        backoff_max=4.0,
        resync_delay=0.2,
        node_status_interval=1.0,
    )


@pytest.fixture
async def kubelet(api_client: k8s_client.ApiClient, kubelet_config: KubeletConfig) -> AsyncIterator[SimulatedKubelet]:
    """A running SimulatedKubelet that handles every pod on every fake node during the test."""
    sim = SimulatedKubelet(api_client, kubelet_config)
    async with sim.running():
        yield sim
