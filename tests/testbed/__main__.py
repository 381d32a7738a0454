"""Command line for the local control plane: ``python -m testbed up|down|status``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from testbed.controlplane import REPO, ControlPlane


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed", description=__doc__)
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument(
        "--dir",
        type=Path,
        default=REPO / ".cluster" / "local",
        help="folder that holds the cluster's state (default: .cluster/local)",
    )
    args = parser.parse_args()
    plane = ControlPlane(args.dir)
    if args.command == "up":
        started = time.monotonic()
        info = plane.up()
        link = REPO / ".cluster" / "kubeconfig"
        link.unlink(missing_ok=True)
        link.symlink_to(info.kubeconfig)
        print(f"cluster ready in {time.monotonic() - started:.1f} s at {info.server}")
        print(f"kubeconfig: {link}")
        print(f"try: .cluster/bin/kubectl --kubeconfig {link} get nodes")
        return 0
    if args.command == "down":
        running = plane.running()
        if not running:
            print(f"no cluster is running in {args.dir}; nothing to stop")
            return 0
        plane.down()
        print(f"cluster in {args.dir} stopped ({', '.join(running)}); no component process is left")
        return 0
    running = plane.running()
    print("running: " + (", ".join(running) if running else "nothing"))
    return 0 if running else 1


if __name__ == "__main__":
    sys.exit(main())
