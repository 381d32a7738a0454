"""Command line: ``imgcache run``, ``imgcache status``, ``imgcache rewrite IMAGE``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import anyio

from imgcache import logs
from imgcache.config import ConfigError, load
from imgcache.kube import IMAGECACHES, LEASES, NODES, ApiError, Kube, KubeConfigError
from imgcache.model import PROGRESS_ANNOTATION, REGISTRIES_ANNOTATION, node_from_json
from imgcache.reference import InvalidReference, parse
from imgcache.rewrite import Rewriter, parse_static_rule

USAGE = """imgcache COMMAND [options]

commands:
  run       run the controller (see `imgcache run --help`)
  status    print per-node and per-ImageCache progress read from the cluster
  rewrite   print the pull-through cache rewrite of an image reference
  version   print the imgcache version
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "run":
        return _run(rest)
    if command == "status":
        return _status(rest)
    if command == "rewrite":
        return _rewrite(rest)
    if command in ("version", "--version"):
        print(f"imgcache {metadata.version('imgcache')}")
        return 0
    print(f"imgcache: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _run(argv: list[str]) -> int:
    try:
        settings = load(argv)
    except ConfigError as error:
        print(f"imgcache: error: {error}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    from imgcache.app import main as run_controller

    try:
        return anyio.run(run_controller, settings)
    except KubeConfigError as error:
        print(f"imgcache: error: {error}", file=sys.stderr)
        return 2


def _rewrite(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="imgcache rewrite", description="Print how an image is rewritten to the ECR pull-through cache."
    )
    parser.add_argument("image", help="image reference, for example nginx:1.27")
    parser.add_argument(
        "--pull-through-rule",
        action="append",
        default=[],
        metavar="RULE",
        help="rule PREFIX=UPSTREAM[/REPO_PREFIX]@ACCOUNT/REGION, repeatable",
    )
    args = parser.parse_args(argv)
    try:
        rules = [parse_static_rule(text) for text in args.pull_through_rule]
        ref = parse(args.image)
    except (InvalidReference, ValueError) as error:
        print(f"imgcache: error: {error}", file=sys.stderr)
        return 2
    result = Rewriter(rules).rewrite(ref)
    print(f"image:     {ref}")
    print(f"rewritten: {result.result}")
    if result.rule is None:
        print(f"rule:      none (no rule covers {ref.registry}/{ref.repository})")
    else:
        rule = result.rule
        upstream = "/".join(filter(None, (rule.upstream_registry, rule.upstream_repository_prefix)))
        print(f"rule:      {rule.prefix} -> {upstream} ({rule.account}/{rule.region})")
    return 0


def _default_kubeconfig() -> str | None:
    """Return the kubeconfig kubectl would use, or None to use the in-cluster credentials."""
    from_environment = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    if from_environment:
        return from_environment
    home = Path.home() / ".kube" / "config"
    return str(home) if home.is_file() else None


def _status(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="imgcache status", description="Print prepull progress read from the cluster."
    )
    parser.add_argument(
        "--kubeconfig",
        default=_default_kubeconfig(),
        help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else the in-cluster ServiceAccount)",
    )
    parser.add_argument("--namespace", default="imgcache-system", help="imgcache's namespace (default imgcache-system)")
    parser.add_argument("--lease-name", default="imgcache-leader", help="leader Lease name (default imgcache-leader)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    try:
        report = anyio.run(collect_status, args.kubeconfig, args.namespace, args.lease_name)
    except KubeConfigError as error:
        print(f"imgcache: error: {error}", file=sys.stderr)
        return 1
    except ApiError as error:
        hint = ""
        if error.not_found and "imagecaches" in error.path:
            hint = " The ImageCache CRD is missing: install imgcache with kubectl apply -k manifests/."
        print(f"imgcache: error: {error}.{hint}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_status(report))
    return 0


async def collect_status(kubeconfig: str | None, namespace: str, lease_name: str) -> dict[str, object]:
    """Read nodes, ImageCaches and the leader Lease; return the report that `status` prints."""
    kube = await Kube.connect(kubeconfig)
    try:
        nodes, _ = await kube.list(NODES)
        caches, _ = await kube.list(IMAGECACHES)
        try:
            lease = await kube.get(LEASES, lease_name, namespace)
        except ApiError as error:
            if not error.not_found:
                raise
            lease = {}
    finally:
        await kube.close()
    lease_metadata = lease.get("metadata") or {}
    registries = json.loads((lease_metadata.get("annotations") or {}).get(REGISTRIES_ANNOTATION, "{}"))
    leader = (lease.get("spec") or {}).get("holderIdentity", "")
    node_rows = []
    for obj in nodes:
        node = node_from_json(obj)
        raw = (obj.get("metadata", {}).get("annotations") or {}).get(PROGRESS_ANNOTATION)
        progress = json.loads(raw) if raw else {}
        classes = sorted(set(node.failed.values()))
        node_rows.append({"node": node.name, "platform": node.platform, **progress, "failure_classes": classes})
    cache_rows = []
    for obj in caches:
        metadata = obj.get("metadata", {})
        status = obj.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        cache_rows.append(
            {
                "imagecache": f"{metadata.get('namespace')}/{metadata.get('name')}",
                "images": status.get("imageCount", 0),
                "ready": conditions.get("Ready", {}).get("status", "Unknown"),
                "reason": conditions.get("Ready", {}).get("reason", ""),
                "degraded": conditions.get("Degraded", {}).get("reason", ""),
            }
        )
    registry_rows = [{"registry": name, **values} for name, values in sorted(registries.items())]
    return {"leader": leader, "nodes": node_rows, "imagecaches": cache_rows, "registries": registry_rows}


def format_status(report: dict[str, object]) -> str:
    lines = [f"{'NODE':40} {'PLATFORM':14} {'DONE':>5} {'PENDING':>7} {'FAILED':>6}  FAILURE CLASSES"]
    for row in report["nodes"]:  # type: ignore[attr-defined]
        lines.append(
            f"{row['node'][:40]:40} {row['platform']:14} {row.get('done', '-'):>5} {row.get('pending', '-'):>7} "
            f"{row.get('failed', '-'):>6}  {','.join(row['failure_classes']) or '-'}"
        )
    lines.append("")
    lines.append(f"{'IMAGECACHE':40} {'IMAGES':>6} {'READY':6} {'REASON':12} DEGRADED")
    for row in report["imagecaches"]:  # type: ignore[attr-defined]
        lines.append(
            f"{row['imagecache'][:40]:40} {row['images']:>6} {row['ready']:6} {row['reason']:12} {row['degraded']}"
        )
    lines.append("")
    lines.append(f"{'REGISTRY':48} {'RATE/S':>8} {'MAX/S':>8} {'THROTTLED(5m)':>14}")
    for row in report["registries"]:  # type: ignore[attr-defined]
        lines.append(f"{row['registry'][:48]:48} {row['rate']:>8.2f} {row['maxRate']:>8.2f} {row['throttled5m']:>14}")
    lines.append("")
    lines.append(f"leader: {report['leader'] or 'none'}")
    return "\n".join(lines)
