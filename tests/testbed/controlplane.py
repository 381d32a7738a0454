"""Start and stop a local Kubernetes control plane on 127.0.0.1.

One cluster is a folder: certificates, etcd data, logs, pid files and a kubeconfig.
Each component runs as its own process group, so a test can stop and restart the API
server while etcd keeps its data, and ``down`` can prove that nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from testbed.certs import CertificateAuthority, write_service_account_keys

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO / ".cluster" / "bin"
SERVICE_CIDR = "10.96.0.0/16"
# Components in start order; ``down`` stops them in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# kwok manages only nodes carrying this annotation and leaves every pod to the
# simulated kubelet, because its configuration below contains node stages only.
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"

_KWOK_CONFIG = """\
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  manageAllNodes: false
  manageNodesWithAnnotationSelector: kwok.x-k8s.io/node=fake
  nodeLeaseDurationSeconds: 40
  nodeLeaseParallelism: 4
  nodePlayStageParallelism: 4
  podPlayStageParallelism: 4
  podsOnNodeSyncParallelism: 4
  serverAddress: 127.0.0.1:{port}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: node-ready
spec:
  resourceRef:
    apiGroup: v1
    kind: Node
  selector:
    matchExpressions:
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: NotIn
      values: ['True']
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
      conditions:
      {{{{ range NodeConditions }}}}
      - lastHeartbeatTime: {{{{ $now | Quote }}}}
        lastTransitionTime: {{{{ $now | Quote }}}}
        message: {{{{ .message | Quote }}}}
        reason: {{{{ .reason | Quote }}}}
        status: {{{{ .status | Quote }}}}
        type: {{{{ .type | Quote }}}}
      {{{{ end }}}}
      addresses:
      - address: 10.244.0.1
        type: InternalIP
      - address: {{{{ .metadata.name | Quote }}}}
        type: Hostname
      allocatable:
        cpu: "64"
        memory: 256Gi
        pods: "1000"
      capacity:
        cpu: "64"
        memory: 256Gi
        pods: "1000"
      nodeInfo:
        architecture: {{{{ index .metadata.labels "kubernetes.io/arch" | Quote }}}}
        operatingSystem: {{{{ index .metadata.labels "kubernetes.io/os" | Quote }}}}
        kubeletVersion: v1.36.3
        containerRuntimeVersion: containerd://2.1.0
        kernelVersion: 6.12.0
        osImage: simulated
        bootID: ""
        machineID: ""
        systemUUID: ""
        kubeProxyVersion: ""
      phase: Running
