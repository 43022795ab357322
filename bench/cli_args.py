"""Exit statuses, argument types and options that several ``guestinit-bench`` commands share."""

from __future__ import annotations

import argparse

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
STANDIN_BAR = 64 << 20  # the stand-in GPUs' BAR when --standin comes without --bar


def positive_count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count")
    return value


def threshold(text: str) -> float:
    """--threshold (percent) and --floor-ms of compare and optimize."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a percentage >= 0")
    return value


def bar_size(text: str) -> int:
    from bench.bar_sweep import parse_sizes
    from bench.suite import SuiteError

    try:
        (size,) = parse_sizes(text)
    except (SuiteError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--sizes: ")) from None
    return size


def standin_counts(text: str) -> tuple[int, int]:
    gpus, _, switches = text.partition(",")
    if not (gpus.isdigit() and switches.isdigit()) or int(gpus) + int(switches) > 30:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GPUS,SWITCHES, e.g. 2,0 "
                                         "(30 devices at most: one PCI slot each)")
    return int(gpus), int(switches)


def add_vmm_options(p: argparse.ArgumentParser) -> None:
    """The per-boot options of suite, bar-sweep and optimize."""
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds from QEMU start to the ready frame, per boot (default 120)")
    p.add_argument("--memory", type=int, default=1024, metavar="MiB", help="guest RAM")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--qemu", default="qemu-system-x86_64", metavar="PATH")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep every run's console log in DIR/logs (default: failed runs')")
