"""Bad input to imgcache, and the limits of what it may do.

Every case checks three things: nothing crashes, everything else keeps working, and
the user learns what is wrong. The API server tells when the object is applied, the
ImageCache status tells later, or one error line tells when the process starts. The
security cases check the pods imgcache creates and its RBAC: each granted verb is taken
away in turn, and a named behaviour must then fail.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio.client.exceptions import ApiException

from cluster.helpers import eventually, image_cache
from testbed.controller import HELPER_IMAGE, NAMESPACE, SERVICE_ACCOUNT, ControllerProcess, kubectl
from testbed.controlplane import REPO, ControlPlane, free_port
from testbed.kubelet import FailureKind, FailureRule, ImageProfile, RegistryProfile

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

FAST = ("--pin-debounce=0.5", "--status-interval=1", "--progress-interval=0.5", "--retry-initial=0.5",
        "--retry-max=2")
NO_PINNER = ("--pinner=false",)
PREPULL_SELECTOR = "app.kubernetes.io/component=prepull"
PINNER_SELECTOR = "app.kubernetes.io/component=pinner"
SERVICE_ACCOUNT_USER = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
GROUP, VERSION, PLURAL = "imgcache.io", "v1alpha1", "imagecaches"


# -- helpers ---------------------------------------------------------------


async def create_cache(custom, namespace: str, name: str, images: list[dict[str, object]], **spec: object) -> None:
    body = image_cache(name, images, **spec)
    await custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


async def read_cache(custom, namespace: str, name: str) -> dict[str, object]:
    result: dict[str, object] = await custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return result


async def node_progress(api, name: str) -> dict[str, int] | None:
    node = await k8s_client.CoreV1Api(api).read_node(name)
    raw = (node.metadata.annotations or {}).get("imgcache.io/prepull-progress")
    return json.loads(raw) if raw else None


async def warm(api, name: str, done: int) -> bool:
    progress = await node_progress(api, name)
    return progress is not None and progress["done"] == done and progress["pending"] == 0


async def pods(api, selector: str) -> list[k8s_client.V1Pod]:
    core = k8s_client.CoreV1Api(api)
    return (await core.list_namespaced_pod(NAMESPACE, label_selector=selector)).items


async def no_prepull_pods(api) -> bool:
    return not await pods(api, PREPULL_SELECTOR)


async def pinner_daemonsets(api) -> list[k8s_client.V1DaemonSet]:
    apps = k8s_client.AppsV1Api(api)
    return (await apps.list_namespaced_daemon_set(NAMESPACE, label_selector=PINNER_SELECTOR)).items


def cache_condition(cache: dict[str, object], kind: str) -> dict[str, str]:
    status = cache.get("status") or {}
    for item in status.get("conditions") or []:  # type: ignore[union-attr]
        if item.get("type") == kind:
            return item  # type: ignore[no-any-return]
    return {}


def apply_yaml(plane: ControlPlane, namespace: str, body: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """Apply ``body`` as a user does, with kubectl's strict field validation; return the result."""
    return subprocess.run(
        [str(plane.binary("kubectl")), f"--kubeconfig={plane.kubeconfig}", "-n", namespace, "apply", "-f", "-"],
        input=json.dumps(body),
        capture_output=True,
        text=True,
        timeout=60,
    )


def logged(controller: ControllerProcess, event: str, **fields: object) -> list[dict[str, object]]:
    return [
        entry
        for entry in controller.logs()
        if entry.get("event") == event and all(entry.get(key) == value for key, value in fields.items())
    ]


