"""``guestinit-bench suite``, and the suite runner's front end that bar-sweep and optimize
share: settings from the options, interleaved runs with progress, results, verdict."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bench.cli_args import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    STANDIN_BAR,
    add_vmm_options,
    bar_size,
    positive_count,
    standin_counts,
)
from bench.qemu import ENTROPY


def cmd_suite(args: argparse.Namespace) -> int:
    from bench import suite

    names = [n for n in args.variants.split(",") if n] if args.variants else list(
        suite.KATA_DEFAULT_VARIANTS if args.machine == "kata" else suite.DEFAULT_VARIANTS)
    try:
        variants = suite.select(names, args.append, args.also_entropy_none, args.image,
                                args.machine)
        images = suite.load_images(variants, args.images)
    except suite.SuiteError as exc:
        print(f"guestinit-bench suite: {exc}", file=sys.stderr)
        return EXIT_USAGE
    settings = suite_settings(args, images, args.images)
    accel, why = settings.accel, settings.accel_why
    if args.bar is not None or args.standin is not None:  # every variant on PCIe
        from bench.bar_sweep import on_pcie
        from bench.qemu import BarDevice, phys_bits_for

        gpus, switches = args.standin or (1, 0)
        size = args.bar if args.bar is not None else STANDIN_BAR
        settings.bar = BarDevice(size, phys_bits_for(size), gpus, switches)
    machine = suite.machine_for(images, settings)
    if settings.bar is not None:
        on_pcie(machine, settings.bar)
    out_dir = args.out or suite.default_out_dir(str(machine["name"]))
    total = (args.runs + args.warmup) * len(variants)
    print(f"suite: {len(variants)} variants ({', '.join(v.name for v in variants)}), "
          f"{args.warmup} warm-up + {args.runs} measured runs each, interleaved; "
          f"{total} boots", file=sys.stderr)
    print(f"VMM: QEMU {machine['machine_type']}, {accel} ({why}), -cpu {machine['cpu']}, "
          f"entropy {args.entropy}, {args.memory} MiB, 1 vCPU; results in {out_dir}",
          file=sys.stderr)
    doc_variants, interrupted = run_interleaved(variants, images, settings, out_dir, total)
    doc = suite.assemble(doc_variants, machine, settings, interrupted=interrupted)
    write_results(doc, out_dir)
    return verdict(doc, interrupted, "suite")


def verdict(doc: dict[str, object], interrupted: bool, command: str) -> int:
    """The exit status of a suite-like run, with the lines that say why on stderr."""
    from bench import suite

    if interrupted:
        print("interrupted: partial results written", file=sys.stderr)
        return EXIT_INTERRUPTED
    rc, why_lines = suite.verdict(doc)
    for text in why_lines:
        print(f"guestinit-bench {command}: {text}", file=sys.stderr)
    return rc


def suite_settings(args: argparse.Namespace, images: dict[str, Any],
                   images_dir: str) -> Any:
    """suite.Settings from the options suite and bar-sweep share (accelerator chosen)."""
    from bench import suite
    from bench.qemu import choose_accel

    first = next(iter(images.values()))
    accel, why = choose_accel(args.accel, first.kernel, args.qemu)
    return suite.Settings(
        runs=args.runs, warmup=args.warmup, timeout=args.timeout, memory_mib=args.memory,
        accel=accel, accel_why=why, entropy=args.entropy, images=images_dir, qemu=args.qemu,
        keep_logs=args.keep_logs, command=["guestinit-bench", *sys.argv[1:]],
        base_cmdline=first.cmdline)


def run_interleaved(variants: list[Any], images: dict[str, Any], settings: Any, out_dir: str,
                    total: int, extra: Any = None) -> tuple[dict[str, dict[str, object]], bool]:
    """Run the suite with progress; (what was measured, whether it was interrupted)."""
    from bench import suite

    doc_variants: dict[str, dict[str, object]] = {}
    progress = suite.Progress(sys.stderr, total)
    try:
        suite.run_suite(variants, images, settings, out_dir, progress, doc_variants,
                        extra=extra)
    except KeyboardInterrupt:
        return doc_variants, True
    finally:
        progress.stop()
    return doc_variants, False


def write_results(doc: dict[str, object], out_dir: str) -> None:
    from bench import suite, suite_report

    path = suite.write_doc(doc, out_dir)
    suite_report.write_all(doc, out_dir)
    print(suite_report.markdown(doc))
    print(f"wrote {path} and its reports (suite.md, timeline.svg/.png, distribution.svg, "
          "suite.prom)", file=sys.stderr)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``suite`` on the top-level parser's subparsers."""
    su = sub.add_parser("suite", help="boot variants side by side (interleaved) and write "
                        "a result directory: suite.json, suite.md, plots, OpenMetrics")
    su.add_argument("--variants", metavar="A,B,...",
                    help="comma-separated built-in variants (default "
                    "guestinit,guestinit-erofs,busybox,systemd; also guestinit-agent, and "
                    "guestinit-tuned,busybox-tuned,systemd-tuned: the three on cpu-tuned's "
                    "kernel, images out/cpu-tuned, out/baseline-*-tuned)")
    su.add_argument("--append", action="append", default=[], metavar="NAME=ARGS",
                    help="a cmdline variant: guestinit plus ARGS (BASE+NAME=ARGS starts "
                    "from variant BASE, built in or --image); repeatable, e.g. --append "
                    "quiet7=loglevel=7")
    su.add_argument("--image", action="append", default=[], metavar="NAME=DIR",
                    help="another build of a guestinit image as a variant (agent=none), "
                    "e.g. --image before=out/cpu-main; BASE+NAME=DIR boots DIR like "
                    "variant BASE; repeatable")
    su.add_argument("--machine", choices=("microvm", "kata"), default="microvm",
                    help="kata: every variant on Kata's q35 + OVMF machine, each init's "
                    "image in Kata's format on the kata kernel (profiles kata, "
                    "baseline-busybox-kata, baseline-systemd-kata); default variants "
                    "guestinit,busybox,systemd")
    su.add_argument("--runs", type=positive_count, default=5, metavar="N",
                    help="measured runs per variant (default 5)")
    su.add_argument("--warmup", type=int, default=1, metavar="N",
                    help="rounds run first and thrown away (default 1)")
    su.add_argument("--out", metavar="DIR",
                    help="result directory (default bench/results/<date>-<accel>-<cores>c)")
    su.add_argument("--images", default="out", metavar="DIR",
                    help="where the image directories are (default out: out/cpu, "
                    "out/baseline-busybox, out/baseline-systemd)")
    su.add_argument("--entropy", choices=ENTROPY, default="rdrand",
                    help="the guest's early entropy source (default rdrand: -cpu max under "
                    "TCG, the host CPU under KVM; none: QEMU's qemu64 CPU, no RNG device)")
    su.add_argument("--also-entropy-none", action="store_true",
                    help="add a twin of every variant booted with --entropy none "
                    "(named NAME@no-rng)")
    add_vmm_options(su)
    su.add_argument("--bar", type=bar_size, metavar="SIZE",
                    help="boot every variant on microvm with PCIe and one BAR of SIZE (e.g. "
                    "4G; 0: PCIe without the device), as bar-sweep does: a GPU VM's PCI path")
    su.add_argument("--standin", type=standin_counts, metavar="GPUS,SWITCHES",
                    help="boot every variant with GPUS ivshmem-plain GPU stand-ins (BAR "
                    "--bar, default 64M) and SWITCHES edu NVSwitch stand-ins (docs/bench.md)")
    su.set_defaults(func=cmd_suite)
