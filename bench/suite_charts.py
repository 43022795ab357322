"""Charts of a suite: the boot timeline (Gantt) and the distribution of ready times.

matplotlib with the Agg backend; SVGs are byte-for-byte reproducible (a fixed
``svg.hashsalt``, no date in the metadata) so a re-render shows no spurious diff.
Each timeline bar carries a gid ``span-<variant>-<span>``: tests count them.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.stats import metric_values, ok_runs

RC: Any = {"svg.hashsalt": "guestinit-bench", "svg.fonttype": "path", "font.size": 8.0}
ROW_INCHES = 0.22
WIDTH_INCHES = 10.0
COLOURS = tuple(matplotlib.colormaps["tab20"](i) for i in range(20))


def gid(*parts: str) -> str:
    """An XML-safe id from ``parts``."""
    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", p) for p in parts)


def median_spans(variant: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """(name, median start, median end) per span over the OK runs, first-seen order.

    A name seen twice in one run becomes ``name#2`` so each occurrence keeps its place.
    """
    starts: dict[str, list[float]] = {}
    ends: dict[str, list[float]] = {}
    for run in ok_runs(variant):
        seen: dict[str, int] = {}
        for span in run.get("spans", []):
            seen[span["name"]] = seen.get(span["name"], 0) + 1
            n = seen[span["name"]]
            key = span["name"] if n == 1 else f"{span['name']}#{n}"
            starts.setdefault(key, []).append(float(span["start_s"]))
            ends.setdefault(key, []).append(float(span["end_s"]))
    return [(k, statistics.median(starts[k]), statistics.median(ends[k])) for k in starts]


def save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"Date": None} if path.suffix == ".svg" else {"Software": None}
    fig.savefig(path, metadata=meta, dpi=120 if path.suffix == ".png" else "figure")
    plt.close(fig)
    return path


def timeline(doc: Mapping[str, Any], path: Path) -> Path:
    """Gantt of the median spans: a row group per variant, a labelled bar per span."""
    groups = [(name, median_spans(v)) for name, v in doc["variants"].items()]
    rows = sum(max(len(spans), 1) + 1 for _, spans in groups)
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(WIDTH_INCHES, 1.0 + rows * ROW_INCHES))
        y = 0
        ticks: list[float] = []
        labels: list[str] = []
        colour_of: dict[str, Any] = {}
        for variant, spans in groups:
            ticks.append(y)
            labels.append(variant)
            y += 1
            if not spans:
                ax.text(0, y, "(no OK run with spans)", va="center")
                y += 1
            for name, start, end in spans:
                colour = colour_of.setdefault(name.split("#")[0],
                                              COLOURS[len(colour_of) % len(COLOURS)])
                ax.barh(y, end - start, left=start, height=0.7, color=colour,
                        gid=gid("span", variant, name))
                ax.text(end, y, f" {name} {(end - start) * 1e3:.0f} ms", va="center",
                        fontsize=7)
                ticks.append(y)
                labels.append("")
                y += 1
        ax.set_yticks(ticks, labels, fontweight="bold")
        ax.tick_params(axis="y", length=0)
        ax.set_ylim(y, -1)
        ax.set_xlabel("seconds since QEMU spawn (median over OK runs, host clock)")
        ax.set_title(f"guestinit-bench suite timeline: {doc['machine']['name']}")
        ax.grid(axis="x", linewidth=0.3)
        ax.margins(x=0.15)
        fig.tight_layout()
        return save(fig, path)


def distribution(doc: Mapping[str, Any], path: Path) -> Path:
    """Box plot plus every OK run's ready time, per variant."""
    names = list(doc["variants"])
    data = [metric_values(doc["variants"][n], "ready_s") for n in names]
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(names) + 1.5), 4.0))
        positions = list(range(1, len(names) + 1))
        shown = [(p, d) for p, d in zip(positions, data, strict=True) if d]
        if shown:
            ax.boxplot([d for _, d in shown], positions=[p for p, _ in shown], widths=0.5,
                       whis=(0, 100), showfliers=False)
        for p, values in shown:
            # evenly spread, not random: the same input draws the same points
            n = len(values)
            xs = [p + (i - (n - 1) / 2) * (0.3 / max(n - 1, 1)) for i in range(n)]
            ax.scatter(xs, values, s=12, zorder=3, color=COLOURS[0], gid=gid("runs", str(p)))
        ticks = [f"{n}\n{v['n_ok']} ok / {v['n_failed']} failed"
                 for n, v in ((n, doc["variants"][n]) for n in names)]
        ax.set_xticks(positions, ticks)
        ax.set_xlim(0.4, len(names) + 0.6)
        ax.set_ylabel("QEMU spawn to ready, s")
        ax.set_title(f"ready time per run: {doc['machine']['name']}")
        ax.grid(axis="y", linewidth=0.3)
        fig.tight_layout()
        return save(fig, path)