def checked(condition: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    """Wrap a plain condition for ``eventually``, which awaits its check."""

    async def check() -> object:
        return condition()

    return check


# -- ImageCache objects ----------------------------------------------------


@pytest.mark.parametrize(
    ("images", "field"),
    [
        pytest.param([{"image": "quay.io/Team/App:v1"}], "spec.images[0].image", id="uppercase-repository"),
        pytest.param([{"image": "quay.io/team/app:v 1"}], "spec.images[0].image", id="space"),
        pytest.param([{"image": ""}], "spec.images[0].image", id="empty"),
        pytest.param([{"image": "quay.io/team/app:" + "t" * 200}], "spec.images[0].image", id="long-tag"),
        pytest.param([{"pin": True}], "spec.images[0].image", id="missing-image"),
        pytest.param([{"image": "quay.io/team/app:v1", "platforms": ["amd64"]}], "spec.images[0].platforms[0]",
                     id="bad-platform"),
        pytest.param([{"image": "quay.io/team/app:v1"}, {"image": "quay.io/team/app:v1"}], "spec.images[1]",
                     id="duplicate"),
        pytest.param([], "spec.images", id="no-images"),
        pytest.param([{"image": f"quay.io/team/app{i}:v1"} for i in range(257)], "spec.images", id="257-entries"),
        pytest.param([{"image": "quay.io/team/app:v1", "tagg": "v2"}], "spec.images[0].tagg", id="unknown-field"),
    ],
)
async def test_invalid_cache_rejected(cluster, namespace, installed, images, field):
    body = image_cache("rejected", images)
    result = await anyio.to_thread.run_sync(apply_yaml, cluster, namespace, body)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


async def test_unknown_fields_pruned(api_client, cluster, custom, namespace, nodes, kubelet, start_controller):
    body = image_cache("pruned", [{"image": "quay.io/team/pruned:v1", "tagg": "v2"}], replicas=3)
    # The Python client sends no fieldValidation, so the API server warns and prunes.
    await custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    stored = await read_cache(custom, namespace, "pruned")
    await start_controller(*FAST, *NO_PINNER)
    (name,) = await nodes.create(1)
    await eventually(lambda: warm(api_client, name, 1))
    assert "replicas" not in stored["spec"]  # type: ignore[operator]
    assert "tagg" not in stored["spec"]["images"][0]  # type: ignore[index]


async def test_invalid_entries_in_status(api_client, custom, namespace, nodes, kubelet, start_controller):
    too_long = "quay.io/" + "a" * 300 + ":v1"
    short_digest = "quay.io/team/app@sha256:" + "a" * 32
    controller = await start_controller(*FAST, *NO_PINNER)
    await create_cache(custom, namespace, "mixed", [
        {"image": too_long},
        {"image": short_digest},
        {"image": "quay.io/team/idle:v1", "pin": False, "prepull": False},
        {"image": "quay.io/team/good:v1"},
    ])
    await create_cache(custom, namespace, "valid", [{"image": "quay.io/team/other:v1"}])
    (name,) = await nodes.create(1)
    await eventually(lambda: warm(api_client, name, 2))

    async def reported() -> dict[str, object] | None:
        cache = await read_cache(custom, namespace, "mixed")
        return cache if cache_condition(cache, "Degraded").get("reason") == "InvalidEntries" else None

    cache = await eventually(reported, timeout=30)
    entries = cache["status"]["images"]  # type: ignore[index]
    core = k8s_client.CoreV1Api(api_client)

    async def three_warnings() -> list[object] | None:
        # The Warning Events follow the status write, one request each.
        listing = await core.list_namespaced_event(
            namespace, field_selector="involvedObject.name=mixed,reason=InvalidEntry"
        )
        return listing.items if len(listing.items) >= 3 else None

    events = await eventually(three_warnings, timeout=30)
    assert "255" in entries[0]["error"]
    assert "digest" in entries[1]["error"]
    assert "pin and prepull are both false" in entries[2]["error"]
    assert "error" not in entries[3]
    assert entries[3]["cached"] == 1
    assert cache_condition(cache, "Degraded")["status"] == "True"
    assert cache["status"]["imageCount"] == 1  # type: ignore[index]
    assert len(events) == 3
    assert controller.process.poll() is None


async def test_spelling_duplicates_merged(api_client, custom, namespace, nodes, kubelet, start_controller):
    kubelet.set_registry("docker.io", RegistryProfile(images=ImageProfile(pull_seconds=0.3)))
    await start_controller(*FAST, *NO_PINNER)
    await create_cache(custom, namespace, "spellings", [
        {"image": "nginx"},
        {"image": "docker.io/library/nginx:latest"},
        {"image": "index.docker.io/library/nginx"},
    ])
    await create_cache(custom, namespace, "again", [{"image": "nginx:latest"}])
    (name,) = await nodes.create(1)
    await eventually(lambda: warm(api_client, name, 1))

    async def counted() -> dict[str, object] | None:
        cache = await read_cache(custom, namespace, "spellings")
        images = (cache.get("status") or {}).get("images") or []  # type: ignore[union-attr]
        return cache if len(images) == 3 and all(i.get("cached") == 1 for i in images) else None

    cache = await eventually(counted, timeout=30)
    pulls = [r for r in kubelet.pull_log if r.node == name and r.image == "docker.io/library/nginx:latest"]
    assert {i["resolved"] for i in cache["status"]["images"]} == {"docker.io/library/nginx:latest"}  # type: ignore[index]
    assert cache["status"]["imageCount"] == 1  # type: ignore[index]
    assert len(pulls) == 1


async def test_cache_deleted_while_in_use(api_client, custom, namespace, nodes, kubelet, start_controller):
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=3.0)))
    controller = await start_controller(*FAST, "--max-inflight-per-node=2")
    await create_cache(custom, namespace, "doomed", [{"image": f"quay.io/team/doomed{i}:v1"} for i in range(6)])
    await create_cache(custom, namespace, "keeper", [{"image": "ghcr.io/team/keeper:v1"}])
    (first,) = await nodes.create(1)
    await eventually(lambda: pods(api_client, PREPULL_SELECTOR))
    await eventually(lambda: pinner_daemonsets(api_client))

    await custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "doomed")
    (late,) = await nodes.create(1)

    async def pinned_images() -> set[str]:
        return {c.image for ds in await pinner_daemonsets(api_client) for c in ds.spec.template.spec.containers}

    await eventually(lambda: warm(api_client, late, 1), timeout=60)
    await eventually(lambda: warm(api_client, first, 1), timeout=60)
    assert await eventually(lambda: no_prepull_pods(api_client), timeout=30)
    assert await eventually(lambda: _only_keeper(pinned_images), timeout=30)
    assert controller.process.poll() is None
    # The pinner DaemonSet may still pin the deleted images on the new node until its
    # update rolls out, so only prepull pods count here.
    prepulled = [r.image for r in kubelet.pull_log if r.node == late and "/imgcache-prepull-" in r.pod]
    assert not any(image.startswith("quay.io/team/doomed") for image in prepulled)


