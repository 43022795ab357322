"""``guestinit-bench bar-sweep``: boot cost against the size of one large PCI BAR.

Every size is a suite variant of the cpu image booted on the same QEMU command line:
microvm with its PCIe root complex (``pcie=on``) and, for sizes above 0, an
``ivshmem-plain`` device whose 64-bit prefetchable BAR 2 is that size (see
``bench.qemu.BarDevice``: a RAM backend with ``reserve=off``, so host memory is only
what the guest touches and no file is written). Size 0 is the same machine without the
device. The address width (``phys-bits``) is the smallest that places the largest size,
and every size of the sweep uses it, so the sizes differ in the BAR alone.

Runs are interleaved with warm-up rounds like the suite's; the result directory holds
a suite.json (so ``report`` and ``compare`` gate on it) whose ``bar_sweep`` section has
the per-size table, and bar-sweep.md/.svg/.png/.prom beside the suite's renderings.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from bench.boot import BootResult
from bench.qemu import BAR_BDF, BAR_INDEX, MAX_PHYS_BITS, BarDevice, phys_bits_for
from bench.stats import ok_runs, stage_durations, summarize
from bench.suite import SuiteError, Variant
from guestinit.barmap import MIN_SPAN
from guestinit.sizes import format_size, parse_size
from guestinit.wire import FrameType

DEFAULT_SIZES = "0,1G,4G,16G,64G,128G,256G"
PER = 64 << 30  # the sweep states its boot cost per 64 GiB of BAR
AGENT = "guestinit.agent=none"  # like the suite's guestinit variant
BAR_MAP_FIGURES = ("mmap_ns", "ratio_2m_vs_4k", "stream_gib_s", "pte_bytes_per_gib",
                   "fault_in_per_gib_4k_ns")


def parse_sizes(text: str) -> list[int]:
    """``0,1G,4G`` -> bytes, in the order given; SuiteError names a bad or repeated size."""
    sizes: list[int] = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        try:
            size = parse_size(word)
        except ValueError as exc:
            raise SuiteError(f"--sizes: {exc}") from None
        if size and size & (size - 1):
            raise SuiteError(f"--sizes: {word} is not a power of two (a PCI BAR's size is)")
        if size in sizes:
            raise SuiteError(f"--sizes: {word} given twice")
        sizes.append(size)
    if not sizes:
        raise SuiteError("--sizes: no sizes (e.g. --sizes 0,4G,64G)")
    return sizes


def name_of(size: int) -> str:
    return "bar-" + format_size(size).replace(" ", "") if size else "bar-0"


def plan(sizes: Sequence[int], profile: str = "cpu", bar_map_span: int | None = None,
         append: str = "") -> tuple[list[Variant], list[str]]:
    """The variants to boot, and a line per size the VMM cannot place (not booted).

    ``bar_map_span``: also run the guest's bench stage (bar-map of that many bytes of
    BAR 2) on every size that holds it.
    """
    placeable = [s for s in sizes if phys_bits_for(s) <= MAX_PHYS_BITS]
    refused = [f"{name_of(s)}: a {format_size(s)} BAR does not fit microvm's 64-bit PCI "
               f"window even at phys-bits={MAX_PHYS_BITS} (the window is a quarter of the "
               f"address space: at most {format_size((1 << MAX_PHYS_BITS) // 4)})"
               for s in sizes if s not in placeable]
    bits = phys_bits_for(max(placeable, default=0))
    variants = []
    for size in placeable:
        words = [AGENT, append]
        if bar_map_span is not None and size >= max(bar_map_span, MIN_SPAN):
            words += [f"guestinit.bench.bar={BAR_BDF}:{BAR_INDEX}",
                      f"guestinit.bench.bar_span={bar_map_span}"]
        variants.append(Variant(name_of(size), profile, "guestinit",
                                append=" ".join(w for w in words if w),
                                bar=BarDevice(size, bits)))
    return variants, refused


def on_pcie(machine: dict[str, object], bar: BarDevice) -> None:
    """The machine description of boots with ``bar``: microvm with PCIe, the address width."""
    machine["machine_type"] = "microvm,pcie=on"
    if machine.get("accel") != "kvm":
        machine["cpu"] = f"{machine['cpu']},phys-bits={bar.phys_bits}"


def guest_bar_bytes(res: BootResult) -> int | None:
    """The size of BAR 2 at BAR_BDF in the ready frame's PCI list; 0 without the device,
    None when the guest sent no (usable) list."""
    ready = res.first(FrameType.READY)
    inventory = ready.fields.get("inventory") if ready is not None else None
    pci = inventory.get("pci") if isinstance(inventory, dict) else None
    if not isinstance(pci, list):
        return None
    for dev in pci:
        if isinstance(dev, dict) and dev.get("bdf") == BAR_BDF:
            bars = dev.get("bars")
            for bar in bars if isinstance(bars, list) else []:
                if (isinstance(bar, list) and len(bar) == 2 and bar[0] == BAR_INDEX
                        and isinstance(bar[1], int)):
                    return bar[1]
            return 0
    return 0


def _bar_map(res: BootResult) -> dict[str, Any] | None:
    """The bench stage's numbers, numbers only (the guest is not trusted with more)."""
    ready = res.first(FrameType.READY)
    bench = ready.fields.get("bench") if ready is not None else None
    bar = bench.get("bar") if isinstance(bench, dict) else None
    if not isinstance(bar, dict):
        return None
    out: dict[str, Any] = {k: v for k, v in bar.items()
                           if isinstance(v, int | float) and not isinstance(v, bool)}
    out["huge_pages"] = bar.get("huge_pages") is True
    for part in ("touch_4k", "touch_2m"):
        if isinstance(bar.get(part), dict):
            out[f"{part}_ns"] = bar[part].get("per_touch_ns")
    return out


