"""``guestinit-bench``: boot images in QEMU and read what the guest reports."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from bench import cli_bar, cli_optimize, cli_reports
from bench.qemu import ENTROPY

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _cmd_boot(args: argparse.Namespace) -> int:
    from bench import image, report
    from bench.boot import BootOptions, prepare, run

    try:
        if args.machine == "kata":
            img = image.load_kata(args.out_dir, initrd=args.initrd)
        else:
            img = image.load(args.out_dir, erofs=args.erofs, entry=args.entry)
    except image.ImageError as exc:
        print(f"guestinit-bench boot: {exc}", file=sys.stderr)
        return EXIT_USAGE
    opts = BootOptions(
        append=args.append, timeout=args.timeout, erofs=args.erofs,
        shutdown=not args.no_shutdown, memory_mib=args.memory, accel=args.accel,
        workdir=args.workdir, hold_until=args.hold_until, qemu=args.qemu,
        entropy=args.entropy, firmware=args.firmware,
    )
    if img.machine == "kata":
        root = "Kata initrd" if args.initrd else "Kata disk: erofs p1 + dm-verity p2"
        vmm = f"Kata's machine (q35 + {args.firmware})"
    else:
        root = "erofs + dm-verity disk" if args.erofs else "initramfs"
        vmm = "QEMU microvm"
    print(f"booting {img.directory} ({root}) in {vmm}, {opts.memory_mib} MiB", flush=True)
    results = []
    for i in range(args.runs):
        if args.workdir and args.runs > 1:
            opts.workdir = os.path.join(args.workdir, f"run{i + 1}")
        res, spec = prepare(img, opts)
        if i == 0:
            print(f"accelerator: {res.accel} ({res.accel_why})")
            print(f"kernel cmdline: {res.cmdline}")
        print(f"console log: {res.console_log}", flush=True)
        run(res, spec, opts, progress=sys.stderr)
        results.append(res)
        if args.runs > 1:
            print(f"run {i + 1}/{args.runs}: {report.one_line(res)}", flush=True)
    shown = next((r for r in results if not r.ok), results[-1])
    if args.frames:
        print("frames:")
        print(report.frames_text(shown))
    print(report.text(shown))
    if args.runs > 1:
        print(report.medians_text(results))
    if args.json:
        from bench.machine import describe_machine, guest_kernel

        machine = describe_machine(results[0].accel, opts.entropy, opts.qemu,
                                   guest_kernel(img.directory), opts.memory_mib)
        with open(args.json, "w", encoding="utf-8") as fh:
            report.write_json(results, fh, machine)
        print(f"wrote {args.json}")
    return 0 if all(r.ok for r in results) else EXIT_FAILED


def _cmd_listen(args: argparse.Namespace) -> int:
    from bench.listen import Printer, UriError, listen

    printer = Printer(sys.stdout, args.json)
    try:
        listen(args.uri, printer, keep=args.keep)
    except UriError as exc:
        print(f"guestinit-bench listen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_FAILED if printer.errors else 0


def _cmd_suite(args: argparse.Namespace) -> int:
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
    _write_results(doc, out_dir)
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


def _write_results(doc: dict[str, object], out_dir: str) -> None:
    from bench import suite, suite_report

    path = suite.write_doc(doc, out_dir)
    suite_report.write_all(doc, out_dir)
    print(suite_report.markdown(doc))
    print(f"wrote {path} and its reports (suite.md, timeline.svg/.png, distribution.svg, "
          "suite.prom)", file=sys.stderr)


def _cmd_init(args: argparse.Namespace) -> int:
    import importlib

    # bench/init.py (the namespace init benchmark) is imported only when asked for.
    init_main = importlib.import_module("bench.init").main
    return int(init_main(args.rest) or 0)


def positive_count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count")
    return value


def bar_size(text: str) -> int:
    from bench.bar_sweep import parse_sizes
    from bench.suite import SuiteError

    try:
        (size,) = parse_sizes(text)
    except (SuiteError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--sizes: ")) from None
    return size


def add_vmm_options(p: argparse.ArgumentParser) -> None:
    """The per-boot options of suite and bar-sweep."""
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds from QEMU start to the ready frame, per boot (default 120)")
    p.add_argument("--memory", type=int, default=1024, metavar="MiB", help="guest RAM")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--qemu", default="qemu-system-x86_64", metavar="PATH")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep every run's console log in DIR/logs (default: failed runs')")


STANDIN_BAR = 64 << 20


def standin_counts(text: str) -> tuple[int, int]:
    gpus, _, switches = text.partition(",")
    if not (gpus.isdigit() and switches.isdigit()) or int(gpus) + int(switches) > 30:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GPUS,SWITCHES, e.g. 2,0 "
                                         "(30 devices at most: one PCI slot each)")
    return int(gpus), int(switches)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="guestinit-bench",
        description="Boot guestinit images in QEMU and read what the guest reports.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("boot", help="boot an image directory in QEMU and report on it")
    b.add_argument("out_dir", metavar="OUT_DIR", help="image directory, e.g. out/cpu")
    b.add_argument("--append", default="", metavar="ARGS",
                   help="extra kernel cmdline words, e.g. 'guestinit.log=debug'")
    b.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="seconds from QEMU start to the ready frame (default 60)")
    b.add_argument("--json", metavar="FILE", help="write timings and every frame as JSON")
    b.add_argument("--erofs", action="store_true",
                   help="boot the erofs + dm-verity root disk instead of the initramfs alone")
    b.add_argument("--entry", choices=("auto", "pvh", "bzimage"), default="auto",
                   help="how QEMU enters the kernel: auto (the image's vmlinux at its PVH "
                   "note when it has one, else vmlinuz), pvh or bzimage")
    b.add_argument("--machine", choices=("microvm", "kata"), default="microvm",
                   help="microvm (default) or kata: Kata's q35 + OVMF machine booting the "
                   "image's configuration.toml with the cmdline Kata's runtime writes "
                   "(docs/kata.md)")
    b.add_argument("--initrd", action="store_true",
                   help="with --machine kata: boot configuration-initrd.toml (initrd =)")
    b.add_argument("--firmware", default="/usr/share/ovmf/OVMF.fd", metavar="PATH",
                   help="OVMF image for --machine kata (default: Debian's ovmf package)")
    b.add_argument("--no-shutdown", action="store_true",
                   help="do not ask for a powerdown after ready; wait for the guest to stop")
    b.add_argument("--memory", type=int, default=1024, metavar="MiB", help="guest RAM")
    b.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="auto (default) uses KVM only when a cached probe boot shows it works")
    b.add_argument("--workdir", metavar="DIR",
                   help="where the console log and sockets go (default: a new /tmp dir)")
    b.add_argument("--frames", action="store_true", help="also list every frame received")
    b.add_argument("--qemu", default="qemu-system-x86_64", metavar="PATH",
                   help="the QEMU binary (default qemu-system-x86_64 on PATH)")
    b.add_argument("--runs", type=positive_count, default=1, metavar="N",
                   help="boot N times and print the median timings (default 1)")
    b.add_argument("--entropy", choices=ENTROPY, default="rdrand",
                   help="the guest's early entropy source (default rdrand; see suite)")
    b.add_argument("--hold-until", metavar="TEXT",
                   help="after ready, wait (up to --timeout) for TEXT on the serial console "
                   "before asking for the powerdown")
    b.set_defaults(func=_cmd_boot)

    li = sub.add_parser("listen", help="print the frames arriving on a report channel")
    li.add_argument("uri", metavar="URI", help="unix:PATH, vsock:CID:PORT, hvsock:UDS:PORT "
                    "(Firecracker/Cloud Hypervisor: listen on UDS_PORT), "
                    "hvsock-connect:UDS:PORT (CONNECT to a guest listener) or console:FILE")
    li.add_argument("--json", action="store_true", help="one JSON object per line")
    li.add_argument("--keep", action="store_true",
                    help="keep accepting connections (default: exit after the first closes)")
    li.set_defaults(func=_cmd_listen)

    su = sub.add_parser("suite", help="boot variants side by side (interleaved) and write "
                        "a result directory: suite.json, suite.md, plots, OpenMetrics")
    su.add_argument("--variants", metavar="A,B,...",
                    help="comma-separated built-in variants (default "
                    "guestinit,guestinit-erofs,busybox,systemd; also guestinit-agent)")
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
    su.set_defaults(func=_cmd_suite)

    ini = sub.add_parser("init", help="the init benchmark (guestinit vs others, no VM)",
                         add_help=False)
    ini.add_argument("rest", nargs=argparse.REMAINDER)
    ini.set_defaults(func=_cmd_init)
    cli_reports.add_commands(sub)
    cli_bar.add_commands(sub)
    cli_optimize.add_commands(sub)
    return top


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["init"]:  # its own parser (bench/init.py) reads the options
        return _cmd_init(argparse.Namespace(rest=words[1:]))
    args = parser().parse_args(words)
    # SIGTERM/SIGHUP (CI cancelling a job, a closed terminal) unwind like Ctrl-C, so the
    # finally blocks stop and reap QEMU instead of leaving it running in its own session.
    saved = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted; QEMU stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return rc


if __name__ == "__main__":
    sys.exit(main())