async def _only_keeper(pinned_images) -> bool:  # type: ignore[no-untyped-def]
    return await pinned_images() == {"ghcr.io/team/keeper:v1"}


# -- process start: flags, environment, kubeconfig -------------------------


def run_imgcache(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str]:
    """Run ``python -m imgcache run`` to its end; return the exit code and stdout plus stderr."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("IMGCACHE_", "AWS_", "KUBERNETES_", "POD_"))}
    argv = [sys.executable, "-m", "imgcache", "run", "--http-address=127.0.0.1", f"--http-port={free_port()}", *args]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env={**base, **(env or {})},
                                timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"imgcache {args} did not exit within {timeout:.0f} s: {error.output!r}") from None
    return result.returncode, result.stdout + result.stderr


def lines_naming(output: str, value: str) -> list[str]:
    return [line for line in output.splitlines() if value in line]


@pytest.mark.parametrize(
    ("args", "env", "value"),
    [
        pytest.param(["--max-inflight=zero"], {}, "'zero'", id="not-a-number"),
        pytest.param(["--max-inflight=0"], {}, "--max-inflight", id="zero"),
        pytest.param(["--http-port=70000"], {}, "70000", id="port"),
        pytest.param(["--log-level=loud"], {}, "loud", id="log-level"),
        pytest.param(["--namespace=Not_A_Namespace"], {}, "Not_A_Namespace", id="namespace"),
        pytest.param(["--startup-taint=bad key!"], {}, "bad key!", id="taint-key"),
        pytest.param(["--leader-election=maybe"], {}, "maybe", id="boolean"),
        pytest.param(["--lease-duration=5", "--renew-deadline=10"], {}, "--renew-deadline", id="lease-order"),
        pytest.param(["--watch-timeout=100", "--watch-read-timeout=50"], {}, "--watch-read-timeout",
                     id="watch-timeouts"),
        pytest.param(["--max-inflight=2", "--max-inflight-per-node=5"], {}, "--max-inflight-per-node",
                     id="per-node-cap"),
        pytest.param(["--pull-through-rule=garbage"], {}, "garbage", id="pull-through-rule"),
        pytest.param(["--no-such-flag"], {}, "--no-such-flag", id="unknown-flag"),
        pytest.param([], {"IMGCACHE_MAX_INFLIGHT": "lots"}, "IMGCACHE_MAX_INFLIGHT", id="env-number"),
        pytest.param([], {"IMGCACHE_PREPULL": "perhaps"}, "IMGCACHE_PREPULL", id="env-boolean"),
        pytest.param([], {"IMGCACHE_REGISTRY_QPS": "-1"}, "IMGCACHE_REGISTRY_QPS", id="env-negative"),
        pytest.param([], {"POD_NAMESPACE": "Bad_NS"}, "Bad_NS", id="pod-namespace"),
        pytest.param(["--kubeconfig=/nonexistent/kubeconfig"], {}, "/nonexistent/kubeconfig", id="missing-kubeconfig"),
    ],
)
async def test_bad_setting_exits(args, env, value):
    code, output = await anyio.to_thread.run_sync(lambda: run_imgcache([f"--helper-image={HELPER_IMAGE}", *args], env))
    assert code == 2
    assert len(lines_naming(output, value)) == 1, output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("{{{ not yaml", id="syntax"),
        pytest.param("just some text\n", id="text"),
        pytest.param("- a\n- b\n", id="list"),
        pytest.param("", id="empty"),
        pytest.param("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n", id="no-context"),
        pytest.param("\x00\x01\x02binary", id="binary"),
    ],
)
async def test_garbage_kubeconfig_exits(tmp_path, content):
    path = tmp_path / "kubeconfig"
    path.write_text(content)
    code, output = await anyio.to_thread.run_sync(
        lambda: run_imgcache([f"--kubeconfig={path}", f"--helper-image={HELPER_IMAGE}"])
    )
    assert code == 2
    assert len(lines_naming(output, str(path))) == 1, output
    assert "Traceback" not in output


def _with_server_and_token(source: Path, target: Path, server: str | None = None, token: str | None = None) -> Path:
    config = json.loads(source.read_text())
    if server is not None:
        config["clusters"][0]["cluster"]["server"] = server
    if token is not None:
        config["users"][0]["user"]["token"] = token
    target.write_text(json.dumps(config))
    target.chmod(0o600)
    return target


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def service_account_token(plane: ControlPlane, expires: float) -> str:
    """Sign a token of imgcache's ServiceAccount with the cluster's own signing key.

    ``kubectl create token`` cannot make a token that is already expired, so the test
    signs one itself with the claims the API server checks.
    """
    uid = kubectl(plane, "-n", NAMESPACE, "get", "serviceaccount", SERVICE_ACCOUNT, "-o", "jsonpath={.metadata.uid}")
    issuer = "https://kubernetes.default.svc.cluster.local"
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": [issuer],
        "sub": SERVICE_ACCOUNT_USER,
        "iat": min(now, int(expires) - 600),
        "nbf": min(now, int(expires) - 600),
        "exp": int(expires),
        "kubernetes.io": {"namespace": NAMESPACE, "serviceaccount": {"name": SERVICE_ACCOUNT, "uid": uid}},
    }
    header = {"alg": "RS256", "typ": "JWT"}
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    key = serialization.load_pem_private_key((plane.pki / "sa.key").read_bytes(), password=None)
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg]
    return f"{signing_input}.{_b64url(signature)}"


def list_nodes_status(plane: ControlPlane, token: str) -> int:
    """Return the HTTP status of listing nodes with ``token`` alone, which anonymous requests may not do."""
    request = urllib.request.Request(
        f"{plane.info().server}/api/v1/nodes?limit=1", headers={"Authorization": f"Bearer {token}"}
    )
    # No client certificate, so the token is the only credential.
    context = ssl.create_default_context(cafile=str(plane.pki / "ca.crt"))
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


async def test_unreachable_server_exits(cluster, installed, tmp_path):
    refused = f"https://127.0.0.1:{free_port()}"
    # etcd's client port speaks plain HTTP, so the TLS handshake fails.
    not_tls = f"https://127.0.0.1:{cluster.info().etcd_port}"
    for index, server in enumerate((refused, not_tls)):
        path = _with_server_and_token(installed, tmp_path / f"server-{index}", server=server)
        code, output = await anyio.to_thread.run_sync(
            lambda path=path: run_imgcache([f"--kubeconfig={path}", f"--helper-image={HELPER_IMAGE}"])
        )
        assert code == 2, output
        assert len(lines_naming(output, server)) == 1, output
        assert "cannot reach the API server" in output
        assert "Traceback" not in output


async def test_rejected_token_exits(cluster, installed, tmp_path):
    expired = await anyio.to_thread.run_sync(service_account_token, cluster, time.time() - 60)
    fresh = await anyio.to_thread.run_sync(service_account_token, cluster, time.time() + 600)
    # The same signature with a future expiry is accepted, so only the expiry differs.
    fresh_status = await anyio.to_thread.run_sync(list_nodes_status, cluster, fresh)
    expired_status = await anyio.to_thread.run_sync(list_nodes_status, cluster, expired)
    for label, token in (("invalid", "not-a-token"), ("expired", expired)):
        path = _with_server_and_token(installed, tmp_path / f"{label}-token", token=token)
        code, output = await anyio.to_thread.run_sync(
            lambda path=path: run_imgcache([f"--kubeconfig={path}", f"--helper-image={HELPER_IMAGE}"])
        )
        assert code == 2, output
        assert len(lines_naming(output, str(path))) == 1, output
        assert "401" in output
        assert token not in output
        assert "Traceback" not in output
    assert fresh_status == 200
    assert expired_status == 401


# -- pods imgcache creates ------------------------------------------------------


def container_problems(container: k8s_client.V1Container, pod_context: k8s_client.V1PodSecurityContext) -> list[str]:
    """Return every way a container falls short of the restricted Pod Security level."""
    context = container.security_context or k8s_client.V1SecurityContext()
    problems = []
    non_root = context.run_as_non_root if context.run_as_non_root is not None else pod_context.run_as_non_root
    if not non_root:
        problems.append("runAsNonRoot is not true")
    if context.allow_privilege_escalation is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if context.read_only_root_filesystem is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if context.privileged:
        problems.append("privileged")
    if "ALL" not in ((context.capabilities and context.capabilities.drop) or []):
        problems.append("capabilities do not drop ALL")
    if (context.capabilities and context.capabilities.add) or []:
        problems.append("capabilities added")
    seccomp = context.seccomp_profile or pod_context.seccomp_profile
    if seccomp is None or seccomp.type != "RuntimeDefault":
        problems.append("seccomp profile is not RuntimeDefault")
    return problems


def pod_problems(pod: k8s_client.V1Pod) -> list[str]:
    spec = pod.spec
    problems = []
    if spec.automount_service_account_token is not False:
        problems.append("automountServiceAccountToken is not false")
    if spec.host_pid or spec.host_ipc:
        problems.append("host PID or IPC namespace")
    if any(v.host_path for v in spec.volumes or []):
        problems.append("hostPath volume")
    pod_context = spec.security_context or k8s_client.V1PodSecurityContext()
    for container in (spec.init_containers or []) + spec.containers:
        problems += [f"{container.name}: {p}" for p in container_problems(container, pod_context)]
    return problems


async def dry_run_create(api, namespace: str, pod: k8s_client.V1Pod, host_network: bool) -> str:
    """Create a copy of ``pod`` in ``namespace`` with dryRun=All; return "" or the rejection."""
    body = api.sanitize_for_serialization(pod)
    body["metadata"] = {"name": "admission-check", "labels": body["metadata"].get("labels")}
    body.pop("status", None)
    # Admission computes these from priorityClassName and rejects a copy that sets them.
    body["spec"].pop("priority", None)
    body["spec"].pop("preemptionPolicy", None)
    body["spec"]["hostNetwork"] = host_network
    try:
        await k8s_client.CoreV1Api(api).create_namespaced_pod(namespace, body, dry_run="All")
    except ApiException as error:
        return str(error.body)
    return ""


async def test_created_pods_locked_down(api_client, custom, namespace, nodes, kubelet, start_controller):
    kubelet.set_registry("quay.io", RegistryProfile(images=ImageProfile(pull_seconds=5.0)))
    await start_controller(*FAST)
    await create_cache(custom, namespace, "locked", [{"image": "quay.io/team/locked:v1"}])
    await nodes.create(1)
    prepull = (await eventually(lambda: pods(api_client, PREPULL_SELECTOR), timeout=30))[0]  # type: ignore[index]
    pinner = (await eventually(lambda: pods(api_client, PINNER_SELECTOR), timeout=60))[0]  # type: ignore[index]

    core = k8s_client.CoreV1Api(api_client)
    labels = (await core.read_namespace(NAMESPACE)).metadata.labels
    # A namespace that enforces the restricted level, to run both pods through admission.
    await core.patch_namespace(namespace, {"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }}})
    results = {}
    for kind, pod in (("prepull", prepull), ("pinner", pinner)):
        results[kind] = (
            pod_problems(pod),
            pod.spec.host_network,
            await dry_run_create(api_client, namespace, pod, host_network=False),
            await dry_run_create(api_client, namespace, pod, host_network=True),
        )

    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert labels["pod-security.kubernetes.io/audit"] == "restricted"
    for kind, (problems, host_network, without_host, with_host) in results.items():
        assert problems == [], f"{kind} pod: {problems}"
        assert host_network is True, f"{kind} pod: hostNetwork is the documented default"
        assert without_host == "", f"{kind} pod without hostNetwork was rejected: {without_host}"
        assert "hostNetwork" in with_host, f"{kind} pod with hostNetwork: {with_host!r}"


# -- RBAC ----------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """One verb on one resource in imgcache's ClusterRole or Role."""

    role: str  # "ClusterRole" or "Role"
    group: str
    resource: str
    verb: str

    def can_i(self) -> list[str]:
        """Return the ``kubectl auth can-i`` arguments that check this grant."""
        resource, _, subresource = self.resource.partition("/")
        target = f"{resource}.{self.group}" if self.group else resource
        args = [self.verb, target]
        if subresource:
            args.append(f"--subresource={subresource}")
        if self.group == "coordination.k8s.io" and self.verb in ("get", "update"):
            args = [self.verb, f"{target}/imgcache-leader"]
        return [*args, f"--as={SERVICE_ACCOUNT_USER}", "-n", NAMESPACE]