"""


@dataclass
class ClusterInfo:
    """Where a running cluster listens; stored as ``cluster.json`` in its folder."""

    directory: str
    apiserver_port: int
    etcd_port: int
    etcd_peer_port: int
    kwok_port: int

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def etcd_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    @property
    def kubeconfig(self) -> Path:
        return Path(self.directory) / "kubeconfig"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "imgcache-testbed", "cluster": {"server": server, "certificate-authority": str(ca)}}],
            "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
            "contexts": [{"name": "imgcache-testbed", "context": {"cluster": "imgcache-testbed", "user": user}}],
            "current-context": "imgcache-testbed",
        },
        indent=2,
    )


class ControlPlane:
    """A control plane rooted at one folder, with one process per component."""

    def __init__(self, directory: Path, bin_dir: Path = DEFAULT_BIN) -> None:
        self.directory = directory.resolve()
        self.bin_dir = bin_dir
        self.pki = self.directory / "pki"
        self.logs = self.directory / "logs"
        self.run_dir = self.directory / "run"
        # Popen objects of the components this process started, kept so that Python does
        # not warn about a running child when the object is freed.
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    # -- state -------------------------------------------------------------

    @property
    def info_path(self) -> Path:
        return self.directory / "cluster.json"

    def info(self) -> ClusterInfo:
        return ClusterInfo(**json.loads(self.info_path.read_text()))

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    def binary(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.exists():
            raise FileNotFoundError(
                f"control-plane binary {path} is missing: run `make binaries` (tests/controlplane/build.sh) first"
            )
        return path

    # -- lifecycle ---------------------------------------------------------

    def up(self, timeout: float = 90.0) -> ClusterInfo:
        """Create certificates and configs, start every component and wait until ready."""
        for name in COMPONENTS:
            self.binary(name)
        if self.running():
            raise RuntimeError(f"a cluster already runs in {self.directory}: run `down` first")
        for folder in (self.pki, self.logs, self.run_dir):
            folder.mkdir(parents=True, exist_ok=True)
        info = ClusterInfo(
            directory=str(self.directory),
            apiserver_port=free_port(),
            etcd_port=free_port(),
            etcd_peer_port=free_port(),
            kwok_port=free_port(),
        )
        self.info_path.write_text(json.dumps(asdict(info), indent=2))
        self._write_credentials(info)
        started = time.monotonic()
        self.start("etcd")
        self._wait(lambda: self._http_ok(f"{info.etcd_endpoint}/health"), "etcd", timeout)
        self.start("kube-apiserver")
        self.wait_apiserver_ready(timeout - (time.monotonic() - started))
        for name in COMPONENTS[2:]:
            self.start(name)
        self._wait_default_service_account(timeout - (time.monotonic() - started))
        return info

    def down(self, timeout: float = 20.0) -> None:
        """Stop every component, escalating to SIGKILL, and fail if any process survives."""
        for name in reversed(COMPONENTS):
            self.stop(name, timeout)
        survivors = [name for name in COMPONENTS if self.pid(name) is not None]
        if survivors:
            raise RuntimeError(f"processes still running after down: {survivors}")

    def running(self) -> list[str]:
        return [name for name in COMPONENTS if self.pid(name) is not None]

    def argv(self, name: str) -> list[str]:
        info = self.info()
        pki = self.pki
        bin_path = str(self.binary(name))
        if name == "etcd":
            return [
                bin_path,
                "--name=testbed",
                f"--data-dir={self.directory / 'etcd-data'}",
                f"--listen-client-urls={info.etcd_endpoint}",
                f"--advertise-client-urls={info.etcd_endpoint}",
                f"--listen-peer-urls=http://127.0.0.1:{info.etcd_peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{info.etcd_peer_port}",
                f"--initial-cluster=testbed=http://127.0.0.1:{info.etcd_peer_port}",
                "--unsafe-no-fsync=true",
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ]
        if name == "kube-apiserver":
            return [
                bin_path,
                f"--etcd-servers={info.etcd_endpoint}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={info.apiserver_port}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--api-audiences=https://kubernetes.default.svc.cluster.local",
                "--authorization-mode=RBAC",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--enable-priority-and-fairness=true",
                "--max-requests-inflight=800",
                "--max-mutating-requests-inflight=400",
                "--v=1",
            ]
        if name == "kube-controller-manager":
            return [
                bin_path,
                f"--kubeconfig={self.directory / 'controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={self.directory / 'controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={self.directory / 'controller-manager.kubeconfig'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--concurrent-gc-syncs=20",
                "--v=1",
            ]
        if name == "kube-scheduler":
            return [
                bin_path,
                f"--kubeconfig={self.directory / 'scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={self.directory / 'scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={self.directory / 'scheduler.kubeconfig'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--v=1",
            ]
        if name == "kwok":
            return [
                bin_path,
                f"--kubeconfig={self.kubeconfig}",
                f"--config={self.directory / 'kwok.yaml'}",
                "--v=WARN",
            ]
        raise ValueError(f"unknown component {name!r}: expected one of {COMPONENTS}")

    def start(self, name: str) -> int:
        """Start one component in its own process group and record its pid."""
        if self.pid(name) is not None:
            raise RuntimeError(f"{name} already runs in {self.directory}")
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            self.argv(name),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.directory,
        )
        log.close()
        self._processes[name] = process
        (self.run_dir / f"{name}.pid").write_text(str(process.pid))
        return process.pid

    def stop(self, name: str, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
        """Stop one component's process group, with SIGKILL after ``timeout`` seconds."""
        pid = self.pid(name)
        if pid is None:
            (self.run_dir / f"{name}.pid").unlink(missing_ok=True)
            self._forget(name)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while self._alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while self._alive(pid):
                time.sleep(0.05)
        (self.run_dir / f"{name}.pid").unlink(missing_ok=True)
        self._forget(name)

    def _forget(self, name: str) -> None:
        process = self._processes.pop(name, None)
        if process is not None:
            # _alive may have reaped the child already, or seen it as a zombie just before
            # it became waitable. wait() handles both and records the exit on the object.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)

    def pid(self, name: str) -> int | None:
        """Return the pid of a running component, or None."""
        path = self.run_dir / f"{name}.pid"
        try:
            pid = int(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if self._alive(pid) else None

    @staticmethod
    def _alive(pid: int) -> bool:
        with contextlib.suppress(ChildProcessError):
            # Reap the child if this process started it, so it does not linger as a zombie.
            finished, _ = os.waitpid(pid, os.WNOHANG)
            if finished == pid:
                return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
        except (FileNotFoundError, IndexError):
            return False
        return state != "Z"

    # -- readiness ---------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return context

    def _http_ok(self, url: str, context: ssl.SSLContext | None = None) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def wait_apiserver_ready(self, timeout: float = 60.0) -> None:
        context = self.ssl_context()
        url = f"{self.info().server}/readyz"
        self._wait(lambda: self._http_ok(url, context), "kube-apiserver /readyz", timeout)

    def _wait_default_service_account(self, timeout: float) -> None:
        # Pods can be created only once the ServiceAccount controller made "default".
        context = self.ssl_context()
        url = f"{self.info().server}/api/v1/namespaces/default/serviceaccounts/default"
        self._wait(lambda: self._http_ok(url, context), "default ServiceAccount", timeout)

    def _wait(self, check: object, what: str, timeout: float) -> None:
        assert callable(check)
        deadline = time.monotonic() + max(timeout, 1.0)
        while time.monotonic() < deadline:
            if check():
                return
            dead = [n for n in COMPONENTS if (self.run_dir / f"{n}.pid").exists() and self.pid(n) is None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}; see {self.logs}")
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; see {self.logs}")

    # -- credentials -------------------------------------------------------

    def _write_credentials(self, info: ClusterInfo) -> None:
        ca = CertificateAuthority(self.pki)
        ca.issue(
            "apiserver",
            "kube-apiserver",
            server_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
            server_ips=("127.0.0.1", "10.96.0.1"),
        )
        write_service_account_keys(self.pki)
        identities = {
            "admin": ("imgcache-testbed-admin", "system:masters"),
            "controller-manager": ("system:kube-controller-manager", None),
            "scheduler": ("system:kube-scheduler", None),
        }
        for stem, (user, group) in identities.items():
            pair = ca.issue(stem, user, organization=group)
            config = _kubeconfig(info.server, ca.cert_path, pair.cert, pair.key, user)
            target = self.kubeconfig if stem == "admin" else self.directory / f"{stem}.kubeconfig"
            target.write_text(config)
            target.chmod(0o600)
        (self.directory / "kwok.yaml").write_text(_KWOK_CONFIG.format(port=info.kwok_port))
