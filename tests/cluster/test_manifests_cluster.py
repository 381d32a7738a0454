"""The install manifests against the real API server: dry-run first, then for real."""

from __future__ import annotations

import pytest

from testbed.controller import NAMESPACE, kubectl
from testbed.controlplane import REPO, ControlPlane

pytestmark = [pytest.mark.cluster]

VARIANTS = ["manifests", "manifests/overlays/aws"]


@pytest.mark.parametrize("path", VARIANTS)
def test_server_dry_run_accepts(cluster: ControlPlane, installed, path: str) -> None:
    output = kubectl(cluster, "apply", "--server-side", "--dry-run=server", "-k", str(REPO / path))
    assert "customresourcedefinition.apiextensions.k8s.io/imagecaches.imgcache.io" in output
    assert "deployment.apps/imgcache" in output


def test_applied_objects_exist(cluster: ControlPlane, installed) -> None:
    names = kubectl(
        cluster,
        "-n",
        NAMESPACE,
        "get",
        "serviceaccount,role,rolebinding,service,deployment,pdb,networkpolicy",
        "-o",
        "name",
    ).split()
    for expected in (
        "serviceaccount/imgcache",
        "role.rbac.authorization.k8s.io/imgcache",
        "rolebinding.rbac.authorization.k8s.io/imgcache",
        "service/imgcache-metrics",
        "deployment.apps/imgcache",
        "poddisruptionbudget.policy/imgcache",
        "networkpolicy.networking.k8s.io/imgcache",
    ):
        assert expected in names
    cluster_names = kubectl(cluster, "get", "clusterrole/imgcache", "clusterrolebinding/imgcache", "-o", "name").split()
    assert cluster_names == [
        "clusterrole.rbac.authorization.k8s.io/imgcache",
        "clusterrolebinding.rbac.authorization.k8s.io/imgcache",
    ]


def test_service_account_cannot_read_secrets(cluster: ControlPlane, installed) -> None:
    answer = kubectl(
        cluster,
        "auth",
        "can-i",
        "get",
        "secrets",
        "-A",
        f"--as=system:serviceaccount:{NAMESPACE}:imgcache",
        check=False,
    )
    assert answer.strip() == "no"


def test_example_imagecache_accepted(cluster: ControlPlane, installed) -> None:
    output = kubectl(
        cluster,
        "apply",
        "--dry-run=server",
        "-f",
        str(REPO / "manifests" / "examples" / "imagecache.yaml"),
    )
    assert "imagecache.imgcache.io/" in output