def role_object(plane: ControlPlane, role: str) -> dict[str, object]:
    args = ["get", "clusterrole", "imgcache"] if role == "ClusterRole" else ["-n", NAMESPACE, "get", "role", "imgcache"]
    obj: dict[str, object] = json.loads(kubectl(plane, *args, "-o", "json"))
    for field in ("resourceVersion", "uid", "creationTimestamp", "managedFields", "generation"):
        obj["metadata"].pop(field, None)  # type: ignore[union-attr]
    return obj


def without(obj: dict[str, object], grants: Iterable[Grant]) -> dict[str, object]:
    """Return a copy of a role object with the grants' verbs removed from every rule."""
    copy = json.loads(json.dumps(obj))
    rules = []
    for rule in copy["rules"]:
        for grant in grants:
            if grant.group in rule.get("apiGroups", []) and grant.resource in rule.get("resources", []):
                rule["verbs"] = [v for v in rule["verbs"] if v != grant.verb]
        if rule["verbs"]:
            rules.append(rule)
    copy["rules"] = rules
    return copy


def can_i(plane: ControlPlane, grant: Grant) -> bool:
    return kubectl(plane, "auth", "can-i", *grant.can_i(), check=False).strip() == "yes"


@asynccontextmanager
async def revoked(plane: ControlPlane, *grants: Grant) -> AsyncIterator[None]:
    """Remove the grants from the installed roles, wait until RBAC applies it, and restore after."""
    roles = sorted({g.role for g in grants})
    saved = {role: await anyio.to_thread.run_sync(role_object, plane, role) for role in roles}
    try:
        for role in roles:
            edited = without(saved[role], [g for g in grants if g.role == role])
            await anyio.to_thread.run_sync(lambda e=edited: kubectl(plane, "replace", "-f", "-", input=json.dumps(e)))
        for grant in grants:
            await eventually(checked(lambda g=grant: not can_i(plane, g)), timeout=15, interval=0.3)
        yield
    finally:
        for role in roles:
            await anyio.to_thread.run_sync(
                lambda r=role: kubectl(plane, "replace", "-f", "-", input=json.dumps(saved[r]))
            )
        for grant in grants:
            await eventually(checked(lambda g=grant: can_i(plane, g)), timeout=15, interval=0.3)


