"""The optimize chart: each candidate's change against the base, the composition last.

Horizontal bars of the median change (percent) with the 95% interval as the error
bar, in suite_charts' style and with its reproducible-SVG settings. Each bar carries a
gid ``change-<name>`` (the composition's ``change-composed``): tests find them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.suite_charts import COLOURS, RC, WIDTH_INCHES, gid, save

ACCEPTED = COLOURS[4]   # green
REJECTED = COLOURS[15]  # grey
COMPOSED = COLOURS[0]   # blue


def _rows(doc: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any], Any]]:
    rows = [(r["name"], r, ACCEPTED if r["accepted"] else REJECTED) for r in doc["candidates"]]
    if doc["composition"] is not None:
        rows.append(("composed", doc["composition"], COMPOSED))
    return rows


def changes(doc: Mapping[str, Any], path: Path) -> Path:
    rows = _rows(doc)
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(WIDTH_INCHES * 0.8, 1.2 + 0.3 * max(len(rows), 1)))
        for y, (name, row, colour) in enumerate(rows):
            change = row["change"]
            if change is None:
                ax.text(0, y, f"  no data: {row['reason'][:48]}...", va="center", fontsize=7)
                continue
            pct = change * 100
            err = None
            if row["ci_low"] is not None and row["ci_high"] is not None:
                err = [[pct - row["ci_low"] * 100], [row["ci_high"] * 100 - pct]]
            ax.barh(y, pct, height=0.6, color=colour, xerr=err, capsize=3,
                    error_kw={"linewidth": 0.8}, gid=gid("change", name))
            # the label beyond the bar's outer end and its interval, on the side it grows to
            low = pct if err is None else row["ci_low"] * 100
            high = pct if err is None else row["ci_high"] * 100
            label = f"{pct:+.1f}% {str(row['verdict']).upper()}"
            if pct < 0:
                ax.text(min(low, pct), y, label + "  ", va="center", ha="right", fontsize=7)
            else:
                ax.text(max(high, pct), y, "  " + label, va="center", ha="left", fontsize=7)
        ax.set_yticks(range(len(rows)), [name for name, _, _ in rows])
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.axvline(0, color="black", linewidth=0.6)
        threshold = doc["settings"]["threshold"] * 100
        for x in (-threshold, threshold):
            ax.axvline(x, color="grey", linewidth=0.5, linestyle="--")
        ax.set_xlabel(f"change of the median {doc['settings']['metric']} against the base, %\n"
                      "error bars: 95% interval; dashed: the threshold; green accepted, "
                      "grey rejected, blue the composition (phase 2)")
        ax.set_title(f"guestinit-bench optimize: {doc['machine']['name']}")
        ax.grid(axis="x", linewidth=0.3)
        ax.margins(x=0.35)
        fig.tight_layout()
        return save(fig, path)
