"""bar-map: what mapping a PCI BAR costs, measured through sysfs ``resourceN``, read-only.

One measurement maps ``span`` bytes of the BAR (``open(O_RDONLY)``, ``mmap(PROT_READ,
MAP_SHARED)``) and reports:

- ``mmap_ns``: the mmap call. The PCI core maps a sysfs resource with
  ``io_remap_pfn_range``, which fills the page tables for the whole span at once, so
  this grows with the span;
- first touch: one byte read per 4 KiB over the first half of the span and one per
  2 MiB over the second half, each pass timed cold and again warm; the per-touch cost is
  (cold - warm) / touches, so the interpreter's own loop cost cancels out;
- a streaming read of the whole span (first pass and second pass, GiB/s);
- ``VmPTE`` (page-table bytes of this process, /proc/self/status) before, after the mmap,
  after the touches and after the stream: the growth per GiB mapped says whether the
  mapping used 4 KiB pages (2 MiB of page tables per GiB) or huge pages (4 KiB per GiB).

Nothing is ever written to a BAR. A device whose memory decoding is off (no driver
enabled it: ``enable`` reads 0) answers reads with nothing, so ``enable=True`` turns
decoding on through sysfs ``enable`` for the measurement and off again afterwards (the
guest stage does; the host CLI only with ``--enable``). Runs in the guest
(``guestinit.bench.bar=<bdf>:<bar>``, the ``bench`` stage) and on any Linux host
(``guestinit-bench bar-map``).
"""

from __future__ import annotations

import mmap
import os
import time

from guestinit.sizes import GIB, KIB, MIB, format_size, parse_size, parse_target

TYPE_CHECKING = False
if TYPE_CHECKING:
    from guestinit.boot import Boot

SMALL, HUGE = 4 * KIB, 2 * MIB
DEFAULT_SPAN = GIB  # when no span is given: min(this, BAR size)
MIN_SPAN = 2 * HUGE  # one 2 MiB-stride touch in each half
STREAM_CHUNK = 4 * MIB


class BarMapError(ValueError):
    """A BAR that cannot be measured; the message names the device or file and what to try."""


def device_dir(bdf: str, sysfs: str = "/sys") -> str:
    return os.path.join(sysfs, "bus", "pci", "devices", bdf)


def resource_path(bdf: str, bar: int, sysfs: str = "/sys") -> str:
    """The sysfs file of BAR ``bar``; BarMapError naming the BARs the device has if none."""
    dev = device_dir(bdf, sysfs)
    if not os.path.isdir(dev):
        raise BarMapError(f"PCI device {bdf}: not in {os.path.dirname(dev)} (lspci -D lists "
                          "the devices there)")
    path = os.path.join(dev, f"resource{bar}")
    if not os.path.exists(path):
        have = sorted(n for n in os.listdir(dev)
                      if n.startswith("resource") and n[8:].isdigit())
        raise BarMapError(f"PCI device {bdf}: no BAR {bar} to map ({path} is missing; "
                          f"memory BARs it has: {', '.join(have) or 'none'})")
    from guestinit.pci import parse_resource  # the discovery stage's reader of ``resource``

    with open(os.path.join(dev, "resource")) as fh:
        bars = parse_resource(fh.read())
    if any(b.index == bar and b.io for b in bars):
        raise BarMapError(f"PCI device {bdf}: BAR {bar} is an I/O port BAR, not memory")
    return path