def clusterrole(group: str, resource: str, verb: str) -> Grant:
    return Grant("ClusterRole", group, resource, verb)


def role(group: str, resource: str, verb: str) -> Grant:
    return Grant("Role", group, resource, verb)


async def test_rbac_no_wildcards(cluster, installed):
    for kind in ("ClusterRole", "Role"):
        obj = await anyio.to_thread.run_sync(role_object, cluster, kind)
        for rule in obj["rules"]:  # type: ignore[union-attr]
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), f"{kind} rule {rule} has a wildcard in {field}"


async def test_rbac_cannot_read_secrets(cluster, installed):
    answer = await anyio.to_thread.run_sync(
        lambda: kubectl(cluster, "auth", "can-i", "get", "secrets", f"--as={SERVICE_ACCOUNT_USER}", "-A", check=False)
    )
    assert answer.strip() == "no"


# Role, API group and resource of every watch but the ImageCache one, which the pod
# watch waits for.
WATCHED = (("ClusterRole", "", "nodes"), ("Role", "", "pods"), ("Role", "apps", "daemonsets"), ("Role", "", "events"))


@pytest.mark.parametrize("verb", ["list", "watch"])
async def test_rbac_list_watch_needed(cluster, installed, start_controller, verb):
    resources = {resource for _, _, resource in WATCHED}
    async with revoked(cluster, *(Grant(kind, group, resource, verb) for kind, group, resource in WATCHED)):
        controller = await start_controller(*FAST, ready=False)

        async def all_logged() -> set[str]:
            found = {str(e["resource"]) for e in logged(controller, "watch.forbidden")}
            return found if found >= resources else set()

        found = await eventually(all_logged, timeout=30)
        status, _ = await anyio.to_thread.run_sync(controller.get, "/readyz")
    lines = logged(controller, "watch.forbidden", resource="nodes")
    assert found == resources
    assert "grant list and watch on nodes" in str(lines[0]["hint"])
    assert controller.process.poll() is None
    if verb == "list":
        assert status == 503
    else:
        assert status == 200


