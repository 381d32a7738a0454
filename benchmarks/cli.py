"""Command line of the suite: start a cluster, run the scenarios, write results and docs."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import sysconfig
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from benchmarks import burst, cost, machine, report, scale, warmup
from benchmarks.cluster import BenchCluster
from testbed.controlplane import REPO

JSON = dict[str, Any]
SCENARIOS: dict[str, Callable[[BenchCluster, bool], Awaitable[JSON]]] = {
    "warmup": warmup.run,
    "burst": burst.run,
    "cost": cost.run,
    "scale": scale.run,
}
RESULTS_DIR = REPO / "benchmarks" / "results"
DOCS = REPO / "docs"

log = logging.getLogger("benchmarks")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="run a smaller version of every scenario")
    parser.add_argument(
        "--only", action="append", choices=sorted(SCENARIOS), default=[],
        help="run only this scenario (repeatable); the docs are not rewritten",
    )
    parser.add_argument(
        "--docs", type=Path, default=DOCS,
        help="folder for benchmarks.md, benchmarks/results.json and the plots (default: docs/)",
    )
    return parser


async def _run(args: argparse.Namespace, run_dir: Path) -> JSON:
    cluster = BenchCluster(run_dir)
    sampler = machine.LoadSampler(str(cluster.plane.directory))
    before = os.getloadavg()
    started = time.monotonic()
    results: JSON = {
        "generated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if args.quick else "full",
        "command": "make bench-quick" if args.quick else "make bench",
        "machine": machine.describe(),
        "revision": machine.revision(REPO),
        "scenarios": {},
        "errors": {},
    }
    try:
        results["bytecode"] = await anyio.to_thread.run_sync(compile_bytecode)
        log.info("starting control plane in %s", cluster.plane.directory)
        await anyio.to_thread.run_sync(cluster.up)
        results["machine"].update(cluster.versions())
        results["machine"]["kwok"] = sorted(p.name for p in (REPO / ".cluster" / "bin").glob("v0.*"))
        api = await cluster.connect()
        async with api, anyio.create_task_group() as group:
            group.start_soon(sampler.run)
            for name, scenario in SCENARIOS.items():
                if args.only and name not in args.only:
                    continue
                log.info("scenario %s: starting", name)
                begun = time.monotonic()
                try:
                    results["scenarios"][name] = await scenario(cluster, args.quick)
                except Exception as error:
                    log.exception("scenario %s failed", name)
                    results["errors"][name] = "".join(traceback.format_exception(error))[-4000:]
                    await cluster.cleanup_after_failure()
                else:
                    results["scenarios"][name]["wall_seconds"] = round(time.monotonic() - begun, 1)
                log.info("scenario %s: done in %.0f s", name, time.monotonic() - begun)
            group.cancel_scope.cancel()
    finally:
        await anyio.to_thread.run_sync(cluster.down)
        sampler.sample()
        results["load"] = sampler.summary(before, os.getloadavg())
        results["controller_revisions"] = cluster.revisions
        results["wall_seconds"] = round(time.monotonic() - started, 1)
    return results


def compile_bytecode() -> str:
    """Compile the Python files that controllers import, as the container image does.

    The image is built with UV_COMPILE_BYTECODE=1. Without .pyc files, and with
    PYTHONDONTWRITEBYTECODE set as on this machine, each controller compiles every
    module it imports at start, which costs seconds and about 30 MiB more RSS than in
    a real deployment.
    """
    paths = [sysconfig.get_paths()["purelib"], str(REPO / "imgcache")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *paths], check=True, stdout=subprocess.DEVNULL)
    return "compiled before the run (compileall), as in the container image"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The simulated kubelet logs every throttled retry at WARNING; its counters are what matter here.
    logging.getLogger("testbed.kubelet").setLevel(logging.ERROR)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = RESULTS_DIR / f"{stamp}-{'quick' if args.quick else 'full'}"
    run_dir.mkdir(parents=True, exist_ok=True)
    results = anyio.run(_run, args, run_dir)
    results["goals"] = report.goals(results)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    if args.only:
        log.info("results in %s (docs not rewritten because --only was given)", run_dir / "results.json")
    else:
        report.write(results, args.docs, run_dir)
        log.info("wrote %s and %s", args.docs / "benchmarks.md", args.docs / "benchmarks" / "results.json")
    for goal in results["goals"]:
        log.info("%-60s %-24s %s", goal["goal"], goal["measured_text"], "met" if goal["met"] else "NOT MET")
    return 1 if results["errors"] else 0
