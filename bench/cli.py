"""``guestinit-bench``: boot images in QEMU and read what the guest reports."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from bench import cli_bar, cli_optimize, cli_reports, cli_suite
from bench.cli_args import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, positive_count
from bench.qemu import ENTROPY


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


def _cmd_init(args: argparse.Namespace) -> int:
    from bench.init_bench import main as init_main  # only when asked for

    return int(init_main(args.rest) or 0)


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

    cli_suite.add_commands(sub)

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
    if words[:1] == ["init"]:  # its own parser (bench/init_bench.py) reads the options
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