@pytest.mark.parametrize("verb", ["list", "watch"])
async def test_rbac_imagecaches_needed(cluster, installed, start_controller, verb):
    async with revoked(cluster, clusterrole("imgcache.io", "imagecaches", verb)):
        controller = await start_controller(*FAST, ready=False)
        lines = await eventually(lambda: _logged_async(controller, "watch.forbidden", resource="imagecaches"),
                                 timeout=30)
    assert "imagecaches" in str(lines[0]["hint"])  # type: ignore[index]
    assert controller.process.poll() is None


async def _logged_async(controller: ControllerProcess, event: str, **fields: object) -> list[dict[str, object]]:
    return logged(controller, event, **fields)


async def test_rbac_create_pods_and_delete_daemonsets(api_client, cluster, custom, namespace, nodes, kubelet,
                                                      start_controller):
    await create_cache(custom, namespace, "create", [{"image": "quay.io/team/create:v1"}])
    async with revoked(cluster, role("", "pods", "create"), role("apps", "daemonsets", "delete")):
        controller = await start_controller(*FAST)
        (name,) = await nodes.create(1)
        await eventually(lambda: pinner_daemonsets(api_client), timeout=30)
        await custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "create")
        create_lines = await eventually(
            lambda: _logged_async(controller, "api.forbidden", verb="create", resource="pods"), timeout=30
        )
        delete_lines = await eventually(lambda: _logged_async(controller, "pinner.delete_failed", status=403),
                                        timeout=30)
        prepull = await pods(api_client, PREPULL_SELECTOR)
        daemonsets = await pinner_daemonsets(api_client)
    assert prepull == []
    assert daemonsets != []
    assert "grant 'create' on pods" in str(create_lines[0]["hint"])  # type: ignore[index]
    assert delete_lines
    assert await node_progress(api_client, name) is None


