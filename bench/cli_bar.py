"""``guestinit-bench bar-sweep`` and ``bar-map``: the PCIe BAR benchmarks (docs/bench.md)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

from bench.cli_args import EXIT_INTERRUPTED, EXIT_USAGE, add_vmm_options, positive_count
from bench.qemu import ENTROPY


def cmd_bar_sweep(args: argparse.Namespace) -> int:
    from bench import bar_report, bar_sweep, suite
    from bench.cli_suite import run_interleaved, suite_settings, verdict, write_results
    from bench.qemu import BAR_BDF
    from guestinit.sizes import parse_size

    try:
        sizes = bar_sweep.parse_sizes(args.sizes)
        span = parse_size(args.bar_map) if args.bar_map else None
        variants, refused = bar_sweep.plan(sizes, os.path.abspath(args.image), span,
                                           args.append)
        if not variants:
            raise suite.SuiteError("no size can be placed: " + "; ".join(refused))
        images = suite.load_images(variants, ".")  # the profile is a path
    except (suite.SuiteError, ValueError) as exc:
        print(f"guestinit-bench bar-sweep: {exc}", file=sys.stderr)
        return EXIT_USAGE
    settings = suite_settings(args, images, ".")
    accel, why = settings.accel, settings.accel_why
    machine = suite.machine_for(images, settings)
    bar = variants[0].bar
    assert bar is not None
    bar_sweep.on_pcie(machine, bar)
    out_dir = args.out or suite.default_out_dir(f"{machine['name']}-bar-sweep")
    for line in refused:
        print(f"guestinit-bench bar-sweep: not booted: {line}", file=sys.stderr)
    total = (args.runs + args.warmup) * len(variants)
    print(f"bar-sweep: {len(variants)} sizes ({', '.join(v.name for v in variants)}), "
          f"{args.warmup} warm-up + {args.runs} measured runs each, interleaved; {total} boots",
          file=sys.stderr)
    print(f"VMM: QEMU microvm,pcie=on, {accel} ({why}), -cpu {machine['cpu']}, entropy "
          f"{args.entropy}, {args.memory} MiB, 1 vCPU; BAR: ivshmem-plain at "
          f"{BAR_BDF}, sparse RAM backend; results in {out_dir}", file=sys.stderr)
    doc_variants, interrupted = run_interleaved(variants, images, settings, out_dir, total,
                                                extra=bar_sweep.check_run)
    doc = suite.assemble(doc_variants, machine, settings, interrupted=interrupted)
    doc["bar_sweep"] = bar_sweep.section(doc_variants, variants, refused)
    write_results(doc, out_dir)
    bar_report.write_all(doc, out_dir)
    print(bar_report.markdown(doc))
    rc = verdict(doc, interrupted, "bar-sweep")
    return EXIT_USAGE if refused and rc != EXIT_INTERRUPTED else rc


def host_description() -> dict[str, object]:
    """The host a bar-map ran on (no name: results are committed)."""
    from bench.machine import first_line

    return {"cpu_model": first_line("/proc/cpuinfo", "model name"),
            "cores": os.cpu_count() or 1, "kernel": platform.release(),
            "arch": platform.machine()}


def default_target() -> tuple[str, int]:
    """The first NVIDIA GPU's largest BAR, found through udev (bench.host_gpus)."""
    from bench.host_gpus import HostGpuError, bar_map_target, enumerate_nvidia

    try:
        found = bar_map_target(enumerate_nvidia())
    except HostGpuError as exc:
        raise ValueError(f"no target given and {exc}") from None
    if found is None:
        raise ValueError("no target given and udev lists no NVIDIA GPU (vendor 0x10de, class "
                         "0x0300xx or 0x0302xx) with a memory BAR: give a BAR as <bdf>:<bar> "
                         "(e.g. 0000:3b:00.0:1) or --file")
    dev, bar = found
    # stdout, with the figures: a saved report says which BAR was chosen
    print(f"bar-map: no target given: {dev.bdf} BAR {bar.index}, the largest BAR of the "
          "first NVIDIA GPU")
    return dev.bdf, bar.index


def cmd_gpus(args: argparse.Namespace) -> int:
    from bench import host_gpus

    return host_gpus.main(["--json"] if args.json else [], prog="guestinit-bench gpus")