def check_run(v: Variant, res: BootResult, rec: dict[str, object]) -> None:
    """Per-run sweep fields; a run whose guest saw another BAR size fails, naming both."""
    assert v.bar is not None
    seen = guest_bar_bytes(res)
    rec["bar_bytes"] = v.bar.size
    rec["guest_bar_bytes"] = seen
    rec["bar_map"] = _bar_map(res)
    if rec["ok"] and seen != v.bar.size:
        saw = "no PCI list" if seen is None else (
            format_size(seen) if seen else f"no BAR {BAR_INDEX} at {BAR_BDF}")
        rec["ok"] = False
        rec["reason"] = (f"BAR size: configured {format_size(v.bar.size)}, the guest saw "
                         f"{saw}")


def _stage_stats(runs: list[Mapping[str, Any]], name: str, n_failed: int) -> dict[str, Any]:
    return summarize(stage_durations(runs).get(name, []), n_failed)


def section(doc_variants: Mapping[str, Mapping[str, Any]], variants: Sequence[Variant],
            refused: Sequence[str]) -> dict[str, Any]:
    """The ``bar_sweep`` section of the document: one row per size, and the slope."""
    rows = []
    for v in variants:
        assert v.bar is not None
        entry = doc_variants[v.name]
        ok = ok_runs(entry)
        n_failed = len(entry["runs"]) - len(ok)
        seen = sorted({int(r["guest_bar_bytes"]) for r in ok
                       if r.get("guest_bar_bytes") is not None})
        maps = [r["bar_map"] for r in ok if isinstance(r.get("bar_map"), dict)]
        rows.append({
            "variant": v.name, "bar_bytes": v.bar.size, "guest_bar_bytes": seen,
            "ready_s": summarize([r.get("host_ready_s") for r in ok], n_failed),
            "pci_enum_s": summarize([r.get("guest_pci_enum_s") for r in ok], n_failed),
            "discover_s": _stage_stats(ok, "discover", n_failed),
            "userspace_s": summarize([r.get("userspace_s") for r in ok], n_failed),
            "qemu_peak_rss_mib": summarize([r.get("qemu_peak_rss_mib") for r in ok], n_failed),
            "bar_map": {k: statistics.median(vals) for k in BAR_MAP_FIGURES
                        if (vals := [float(m[k]) for m in maps if m.get(k) is not None])}
            if maps else None,
        })
    first = variants[0].bar if variants else None
    return {"device": "ivshmem-plain BAR 2 (64-bit prefetchable), memory-backend-ram "
                      "share=on reserve=off", "bdf": BAR_BDF, "bar": BAR_INDEX,
            "machine_type": "microvm,pcie=on",
            "phys_bits": first.phys_bits if first is not None else None,
            "sizes": rows, "refused": list(refused), "cost": cost(rows)}


def cost(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Least-squares slope of median ready time (and PCI enumeration, discover) over BAR
    size, per 64 GiB, and the largest size's median minus the smallest's."""
    out: dict[str, Any] = {}
    for metric in ("ready_s", "pci_enum_s", "discover_s"):
        points = [(r["bar_bytes"] / PER, r[metric]["median"]) for r in rows
                  if r[metric]["median"] is not None]
        if len(points) < 2 or len({x for x, _ in points}) < 2:
            out[metric] = None
            continue
        xs, ys = zip(*points, strict=True)
        slope = statistics.linear_regression(xs, ys).slope
        out[metric] = {"per_64gib_s": round(slope, 6),
                       "largest_minus_smallest_s": round(ys[xs.index(max(xs))]
                                                         - ys[xs.index(min(xs))], 6)}
    return out