async def test_rbac_patch_nodes_delete_pods_events(api_client, cluster, custom, namespace, nodes, kubelet,
                                                   start_controller):
    kubelet.add_failure(FailureRule(FailureKind.NOT_FOUND, image="quay.io/team/missing:v1"))
    await create_cache(custom, namespace, "patch", [
        {"image": "quay.io/team/good:v1"},
        {"image": "quay.io/team/missing:v1"},
        {"image": "quay.io/team/app@sha256:" + "a" * 32},
    ])
    grants = (
        clusterrole("", "nodes", "patch"),
        role("", "pods", "delete"),
        clusterrole("", "events", "create"),
        role("apps", "daemonsets", "create"),
    )
    async with revoked(cluster, *grants):
        controller = await start_controller(*FAST)
        (name,) = await nodes.create(1)
        patch_lines = await eventually(
            lambda: _logged_async(controller, "api.forbidden", verb="patch", resource="nodes"), timeout=30
        )
        delete_lines = await eventually(
            lambda: _logged_async(controller, "api.forbidden", verb="delete", resource="pods"), timeout=30
        )
        event_lines = await eventually(lambda: _logged_async(controller, "event.create_failed"), timeout=30)
        # Server-side apply that creates an object needs create as well as patch.
        apply_lines = await eventually(lambda: _logged_async(controller, "pinner.apply_failed", status=403),
                                       timeout=30)
        progress = await node_progress(api_client, name)
        daemonsets = await pinner_daemonsets(api_client)
        failed_pods = [p for p in await pods(api_client, PREPULL_SELECTOR)
                       if p.metadata.annotations.get("imgcache.io/image") == "quay.io/team/missing:v1"]
    assert progress is None
    assert failed_pods != []
    assert "grant 'patch' on nodes" in str(patch_lines[0]["hint"])  # type: ignore[index]
    assert delete_lines
    assert event_lines
    assert "cannot create resource" in str(apply_lines[0]["error"])  # type: ignore[index]
    assert daemonsets == []
    assert controller.process.poll() is None


