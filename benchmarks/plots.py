"""PNG plots of one run's results, written next to docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

JSON = dict[str, Any]
COLORS = {"imgcache": "#1b7837", "prepull-only": "#5aae61", "pinner": "#2166ac", "unbounded": "#b2182b",
          "periodic": "#e08214", "bare": "#762a83"}


def write_all(results: JSON, folder: Path) -> list[str]:
    """Write every plot the results allow; return the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    scenarios = results["scenarios"]
    if "warmup" in scenarios:
        written.append(_warmup(scenarios["warmup"], folder / "warmup.png"))
    if "burst" in scenarios:
        written.append(_burst(scenarios["burst"], folder / "burst.png"))
    if "cost" in scenarios:
        written.append(_cost(scenarios["cost"], folder / "cost.png"))
    if "scale" in scenarios:
        written.append(_scale(scenarios["scale"], folder / "scale.png"))
    return written


def _warmup(data: JSON, path: Path) -> str:
    regimes = [r["name"] for r in data["parameters"]["regimes"]]
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 3.6), sharey=True, squeeze=False)
    for axis, regime in zip(axes[0], regimes, strict=True):
        rows = [r for r in data["results"] if r["regime"] == regime]
        names = [r["strategy"] for r in rows]
        values = [r["ratio"] if r["ratio"] is not None else r["ratio_at_least"] for r in rows]
        bars = axis.bar(names, values, color=[COLORS[n] for n in names])
        for bar, row in zip(bars, rows, strict=True):
            label = f"{row['ratio']:.2f}" if row["ratio"] is not None else f">{row['ratio_at_least']:.1f}"
            axis.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.axhline(1.10, color="grey", linestyle="--", linewidth=0.8)
        bound = data["bounds"][regime]["seconds"]
        axis.set_title(f"registry '{regime}', bound {bound:.0f} s")
        axis.set_ylabel("time to all images / bound")
    fig.suptitle("Single node warm-up (dashed: goal 1.10)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _burst(data: JSON, path: Path) -> str:
    fig, axis = plt.subplots(figsize=(7, 4))
    bound = data["bound"]["seconds"]
    for name, run in data["runs"].items():
        if run["timeline"]:
            xs = [0.0] + [t for t, _ in run["timeline"]]
            ys = [0.0] + [f for _, f in run["timeline"]]
            axis.step(xs, ys, where="post", label=name, color=COLORS.get(name, "black"))
    axis.axvline(bound, color="black", linestyle="--", linewidth=0.8, label=f"bound {bound:.0f} s")
    axis.set_xlabel("seconds since the first node was created")
    axis.set_ylabel("share of (node, image) pairs present")
    axis.set_title(f"Burst: {data['parameters']['nodes']} nodes x {data['parameters']['images']} images, "
                   f"quota {data['parameters']['qps']:g} requests/s")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _cost(data: JSON, path: Path) -> str:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    samples = data["reaction_latency_seconds"]
    left.boxplot([[v * 1000 for v in samples["imgcache"]], [v * 1000 for v in samples["bare"]]])
    left.set_xticks([1, 2], ["imgcache", "bare aiohttp"])
    left.set_ylabel("node ADDED to first pod ADDED (ms)")
    left.set_title("Reaction latency")
    rates = data["create_throughput_median"]
    right.bar(["imgcache", "bare aiohttp"], [rates["imgcache"], rates["bare"]],
              color=[COLORS["imgcache"], COLORS["bare"]])
    right.set_ylabel("pods created per second")
    right.set_title(f"Pod creation, {data['parameters']['concurrency']} requests in flight")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _scale(data: JSON, path: Path) -> str:
    fig, axis = plt.subplots(figsize=(6, 3.6))
    nodes = [m["nodes"] for m in data["memory"]]
    rss = [m["rss_bytes"] / 2**20 for m in data["memory"]]
    axis.plot(nodes, rss, marker="o", color=COLORS["imgcache"], label="one controller as nodes are added")
    restart = data["restart_memory"]
    axis.plot([restart["nodes"]], [restart["rss_bytes"] / 2**20], marker="s", linestyle="none", color="black",
              label="controller started with all nodes present")
    axis.axhline(120, color="grey", linestyle="--", linewidth=0.8, label="goal at the largest size: 120 MiB")
    axis.set_xlabel("nodes")
    axis.set_ylabel("RSS (MiB)")
    axis.set_ylim(bottom=0)
    axis.set_title(f"imgcache memory, {data['parameters']['images']} catalogue images")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
