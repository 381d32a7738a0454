"""``python -m testbed.demo``, shortened to 2 nodes at 20x speed, run as a user runs it.

Each test starts the demo as a subprocess in its own ``.cluster/test-demo-*`` folder,
so it neither needs nor touches the session's cluster or a demo the user kept.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.controlplane import COMPONENTS, REPO, ControlPlane
from testbed.demo import addon_images, demo_process, stop_everything

pytestmark = [pytest.mark.cluster]

SHORT_RUN = ("--nodes", "2", "--speed", "20")


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    """Return a fresh folder for the demo's cluster. Whatever still runs there is stopped after the test."""
    directory = REPO / ".cluster" / f"test-demo-{secrets.token_hex(4)}"
    yield directory
    stop_everything(directory)
    shutil.rmtree(directory, ignore_errors=True)


def run_demo(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "testbed.demo", "--dir", str(directory), *args],
        cwd=REPO / "tests",
        capture_output=True,
        text=True,
        timeout=420,
    )


def test_short_demo_warms_pins_and_stops(demo_dir: Path, tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    result = run_demo(demo_dir, *SHORT_RUN, "--summary-json", str(summary_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output

    summary = json.loads(summary_path.read_text())
    images = len(addon_images())
    assert summary["passed"] is True, output
    assert summary["nodes"] == 2
    assert summary["images"] == images
    rows = summary["node_rows"]
    assert {row["platform"] for row in rows} == {"linux/amd64", "linux/arm64"}
    for row in rows:
        assert row["images_stored"] == images, row
        assert row["images_present_after"] is not None, row
        assert row["reported_warm_after"] is not None, row
        assert row["pinned_after"] is not None, row
        assert row["failed_images"] == 0, row
        assert row["prepull_pulls"] > 0, row
    # Node annotations (3), DaemonSets (one per architecture), pinner pods, image stores, ImageCache.
    assert len(summary["checks"]) == 8, summary["checks"]
    assert [c for c in summary["checks"] if not c["ok"]] == []
    assert summary["pulls"]["prepull"] + summary["pulls"]["pinner"] >= 2 * images
    assert summary["pulls"]["failed_images"] == 0

    assert f"Summary: 2 nodes, {images} images each" in result.stdout
    for row in rows:
        assert f"{row['node']} warm: {images}/{images} images prepulled" in result.stdout
        assert f"{row['node']} pinned: pinner pod runs {images} sleeping containers" in result.stdout
    assert "Demo passed" in result.stdout
    assert "\n  FAIL  " not in result.stdout, "a check failed"
    assert "\x1b[" not in result.stdout, "terminal control codes in output to a pipe"
    assert result.stderr == ""

    assert ControlPlane(demo_dir).running() == []
    assert demo_process(demo_dir, "controller") is None
    assert not (demo_dir / "etcd-data").exists()
    assert (demo_dir / "imgcache.log").stat().st_size > 0


def test_keep_leaves_cluster_until_stop(demo_dir: Path) -> None:
    result = run_demo(demo_dir, *SHORT_RUN, "--keep")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Still running (--keep)" in result.stdout
    assert f"python -m testbed.demo --stop --dir {demo_dir}" in result.stdout

    plane = ControlPlane(demo_dir)
    assert plane.running() == list(COMPONENTS)
    assert demo_process(demo_dir, "controller") is not None
    assert demo_process(demo_dir, "kubelet") is not None

    # The status command that the demo prints works against the kept cluster.
    status = subprocess.run(
        [sys.executable, "-m", "imgcache", "status", "--kubeconfig", str(plane.kubeconfig)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert "demo-0" in status.stdout
    assert "demo-1" in status.stdout

    stopped = run_demo(demo_dir, "--stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "controller" in stopped.stdout
    assert "kubelet" in stopped.stdout
    assert plane.running() == []
    assert demo_process(demo_dir, "controller") is None
    assert demo_process(demo_dir, "kubelet") is None


def test_foreign_folder_left_alone(tmp_path: Path) -> None:
    other = tmp_path / "other-cluster"
    other.mkdir()
    (other / "cluster.json").write_text("{}")

    stop = run_demo(other, "--stop")
    assert stop.returncode == 2
    assert "was not made by the demo" in stop.stderr

    demo = run_demo(other, *SHORT_RUN)
    assert demo.returncode == 1
    assert "was not made by the demo" in demo.stdout
    assert (other / "cluster.json").read_text() == "{}"