def cmd_bar_map(args: argparse.Namespace) -> int:
    from guestinit import barmap
    from guestinit.sizes import parse_size, parse_target

    try:
        span = parse_size(args.span) if args.span else None
        if args.file:
            path, enable_dir, target = args.file, None, args.file
        else:
            bdf, bar = (parse_target(args.target) if args.target else default_target())
            sysfs = args.sysfs
            path = barmap.resource_path(bdf, bar, sysfs)
            dev = barmap.device_dir(bdf, sysfs)
            enable_dir = dev if args.enable else None
            target = f"{bdf} BAR {bar}"
            if not args.enable and _read(os.path.join(dev, "enable")) == "0":
                raise barmap.BarMapError(
                    f"PCI device {bdf}: memory decoding is off ({dev}/enable reads 0, no "
                    "driver enabled it): reads would not reach the BAR; bind its driver or "
                    "pass --enable (turned off again afterwards)")
        result = barmap.measure(path, span, enable_dir=enable_dir)
    except (barmap.BarMapError, ValueError, OSError) as exc:
        print(f"guestinit-bench bar-map: {exc}", file=sys.stderr)
        return EXIT_USAGE
    doc = {"kind": "guestinit-bench-bar-map", "schema": 1,
           "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "target": target, "host": host_description(), "result": result}
    print(describe(result, target))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
            fh.write("\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def describe(r: dict[str, object], target: str) -> str:
    """The figures of one bar-map, for people."""
    from guestinit.sizes import format_size

    t4, t2, pte = r["touch_4k"], r["touch_2m"], r["vm_pte_kib"]
    assert isinstance(t4, dict) and isinstance(t2, dict) and isinstance(pte, dict)
    span, size, mmap_ns = (int(str(r[k])) for k in ("span_bytes", "bar_bytes", "mmap_ns"))
    lines = [
        f"bar-map {target}: {format_size(span)} of a {format_size(size)} BAR, read-only",
        f"  mmap                 {mmap_ns / 1e6:.2f} ms",
        f"  first touch, 4 KiB   {t4['per_touch_ns']} ns per page ({t4['touches']} pages)",
        f"  first touch, 2 MiB   {t2['per_touch_ns']} ns per touch ({t2['touches']} touches); "
        f"ratio {r['ratio_2m_vs_4k']}",
        f"  fault-in per GiB     {int(str(r['fault_in_per_gib_4k_ns'])) / 1e6:.1f} ms "
        "(at the 4 KiB cost)",
        f"  streaming read       {r['stream_gib_s']} GiB/s (first pass {r['stream_first_gib_s']})",
        f"  page tables          VmPTE {pte['before']} -> {pte['streamed']} KiB, "
        f"{r['pte_bytes_per_gib']} bytes per GiB mapped "
        f"({'huge pages' if r['huge_pages'] else '4 KiB pages'})",
    ]
    return "\n".join(lines)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from bench.bar_sweep import DEFAULT_SIZES

    sw = sub.add_parser("bar-sweep", help="boot cost against the size of one large PCI BAR "
                        "(emulated ivshmem device): result directory like the suite's")
    sw.add_argument("--sizes", default=DEFAULT_SIZES, metavar="S,S,...",
                    help=f"BAR sizes, powers of two (default {DEFAULT_SIZES}; 0 = PCIe "
                    "without the device)")
    sw.add_argument("--runs", type=positive_count, default=5, metavar="N",
                    help="measured runs per size (default 5)")
    sw.add_argument("--warmup", type=int, default=1, metavar="N",
                    help="rounds run first and thrown away (default 1)")
    sw.add_argument("--bar-map", metavar="SPAN",
                    help="also run bar-map in the guest (its bench stage) over SPAN bytes of "
                    "the BAR, e.g. 256M, on every size that holds it")
    sw.add_argument("--image", default="out/cpu", metavar="DIR",
                    help="the guestinit image to boot (default out/cpu)")
    sw.add_argument("--append", default="", metavar="ARGS", help="extra kernel cmdline words")
    sw.add_argument("--out", metavar="DIR", help="result directory (default "
                    "bench/results/<date>-<accel>-<cores>c-bar-sweep)")
    sw.add_argument("--entropy", choices=ENTROPY, default="rdrand")
    add_vmm_options(sw)
    sw.set_defaults(func=cmd_bar_sweep)

    bm = sub.add_parser("bar-map", help="map a PCI BAR read-only through sysfs and measure "
                        "mmap, first-touch, streaming and page-table costs")
    bm.add_argument("target", nargs="?", metavar="BDF:BAR",
                    help="the BAR, e.g. 0000:3b:00.0:1 (sysfs resource1 of that device); "
                    "default: the largest BAR of the first NVIDIA GPU udev lists")
    bm.add_argument("--span", metavar="BYTES",
                    help="bytes to map and touch (default min(1G, BAR size)), e.g. 256M")
    bm.add_argument("--file", metavar="PATH",
                    help="map this file instead (a memory-backed stand-in, e.g. on /dev/shm)")
    bm.add_argument("--sysfs", default="/sys", metavar="DIR", help="sysfs root (default /sys)")
    bm.add_argument("--enable", action="store_true",
                    help="turn on memory decoding of a device no driver enabled (sysfs "
                    "enable), for the run only; never needed with a bound driver")
    bm.add_argument("--json", metavar="FILE", help="write the figures and the host as JSON")
    bm.set_defaults(func=cmd_bar_map)

    gp = sub.add_parser("gpus", help="the host's NVIDIA PCI devices through udev (pyudev): "
                        "address, kind, driver, NUMA node, BARs")
    gp.add_argument("--json", action="store_true", help="print them as JSON")
    gp.set_defaults(func=cmd_gpus)

