"""``guestinit-bench optimize``: A/B candidates against a base, compose the winners
(docs/bench.md, "optimize"). Decisions are in bench/optimize.py, the report in
bench/optimize_report.py; this module parses, boots the two phases and writes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bench.cli_args import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,  # bad input, or the base never booted
    add_vmm_options,
    positive_count,
    threshold,
)
from bench.qemu import ENTROPY
from bench.stats import FLOOR_S, METRICS

PHASE1, PHASE2 = "phase1", "phase2"


def _say(text: str) -> None:
    print(f"guestinit-bench optimize: {text}", file=sys.stderr)


def gather(args: argparse.Namespace) -> tuple[list[Any], str | None, str]:
    """(candidates, base cmdline or None for the image's, where the base cmdline is from).

    With no candidate given, fast.txt's options are the candidates; unless
    --base-cmdline says otherwise the base is then the image's cmdline without them
    (the cpu image already carries fast.txt: against it they would measure nothing).
    """
    from bench import image, optimize

    given = [optimize.parse_candidate(text) for text in args.candidate]
    if args.candidates_file:
        given += optimize.read_candidates_file(Path(args.candidates_file))
    if given:
        return given, args.base_cmdline, ("image" if args.base_cmdline is None
                                          else "--base-cmdline")
    defaults = optimize.preset_candidates(optimize.fast_preset())
    if args.base_cmdline is not None:
        return defaults, args.base_cmdline, "--base-cmdline"
    try:
        base = image.load(os.path.abspath(args.base))
    except image.ImageError as exc:
        raise optimize.OptimizeError(f"base: {exc}") from None
    return defaults, optimize.without_words(base.cmdline, defaults), "image less the candidates"


def _phase(name: str, variants: list[Any], images: dict[str, Any], settings: Any,
           machine: dict[str, object], out_dir: str) -> tuple[dict[str, Any], bool]:
    """Boot one interleaved phase into OUT/<name>/suite.json (+ suite.md)."""
    from bench import suite, suite_report
    from bench.cli_suite import run_interleaved

    phase_dir = os.path.join(out_dir, name)
    total = (settings.runs + settings.warmup) * len(variants)
    print(f"optimize {name}: {', '.join(v.name for v in variants)}; {settings.warmup} "
          f"warm-up + {settings.runs} measured runs each, interleaved; {total} boots",
          file=sys.stderr)
    entries, interrupted = run_interleaved(variants, images, settings, phase_dir, total)
    doc = suite.assemble(entries, machine, settings, interrupted=interrupted)
    suite.write_doc(doc, phase_dir)
    Path(phase_dir, "suite.md").write_text(suite_report.markdown(doc), encoding="utf-8")
    return doc, interrupted


def _never_booted(entry: dict[str, Any]) -> str | None:
    if entry["n_ok"]:
        return None
    why = f": {entry['failures'][0]['reason']}" if entry["failures"] else ""
    return f"the base never booted (0 of {entry['n_failed']} runs OK){why}"


def cmd_optimize(args: argparse.Namespace) -> int:
    from bench import optimize, optimize_report, suite
    from bench.cli_suite import suite_settings

    try:
        candidates, base_cmdline, cmdline_from = gather(args)
        plan = optimize.plan(args.base, base_cmdline, candidates)
    except optimize.OptimizeError as exc:
        _say(str(exc))
        return EXIT_USAGE
    images = dict(plan.images)
    settings = suite_settings(args, images, ".")
    settings.base_cmdline = plan.base_cmdline
    machine = suite.machine_for(images, settings)
    out_dir = args.out or suite.default_out_dir(f"{machine['name']}-optimize")
    threshold, floor = args.threshold / 100, args.floor_ms / 1000
    print(f"optimize: base {plan.base_dir}, cmdline ({cmdline_from}) {plan.base_cmdline!r}; "
          f"{len(candidates)} candidates; metric {args.metric}, threshold "
          f"{args.threshold:g}%; VMM: QEMU {machine['machine_type']}, {settings.accel} "
          f"({settings.accel_why}), -cpu {machine['cpu']}, entropy {args.entropy}, "
          f"{args.memory} MiB; results in {out_dir}", file=sys.stderr)

    doc1, interrupted = _phase(PHASE1, list(plan.variants), images, settings, machine, out_dir)
    if interrupted:
        _say(f"interrupted: partial results in {out_dir}/{PHASE1}")
        return EXIT_INTERRUPTED
    entries = doc1["variants"]
    base_entry = entries[optimize.BASE]
    decisions = {c.name: optimize.decide_variant(base_entry, entries[c.name], args.metric,
                                                 threshold, floor) for c in candidates}
    accepted = [(c, d.median) for c in candidates
                if (d := decisions[c.name]).accepted and d.median is not None]
    never = _never_booted(base_entry)
    comp, confirmed, why_not, phase2 = None, None, "", None
    if never:
        why_not = f"nothing can be decided: {never}"
    elif not accepted:
        why_not = "keep the base: no candidate was faster beyond the noise"
    else:
        comp, comp_image = optimize.load_composition(optimize.compose(plan.base_dir, accepted))
        variants = [plan.variants[0], optimize.composition_variant(comp, plan.base_cmdline)]
        doc2, interrupted = _phase(PHASE2, variants, {optimize.BASE: images[optimize.BASE],
                                                      optimize.COMPOSED: comp_image},
                                   settings, machine, out_dir)
        if interrupted:
            _say(f"interrupted: partial results in {out_dir}/{PHASE2}")
            return EXIT_INTERRUPTED
        phase2 = f"{PHASE2}/suite.json"
        e2 = doc2["variants"]
        confirmed = optimize.decide_variant(e2[optimize.BASE], e2[optimize.COMPOSED],
                                            args.metric, threshold, floor)
        never = _never_booted(e2[optimize.BASE])
    doc = optimize_report.document(
        plan=plan, decisions=decisions, base=base_entry, cmdline_from=cmdline_from,
        machine=machine, command=["guestinit-bench", *sys.argv[1:]], comp=comp,
        confirmed=confirmed, why_not=why_not,
        phases={"candidates": f"{PHASE1}/suite.json", "composition": phase2},
        settings={"runs": settings.runs, "warmup": settings.warmup, "order": "interleaved",
                  "metric": args.metric, "threshold": threshold, "floor_s": floor,
                  "timeout_s": settings.timeout, "memory_mib": settings.memory_mib,
                  "entropy": settings.entropy})
    optimize_report.write_all(doc, out_dir)
    print(optimize_report.markdown(doc))
    print(f"wrote {out_dir}/: {', '.join(optimize_report.OUTPUTS)}, {PHASE1}/suite.json"
          + (f", {phase2}" if phase2 else ""), file=sys.stderr)
    if never:
        _say(never)
        return EXIT_USAGE
    return 0


def add_commands(sub: Any) -> None:
    """Register ``optimize`` on the top-level parser's subparsers."""
    o = sub.add_parser("optimize", help="A/B boot changes against a base, interleaved; "
                       "keep those faster beyond the noise and measure them together")
    o.add_argument("--base", default="out/cpu", metavar="DIR",
                   help="the base image directory (default out/cpu), booted from its initramfs")
    o.add_argument("--base-cmdline", metavar="WORDS",
                   help="replace the base image's cmdline.txt words (an erofs boot keeps its "
                   "verity root words), to evaluate flags the image bakes in from scratch")
    o.add_argument("--candidate", action="append", default=[], metavar="NAME=SPEC",
                   help="cmdline:WORDS, image:DIR or erofs; repeatable (default: each option "
                   "of kernel-config/cmdline/fast.txt)")
    o.add_argument("--candidates-file", metavar="FILE",
                   help="one NAME=SPEC per line, # starts a comment")
    o.add_argument("--metric", choices=("ready_s", *METRICS), default="host_ready_s",
                   help="the per-run metric judged (default host_ready_s; e.g. "
                   "guest_run_init_s for the kernel's Run /init)")
    o.add_argument("--threshold", type=threshold, default=5.0, metavar="PCT",
                   help="smallest median change that counts, in percent (default 5, as "
                   "compare)")
    o.add_argument("--floor-ms", type=threshold, default=FLOOR_S * 1000, metavar="MS",
                   help=f"a median change under this is no change (default {FLOOR_S * 1000:g})")
    o.add_argument("--runs", type=positive_count, default=5, metavar="N",
                   help="measured runs per variant and phase (default 5)")
    o.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="rounds run first and thrown away, per phase (default 1)")
    o.add_argument("--out", metavar="DIR",
                   help="result directory (default bench/results/<date>-<accel>-<cores>c-"
                   "optimize)")
    o.add_argument("--entropy", choices=ENTROPY, default="rdrand",
                   help="the guest's early entropy source (default rdrand; see suite)")
    add_vmm_options(o)
    o.set_defaults(func=cmd_optimize)
