"""Run the imgcache controller under test as its own ServiceAccount.

The process gets a kubeconfig holding only a token of the ``imgcache`` ServiceAccount, so
it has exactly the permissions of the ClusterRole and Role in ``manifests/``: a missing
RBAC rule fails the test that needs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from testbed.controlplane import REPO, ControlPlane, free_port

NAMESPACE = "imgcache-system"
SERVICE_ACCOUNT = "imgcache"
# The helper image that the Deployment names. Tests and the demo may give it a size in
# the simulated kubelet, which otherwise uses its default.
HELPER_IMAGE = "ghcr.io/imgcache/imgcache-helper:0.1.0"


def kubectl(plane: ControlPlane, *args: str, check: bool = True, input: str | None = None) -> str:
    result = subprocess.run(
        [str(plane.binary("kubectl")), f"--kubeconfig={plane.kubeconfig}", *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=120,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def install_manifests(plane: ControlPlane) -> None:
    """Apply the kustomize base as a user would, then stop its Deployment.

    Tests run the controller as a local process with the same ServiceAccount, so the
    in-cluster Deployment (whose image cannot run on fake nodes) is scaled to zero.
    """
    kubectl(plane, "apply", "--server-side", "-k", str(REPO / "manifests"))
    kubectl(plane, "wait", "--for=condition=Established", "crd/imagecaches.imgcache.io", "--timeout=60s")
    kubectl(plane, "-n", NAMESPACE, "scale", "deployment/imgcache", "--replicas=0")


def service_account_kubeconfig(plane: ControlPlane, path: Path, service_account: str = SERVICE_ACCOUNT) -> Path:
    token = kubectl(plane, "-n", NAMESPACE, "create", "token", service_account, "--duration=24h").strip()
    info = plane.info()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "testbed", "cluster": {"server": info.server, "certificate-authority": str(plane.pki / "ca.crt")}}
        ],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": service_account}}],
        "current-context": "testbed",
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


class ControllerProcess:
    """One ``imgcache run`` process; logs go to a file that tests can parse as JSON lines."""

    def __init__(self, kubeconfig: Path, log_path: Path, args: list[str], identity: str) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.port = free_port()
        self.identity = identity
        self.argv = [
            sys.executable,
            "-m",
            "imgcache",
            "run",
            f"--kubeconfig={kubeconfig}",
            f"--namespace={NAMESPACE}",
            f"--helper-image={HELPER_IMAGE}",
            "--http-address=127.0.0.1",
            f"--http-port={self.port}",
            f"--identity={identity}",
            "--pull-through-cache=false",
            *args,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ControllerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGCACHE_", "AWS_", "KUBERNETES_"))}
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as error:
            return int(error.code), error.read().decode()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"imgcache exited with {self.process.returncode}; log: {self.log_path}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"imgcache was not ready within {timeout:.0f} s; log: {self.log_path}")

    def metrics(self) -> str:
        return self.get("/metrics")[1]

    def logs(self) -> list[dict[str, object]]:
        entries = []
        for line in self.log_path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                entries.append({"event": "unparsed", "line": line})
        return entries

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 25.0) -> int:
        """Send ``sig`` and wait; return the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