async def test_rbac_deletecollection_and_patch_daemonsets(api_client, cluster, custom, namespace, nodes, kubelet,
                                                          start_controller):
    await create_cache(custom, namespace, "collect", [{"image": "quay.io/team/collect:v1"}])
    grants = (role("", "pods", "deletecollection"), role("apps", "daemonsets", "patch"))
    async with revoked(cluster, *grants):
        controller = await start_controller(*FAST)
        (name,) = await nodes.create(1)
        lines = await eventually(
            lambda: _logged_async(controller, "api.forbidden", verb="deletecollection", resource="pods"), timeout=30
        )
        apply_lines = await eventually(lambda: _logged_async(controller, "pinner.apply_failed", status=403),
                                       timeout=30)
        progress = await node_progress(api_client, name)
        finished = await pods(api_client, PREPULL_SELECTOR)
        daemonsets = await pinner_daemonsets(api_client)
    assert progress is not None
    assert progress["done"] == 1
    assert [p.status.phase for p in finished] == ["Succeeded"]
    assert daemonsets == []
    assert lines
    assert apply_lines


@pytest.mark.parametrize("verb", ["create", "get"])
async def test_rbac_lease_acquire_needs(api_client, cluster, custom, namespace, nodes, kubelet, start_controller,
                                        verb):
    await anyio.to_thread.run_sync(
        lambda: kubectl(cluster, "-n", NAMESPACE, "delete", "lease", "imgcache-leader", "--ignore-not-found")
    )
    await create_cache(custom, namespace, "lease", [{"image": "quay.io/team/lease:v1"}])
    async with revoked(cluster, role("coordination.k8s.io", "leases", verb)):
        controller = await start_controller(*FAST, *NO_PINNER, "--retry-period=0.5", "--renew-deadline=2",
                                            "--lease-duration=3")
        await nodes.create(1)
        lines = await eventually(lambda: _logged_async(controller, "leader.acquire_failed", status=403), timeout=30)
        await anyio.sleep(2)
        leader = await anyio.to_thread.run_sync(controller.metrics)
        prepull = await pods(api_client, PREPULL_SELECTOR)
    assert lines
    assert "imgcache_leader 0.0" in leader
    assert prepull == []
    assert controller.process.poll() is None


async def test_rbac_lease_update_needed(cluster, installed, start_controller):
    await anyio.to_thread.run_sync(
        lambda: kubectl(cluster, "-n", NAMESPACE, "delete", "lease", "imgcache-leader", "--ignore-not-found")
    )
    async with revoked(cluster, role("coordination.k8s.io", "leases", "update")):
        controller = await start_controller(*FAST, *NO_PINNER, "--retry-period=0.5", "--renew-deadline=2",
                                            "--lease-duration=3", ready=False)
        assert controller.process is not None
        code = await anyio.to_thread.run_sync(lambda: controller.process.wait(30))  # type: ignore[union-attr]
    assert code == 1
    assert logged(controller, "leader.elected")
    assert logged(controller, "leader.renew_failed", status=403)
    assert logged(controller, "leader.lost")


async def test_rbac_get_pods_needed(cluster, installed, tmp_path):
    async with revoked(cluster, role("", "pods", "get")):
        code, output = await anyio.to_thread.run_sync(
            lambda: run_imgcache([f"--kubeconfig={installed}", f"--namespace={NAMESPACE}"],
                                 {"POD_NAME": "imgcache-0"})
        )
    assert code == 2
    assert len(lines_naming(output, "imgcache-0")) == 1, output
    assert "403" in output
    assert "--helper-image" in output


async def test_rbac_status_patch_needed(api_client, cluster, custom, namespace, nodes, kubelet, start_controller):
    await create_cache(custom, namespace, "status", [{"image": "quay.io/team/status:v1"}])
    async with revoked(cluster, clusterrole("imgcache.io", "imagecaches/status", "patch")):
        controller = await start_controller(*FAST, *NO_PINNER)
        (name,) = await nodes.create(1)
        await eventually(lambda: warm(api_client, name, 1))
        lines = await eventually(lambda: _logged_async(controller, "status.write_failed", status=403), timeout=30)
        cache = await read_cache(custom, namespace, "status")
    assert lines
    assert "status" not in cache