def vm_pte_kib(proc: str = "/proc") -> int:
    """This process's page-table size (``VmPTE``) in KiB; -1 when the kernel does not say."""
    try:
        with open(os.path.join(proc, "self", "status")) as fh:
            for line in fh:
                if line.startswith("VmPTE:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


def _touch_pass(mm: mmap.mmap, start: int, end: int, stride: int) -> tuple[int, int]:
    """(cold ns, warm ns) of reading one byte per ``stride`` over [start, end)."""
    clock = time.perf_counter_ns
    t0 = clock()
    mm[start:end:stride]  # one byte per page, read in C
    t1 = clock()
    mm[start:end:stride]
    return t1 - t0, clock() - t1


def _stream(mm: mmap.mmap, span: int) -> int:
    t0 = time.perf_counter_ns()
    for off in range(0, span, STREAM_CHUNK):
        mm[off:off + STREAM_CHUNK]  # a copy out of the mapping: memcpy speed
    return time.perf_counter_ns() - t0


def _gib_s(nbytes: int, ns: int) -> float | None:
    return round(nbytes / GIB / (ns / 1e9), 3) if ns > 0 else None


def _touch_figures(touches: int, cold: int, warm: int) -> dict[str, object]:
    per = max(cold - warm, 0) / touches if touches else 0.0
    return {"touches": touches, "cold_ns": cold, "warm_ns": warm, "per_touch_ns": round(per, 1)}


def _set_enable(dev: str, on: bool) -> None:
    with open(os.path.join(dev, "enable"), "w") as fh:
        fh.write("1" if on else "0")


def measure(path: str, span: int | None = None, *, enable_dir: str | None = None,
            proc: str = "/proc") -> dict[str, object]:
    """Map ``span`` bytes of ``path`` read-only and measure (see the module doc).

    ``enable_dir``: a PCI device directory whose decoding is turned on for the
    measurement if it is off. BarMapError for a span the BAR cannot hold or a file
    that cannot be mapped.
    """
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise BarMapError(f"{path}: {exc.strerror}") from None
    if span is None:
        span = min(DEFAULT_SPAN, size)
    span -= span % HUGE
    if span < MIN_SPAN:
        raise BarMapError(f"{path}: a span of {format_size(span)} is too small; bar-map needs "
                          f"at least {format_size(MIN_SPAN)} (the BAR is {format_size(size)})")
    if span > size:
        raise BarMapError(f"{path}: the BAR is {format_size(size)}, smaller than the span "
                          f"{format_size(span)}; ask for a span of at most {format_size(size)}")
    enabled_here = False
    if enable_dir is not None:
        with open(os.path.join(enable_dir, "enable")) as fh:
            if fh.read().strip() == "0":
                _set_enable(enable_dir, True)
                enabled_here = True
    try:
        return _measure_open(path, size, span, proc) | {"enabled_for_run": enabled_here}
    finally:
        if enabled_here and enable_dir is not None:
            _set_enable(enable_dir, False)


def _measure_open(path: str, size: int, span: int, proc: str) -> dict[str, object]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        raise BarMapError(f"{path}: permission denied (mapping a BAR needs root, "
                          "CAP_SYS_ADMIN)") from None
    except OSError as exc:
        raise BarMapError(f"open {path}: {exc.strerror}") from None
    try:
        pte = [vm_pte_kib(proc)]
        t0 = time.perf_counter_ns()
        try:
            mm = mmap.mmap(fd, span, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError as exc:
            raise BarMapError(f"mmap {format_size(span)} of {path}: {exc.strerror} (a "
                              "kernel in lockdown mode refuses sysfs BAR mappings; try a "
                              "smaller --span)") from None
        mmap_ns = time.perf_counter_ns() - t0
    finally:
        os.close(fd)
    try:
        pte.append(vm_pte_kib(proc))
        half = span // 2 - (span // 2) % HUGE
        cold4, warm4 = _touch_pass(mm, 0, half, SMALL)
        cold2, warm2 = _touch_pass(mm, half, span, HUGE)
        pte.append(vm_pte_kib(proc))
        first = _stream(mm, span)
        again = _stream(mm, span)
        pte.append(vm_pte_kib(proc))
    finally:
        mm.close()
    small = _touch_figures(half // SMALL, cold4, warm4)
    huge = _touch_figures((span - half) // HUGE, cold2, warm2)
    known = min(pte) >= 0
    per_gib = round((max(pte) - pte[0]) * KIB * GIB / span) if known else None
    at_mmap = round((pte[1] - pte[0]) * KIB * GIB / span) if known else None
    p4, p2 = float(small["per_touch_ns"]), float(huge["per_touch_ns"])  # type: ignore[arg-type]
    return {
        "path": path, "bar_bytes": size, "span_bytes": span, "mmap_ns": mmap_ns,
        "touch_4k": small, "touch_2m": huge,
        "ratio_2m_vs_4k": round(p2 / p4, 2) if p4 > 0 else None,
        "fault_in_per_gib_4k_ns": round(p4 * (GIB // SMALL)),
        "stream_first_gib_s": _gib_s(span, first), "stream_gib_s": _gib_s(span, again),
        "vm_pte_kib": {"before": pte[0], "mapped": pte[1], "touched": pte[2],
                       "streamed": pte[3]},
        "pte_bytes_per_gib": per_gib,
        "pte_at_mmap_bytes_per_gib": at_mmap,  # filled by mmap itself (io_remap_pfn_range)
        # 4 KiB pages need 2 MiB of PTEs per GiB, 2 MiB pages 4 KiB: anything under a
        # quarter of the 4 KiB figure means huge mappings did most of the work
        "huge_pages": per_gib is not None and per_gib < 512 * KIB,
    }


def run_bench(boot: Boot) -> None:
    """The ``bench`` stage: bar-map of ``bench.bar`` into the ready frame's ``bench.bar``."""
    from guestinit.stages import BootError, Stage

    cfg = boot.config()
    bdf, bar = parse_target(cfg.str("bench.bar"))
    span_text = cfg.str("bench.bar_span")
    sysfs = os.path.join(boot.root, "sys")
    try:
        path = resource_path(bdf, bar, sysfs)
        result = measure(path, parse_size(span_text) if span_text else None,
                         enable_dir=device_dir(bdf, sysfs), proc=os.path.join(boot.root, "proc"))
    except (BarMapError, OSError) as exc:
        raise BootError(Stage.BENCH, f"bar-map of {bdf} BAR {bar}: {exc}") from None
    boot.facts.bench = {"bar": {"bdf": bdf, "bar": bar, **result}}
    mapped, size, took = (result[k] for k in ("span_bytes", "bar_bytes", "mmap_ns"))
    boot.kmsg.log(6, f"bench: bar-map {bdf} BAR {bar}: {mapped} of {size} bytes mapped "
                  f"in {took} ns")
