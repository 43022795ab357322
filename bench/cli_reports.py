"""``guestinit-bench report`` and ``compare``: everything that works from a suite.json.

``report`` re-renders a result directory; ``compare`` says, per variant and metric,
whether NEW is slower than OLD beyond the threshold and the noise (docs/bench.md,
"compare"). Both read through ``bench.suite_schema.load_suite``; the heavy imports
(jsonschema, numpy, matplotlib, prometheus_client) happen only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cli_args import threshold
from bench.stats import (
    FLOOR_S,
    Change,
    Verdict,
    compare_samples,
    metric_values,
    ok_runs,
    stage_durations,
)

EXIT_REGRESSION = 1
EXIT_UNUSABLE = 2
FORMATS = ("md", "json", "openmetrics", "svg", "all")
HEADLINE_METRICS = ("ready_s", "userspace_s")
STAGE_PREFIX = "stage:"


def add_commands(sub: Any) -> None:
    """Register ``report`` and ``compare`` on the top-level parser's subparsers."""
    r = sub.add_parser("report", help="re-render a suite result directory from its suite.json")
    r.add_argument("dir", metavar="DIR", help="result directory (or its suite.json)")
    r.add_argument("--format", choices=FORMATS, default="md",
                   help="md, json, openmetrics (stdout or --out FILE); svg (timeline.svg and "
                   "distribution.svg into DIR or --out DIR); all (every file into DIR or --out)")
    r.add_argument("--out", metavar="FILE", help="file (md, json, openmetrics) or directory")
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("compare", help="old vs new suite: regressions beyond the noise")
    c.add_argument("old", metavar="OLD", help="result directory or suite.json")
    c.add_argument("new", metavar="NEW", help="result directory or suite.json")
    c.add_argument("--threshold", type=threshold, default=5.0, metavar="PCT",
                   help="smallest median change that counts, in percent (default 5)")
    c.add_argument("--floor-ms", type=threshold, default=FLOOR_S * 1000, metavar="MS",
                   help="a median change smaller than this many milliseconds is no change "
                   f"(default {FLOOR_S * 1000:g})")
    c.add_argument("--allow-other-machine", action="store_true",
                   help="compare even when the machines differ (cpu, cores, accel, ...)")
    c.add_argument("--json", action="store_true", help="print the comparison as JSON")
    c.set_defaults(func=cmd_compare)


def _base_dir(path: str) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def cmd_report(args: argparse.Namespace) -> int:
    from bench import suite_report
    from bench.suite_schema import SuiteError, load_suite

    try:
        doc = load_suite(args.dir)
    except SuiteError as exc:
        print(f"guestinit-bench report: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    fmt = args.format
    if fmt in ("svg", "all"):
        out_dir = Path(args.out) if args.out else _base_dir(args.dir)
        if fmt == "all":
            written = suite_report.write_all(doc, out_dir)
            if "bar_sweep" in doc:  # a bar-sweep's result: its own renderings too
                from bench import bar_report

                written += bar_report.write_all(doc, out_dir)
        else:
            written = [suite_report.timeline_svg(doc, out_dir / "timeline.svg"),
                       suite_report.distribution_svg(doc, out_dir / "distribution.svg")]
        for path in written:
            print(f"wrote {path}")
        return 0
    if fmt == "md":
        text = suite_report.markdown(doc)
        if "bar_sweep" in doc:
            from bench import bar_report

            text = bar_report.markdown(doc) + "\n" + text
    elif fmt == "openmetrics":
        text = suite_report.openmetrics(doc)
    else:
        text = json.dumps(doc, indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


@dataclass
class Row:
    variant: str
    metric: str
    n_old: int
    n_new: int
    change: Change | None  # None when a side has no value

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"variant": self.variant, "metric": self.metric,
                               "n_old": self.n_old, "n_new": self.n_new}
        out.update(self.change.as_dict() if self.change else {"verdict": "no data"})
        return out


@dataclass
class Comparison:
    threshold: float  # fraction
    machine_differences: list[str]
    rows: list[Row] = field(default_factory=list)
    only_old: list[str] = field(default_factory=list)
    only_new: list[str] = field(default_factory=list)

    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.change and r.change.verdict is Verdict.REGRESSION]


def metric_samples(variant: Mapping[str, Any]) -> dict[str, list[float]]:
    """Per-run values compared: ready_s, userspace_s, then each stage (``stage:NAME``)."""
    out = {m: metric_values(variant, m) for m in HEADLINE_METRICS}
    for name, values in stage_durations(ok_runs(variant)).items():
        out[STAGE_PREFIX + name] = values
    return out


