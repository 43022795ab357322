"""Numbers for a suite: STATS of a sample, per-variant summaries, and old-vs-new verdicts.

STATS is the contract's summary of one metric over the OK runs of a variant (see
docs/bench.md): median, inclusive quartiles, min, max, counts and the IQR relative to
the median. ``compare_samples`` says whether a change between two suites is a change
or the noise of the machine; the method is in docs/bench.md ("compare").
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Per-run metrics of the contract, in display order.
METRICS = (
    "host_first_output_s", "host_ready_s", "host_shutdown_s", "host_exit_s",
    "guest_run_init_s", "guest_crng_ready_s", "guest_first_frame_s", "guest_ready_s",
    "userspace_s", "kernel_offset_s", "host_run_init_s",
)
STATS_KEYS = ("median", "q1", "q3", "min", "max", "n_ok", "n_failed", "iqr_rel")
RESAMPLES = 5000
CONFIDENCE = 0.95
MIN_FOR_INTERVAL = 3
TOO_FEW = "too few runs for an interval"
BELOW_FLOOR = "change below the absolute floor"
FLOOR_S = 0.002  # a median change smaller than this is no change, whatever its percent


def summarize(values: Sequence[float | None], n_failed: int) -> dict[str, Any]:
    """STATS over the non-null ``values``; ``n_failed`` is carried as given."""
    ok = sorted(float(v) for v in values if v is not None)
    out: dict[str, Any] = dict.fromkeys(STATS_KEYS)
    out["n_ok"] = len(ok)
    out["n_failed"] = n_failed
    if not ok:
        return out
    median = statistics.median(ok)
    if len(ok) == 1:
        q1 = q3 = median  # statistics.quantiles needs two points before Python 3.13
    else:
        q1, _, q3 = statistics.quantiles(ok, n=4, method="inclusive")
    out.update(median=median, q1=q1, q3=q3, min=ok[0], max=ok[-1],
               iqr_rel=(q3 - q1) / median if median else None)
    return out


def ok_runs(variant: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [r for r in variant.get("runs", []) if r.get("ok")]


def metric_values(variant: Mapping[str, Any], metric: str) -> list[float]:
    """One metric over the OK runs (nulls dropped); ``ready_s`` is ``host_ready_s``."""
    key = "host_ready_s" if metric == "ready_s" else metric
    return [float(r[key]) for r in ok_runs(variant) if r.get(key) is not None]


def stage_durations(runs: Iterable[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Duration per stage name over ``runs``, first-seen order; a repeated name is summed."""
    out: dict[str, list[float]] = {}
    for run in runs:
        per_run: dict[str, float] = {}
        for stage in run.get("stages", []):
            per_run[stage["name"]] = (per_run.get(stage["name"], 0.0)
                                      + stage["end_s"] - stage["start_s"])
        for name, seconds in per_run.items():
            out.setdefault(name, []).append(seconds)
    return out


def summarize_variant(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """n_ok, n_failed, ready_s, metrics and stages of one variant from its measured runs.

    The runner's shortcut: it adds image, root, init, append, cmdline, runs and failures.
    """
    ok = [r for r in runs if r.get("ok")]
    n_failed = len(runs) - len(ok)
    return {
        "n_ok": len(ok),
        "n_failed": n_failed,
        "ready_s": summarize([r.get("host_ready_s") for r in ok], n_failed),
        "metrics": {m: summarize([r.get(m) for r in ok], n_failed) for m in METRICS},
        "stages": {name: summarize(values, n_failed)
                   for name, values in stage_durations(ok).items()},
    }


class Verdict(enum.StrEnum):
    REGRESSION = "regression"    # slower by more than the threshold, outside the noise
    IMPROVEMENT = "improvement"  # faster by more than the threshold, outside the noise
    NOISE = "noise"              # beyond the threshold, but the interval includes no change
    UNCHANGED = "unchanged"      # within the threshold


@dataclass(frozen=True)
class Change:
    """``new`` against ``old``: relative change of the medians, its interval, the verdict."""

    old_median: float
    new_median: float
    change: float                # new_median / old_median - 1
    ci_low: float | None         # bootstrap interval of ``change``; None with too few runs
    ci_high: float | None
    verdict: Verdict
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"old_median": self.old_median, "new_median": self.new_median,
                "change": self.change, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "verdict": self.verdict.value, "note": self.note}


def _relative(old: float, new: float) -> float:
    if old == 0:
        return 0.0 if new == 0 else float("inf")
    return new / old - 1


def bootstrap_interval(old: Sequence[float], new: Sequence[float], seed: int = 0,
                       resamples: int = RESAMPLES) -> tuple[float, float]:
    """95% percentile-bootstrap interval of new/old - 1 for the medians (each side resampled)."""
    import numpy as np  # only compare needs it

    rng = np.random.default_rng(seed)
    a = np.asarray(old, dtype=float)
    b = np.asarray(new, dtype=float)
    med_a = np.median(a[rng.integers(0, len(a), (resamples, len(a)))], axis=1)
    med_b = np.median(b[rng.integers(0, len(b), (resamples, len(b)))], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = med_b / med_a - 1
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.nanpercentile(rel, [tail, 100 - tail])
    return float(low), float(high)


def compare_samples(old: Sequence[float], new: Sequence[float], threshold: float,
                    seed: int = 0, floor: float = FLOOR_S) -> Change:
    """Verdict on ``new`` against ``old``; ``threshold`` is a fraction (0.05 = 5%).

    Both sides need at least one value. A regression is a median change above
    ``threshold`` whose interval lies wholly above 0; an improvement the mirror image.
    A change of the medians smaller than ``floor`` seconds is UNCHANGED: stages of a
    tenth of a millisecond double from run to run without anyone waiting longer.
    """
    if not old or not new:
        raise ValueError("compare_samples needs at least one value on each side")
    old_median = statistics.median(old)
    new_median = statistics.median(new)
    change = _relative(old_median, new_median)
    if abs(new_median - old_median) < floor:
        return Change(old_median, new_median, change, None, None, Verdict.UNCHANGED,
                      BELOW_FLOOR)
    if min(len(old), len(new)) < MIN_FOR_INTERVAL:
        if change > threshold:
            verdict = Verdict.REGRESSION
        elif change < -threshold:
            verdict = Verdict.IMPROVEMENT
        else:
            verdict = Verdict.UNCHANGED
        return Change(old_median, new_median, change, None, None, verdict, TOO_FEW)
    low, high = bootstrap_interval(old, new, seed)
    if change > threshold and low > 0:
        verdict = Verdict.REGRESSION
    elif change < -threshold and high < 0:
        verdict = Verdict.IMPROVEMENT
    elif abs(change) > threshold:
        verdict = Verdict.NOISE
    else:
        verdict = Verdict.UNCHANGED
    return Change(old_median, new_median, change, low, high, verdict)
