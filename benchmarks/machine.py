"""The machine a run used: hardware, software versions, the commit and the load from other work."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio

JSON = dict[str, Any]


def describe() -> JSON:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = Path("/proc/meminfo").read_text()
    total = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.MULTILINE)
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(int(total.group(1)) / 2**20, 1) if total else None,
        "cpu_model": model.group(1).strip() if model else "unknown",
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def revision(repo: Path) -> JSON:
    """Return the commit the suite ran on and the files under imgcache/ that differed from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=False)
    status = subprocess.run(["git", "status", "--porcelain", "--", "imgcache"], cwd=repo, capture_output=True,
                            text=True, check=False)
    changed = [line[3:] for line in status.stdout.splitlines() if line.strip()]
    return {"commit": head.stdout.strip() or "unknown", "imgcache_uncommitted": changed}


def other_workloads(own_root: str) -> dict[str, int]:
    """Count processes of other work: test runs and control planes that this run did not start."""
    counts = {"pytest": 0, "kube-apiserver": 0}
    own_pid = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own_pid:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(part.decode(errors="replace") for part in argv)
        if "pytest" in text and "uv run" not in text:
            counts["pytest"] += 1
        if text.split(" ", 1)[0].endswith("kube-apiserver") and own_root not in text:
            counts["kube-apiserver"] += 1
    return counts


class LoadSampler:
    """Sampler of the 1-minute load average and of other work's processes while the suite runs."""

    def __init__(self, own_root: str) -> None:
        self.own_root = own_root
        self.samples: list[tuple[float, float]] = []
        self.others: list[dict[str, int]] = []
        self.started = time.monotonic()

    def sample(self) -> None:
        self.samples.append((round(time.monotonic() - self.started, 1), os.getloadavg()[0]))
        self.others.append(other_workloads(self.own_root))

    async def run(self, interval: float = 30.0) -> None:
        while True:
            self.sample()
            await anyio.sleep(interval)

    def summary(self, before: tuple[float, float, float], after: tuple[float, float, float]) -> JSON:
        loads = [load for _, load in self.samples]
        peak_others = {key: max((o.get(key, 0) for o in self.others), default=0) for key in ("pytest",
                                                                                            "kube-apiserver")}
        return {
            "loadavg_before": [round(x, 2) for x in before],
            "loadavg_after": [round(x, 2) for x in after],
            "loadavg_1m_max": round(max(loads), 2) if loads else None,
            "loadavg_1m_samples": self.samples,
            "other_processes_max": peak_others,
            "shared": bool(peak_others["pytest"] or peak_others["kube-apiserver"] or before[0] > 0.5),
        }