def compare_docs(old: Mapping[str, Any], new: Mapping[str, Any], threshold: float,
                 seed: int = 0, floor: float = FLOOR_S) -> Comparison:
    """Every common variant's metrics, new against old (``threshold`` a fraction)."""
    from bench.suite_schema import machine_differences

    result = Comparison(threshold, machine_differences(dict(old), dict(new)))
    result.only_old = [v for v in old["variants"] if v not in new["variants"]]
    result.only_new = [v for v in new["variants"] if v not in old["variants"]]
    for name in (v for v in new["variants"] if v in old["variants"]):
        a = metric_samples(old["variants"][name])
        b = metric_samples(new["variants"][name])
        for metric in dict.fromkeys([*a, *b]):
            va, vb = a.get(metric, []), b.get(metric, [])
            if not va and not vb:
                continue
            change = compare_samples(va, vb, threshold, seed, floor) if va and vb else None
            result.rows.append(Row(name, metric, len(va), len(vb), change))
    return result


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def comparison_text(cmp: Comparison, old: str, new: str) -> str:
    from bench.stats import RESAMPLES

    out = [f"compare {old} -> {new}: threshold {cmp.threshold * 100:g}%, 95% bootstrap "
           f"interval of the median change ({RESAMPLES} resamples)"]
    if cmp.machine_differences:
        out.append("machines differ in " + ", ".join(cmp.machine_differences)
                   + " (--allow-other-machine)")
    width = max([len(r.metric) for r in cmp.rows] + [6])
    vwidth = max([len(r.variant) for r in cmp.rows] + [7])
    out.append(f"{'variant':<{vwidth}}  {'metric':<{width}}  {'old s':>9}  {'new s':>9}  "
               f"{'change':>8}  {'95% CI':<18}  verdict")
    for r in cmp.rows:
        c = r.change
        if c is None:
            side = "old" if r.n_old == 0 else "new"
            out.append(f"{r.variant:<{vwidth}}  {r.metric:<{width}}  no values in {side}")
            continue
        ci = (f"[{_pct(c.ci_low)}, {_pct(c.ci_high)}]" if c.ci_low is not None
              and c.ci_high is not None else "n/a")
        note = f" ({c.note})" if c.note else ""
        out.append(f"{r.variant:<{vwidth}}  {r.metric:<{width}}  {c.old_median:>9.4f}  "
                   f"{c.new_median:>9.4f}  {_pct(c.change):>8}  {ci:<18}  "
                   f"{c.verdict.value.upper()}{note}")
    for side, names in (("OLD", cmp.only_old), ("NEW", cmp.only_new)):
        if names:
            out.append(f"only in {side}: {', '.join(names)}")
    regs = cmp.regressions()
    out.append("result: " + (f"{len(regs)} regression(s): "
                             + ", ".join(f"{r.variant} {r.metric}" for r in regs)
                             if regs else "no regression"))
    return "\n".join(out)


def comparison_json(cmp: Comparison, old: str, new: str) -> dict[str, Any]:
    return {"old": old, "new": new, "threshold": cmp.threshold,
            "machine_differences": cmp.machine_differences,
            "rows": [r.as_dict() for r in cmp.rows], "only_old": cmp.only_old,
            "only_new": cmp.only_new, "regression": bool(cmp.regressions())}


def cmd_compare(args: argparse.Namespace) -> int:
    from bench.suite_schema import SuiteError, load_suite, machine_differences

    def fail(what: str) -> int:
        print(f"guestinit-bench compare: {what}", file=sys.stderr)
        return EXIT_UNUSABLE

    try:
        old = load_suite(args.old)
        new = load_suite(args.new)
    except SuiteError as exc:
        return fail(str(exc))
    differ = machine_differences(old, new)
    if differ and not args.allow_other_machine:
        detail = "; ".join(f"{k}: {old['machine'].get(k)!r} vs {new['machine'].get(k)!r}"
                           for k in differ)
        return fail(f"different machines ({detail}); pass --allow-other-machine to compare "
                    "anyway")
    if not any(v in old["variants"] for v in new["variants"]):
        return fail(f"no common variant (old: {', '.join(old['variants']) or 'none'}; "
                    f"new: {', '.join(new['variants']) or 'none'})")
    cmp = compare_docs(old, new, args.threshold / 100, floor=args.floor_ms / 1000)
    if args.json:
        print(json.dumps(comparison_json(cmp, args.old, args.new), indent=1))
    else:
        print(comparison_text(cmp, args.old, args.new))
    return EXIT_REGRESSION if cmp.regressions() else 0
