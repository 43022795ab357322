"""One suite run's record: numbers from the guest's frames and the serial console.

Guest times are the guest's CLOCK_BOOTTIME in seconds, host times seconds since QEMU
was spawned; ``spans`` put both on the host clock for the Gantt chart.
"""

from __future__ import annotations

import re

from bench.boot import BootResult
from guestinit.kmsg import KERNEL_MARKS
from guestinit.wire import FrameType

_PRINTK = re.compile(rb"^\[\s*(\d+\.\d+)\] (.*)$", re.M)
_INITCALL = re.compile(r"^initcall (\S+?)(?:\+0x[0-9a-f]+/0x[0-9a-f]+)?(?: \[\S+\])? "
                       r"returned (-?\d+) after (\d+) usecs")
# The kernel lines the guest reports from its ring (shutdown frame, ``kernel.<mark>_ns``)
# are the ones looked for on the console: guest_<mark>_s.
MARK_KEYS = {mark: f"guest_{mark.removesuffix('_ns')}_s" for mark, _ in KERNEL_MARKS}
CONSOLE_MARKS = tuple((MARK_KEYS[mark], texts) for mark, texts in KERNEL_MARKS)
TOP_INITCALLS = 10


def parse_console(data: bytes) -> tuple[dict[str, float], list[dict[str, object]]]:
    """Kernel marks (guest seconds) and the slowest initcalls, from printk-timestamped lines."""
    marks: dict[str, float] = {}
    calls: list[tuple[int, str]] = []
    for m in _PRINTK.finditer(data):
        at, text = float(m.group(1)), m.group(2).decode("utf-8", "replace").rstrip("\r")
        for key, texts in CONSOLE_MARKS:
            if key not in marks and text.startswith(texts):
                marks[key] = at
        call = _INITCALL.match(text)
        if call:
            calls.append((int(call.group(3)), call.group(1)))
    calls.sort(key=lambda c: (-c[0], c[1]))
    return marks, [{"name": n, "usecs": u} for u, n in calls[:TOP_INITCALLS]]


def _s(value: float | int | None, scale: float = 1.0) -> float | None:
    return None if value is None else round(float(value) * scale, 6)


def measure(res: BootResult, console: bytes) -> dict[str, object]:
    """The per-run record of suite.json (see docs/bench.md) from one boot."""
    t = res.timings
    ready = res.first(FrameType.READY)
    shutdown = res.first(FrameType.SHUTDOWN)
    marks, initcalls = parse_console(console)
    kernel = shutdown.fields.get("kernel") if shutdown is not None else None
    if isinstance(kernel, dict):  # the guest read them from its ring: quiet cannot hide them
        for src, key in MARK_KEYS.items():
            if isinstance(kernel.get(src), int):
                marks[key] = kernel[src] / 1e9
    run_init = marks.get("guest_run_init_s")
    guest_ready = _s(t.get("guest_ready_ns"), 1e-9)
    first_frame = _s(t.get("guest_first_frame_ns"), 1e-9)
    host_ready = _s(t.get("host_ready_s"))
    offset = (host_ready - guest_ready) if host_ready is not None and guest_ready else None
    rec: dict[str, object] = {
        "ok": res.ok, "reason": res.reason,
        "host_first_output_s": _s(t.get("host_first_output_s")),
        "host_ready_s": host_ready,
        "host_shutdown_s": _s(t.get("host_shutdown_s")),
        "host_exit_s": _s(t.get("host_exit_s")),
        "guest_run_init_s": _s(run_init),
        "guest_crng_ready_s": _s(marks.get("guest_crng_ready_s")),
        "guest_first_frame_s": first_frame,
        "guest_ready_s": guest_ready,
        "userspace_s": _s(guest_ready - run_init) if guest_ready and run_init else None,
        "kernel_offset_s": _s(offset),
        # QEMU spawn -> the kernel's "Run /init": VMM, firmware, decompression and kernel
        "host_run_init_s": _s(offset + run_init) if offset is not None and run_init else None,
    }
    stages = [{"name": n, "start_s": a / 1e9, "end_s": b / 1e9}
              for n, a, b in (ready.timeline() if ready is not None else [])
              if ":" not in n]  # module:/discover: sub-spans stay in the frames
    rec.update(_pci(kernel))
    rec["qemu_peak_rss_mib"] = (round(res.qemu_peak_rss_kib / 1024, 1)
                                if res.qemu_peak_rss_kib is not None else None)
    rec["stages"] = stages
    rec["spans"] = _spans(rec, stages, _s(t.get("host_powerdown_s")))
    rec["initcalls"] = initcalls
    return rec


def _pci(kernel: object) -> dict[str, float | None]:
    """PCI enumeration (root bridge -> last line of the scan) and the guest time PCI set-up
    ended, from the kernel marks of the shutdown frame (guestinit.kmsg.PCI_*)."""
    k = kernel if isinstance(kernel, dict) else {}
    root, scanned, done = (k.get(f"pci_{m}_ns") for m in ("root", "scanned", "done"))
    enum = (scanned - root) / 1e9 if isinstance(root, int) and isinstance(scanned, int) else None
    return {"guest_pci_enum_s": _s(enum),
            "guest_pci_done_s": _s(done / 1e9) if isinstance(done, int) else None}


def _spans(rec: dict[str, object], stages: list[dict[str, object]],
           powerdown: float | None) -> list[dict[str, object]]:
    """One host-clock timeline: VMM start, kernel, init start-up, each stage, shutdown."""
    off, run_init = rec["kernel_offset_s"], rec["guest_run_init_s"]
    first, ready = rec["guest_first_frame_s"], rec["guest_ready_s"]
    if not isinstance(off, float) or not isinstance(ready, float):
        return []
    out: list[tuple[str, float, float]] = [("vmm+firmware", 0.0, off)]
    start_user = run_init if isinstance(run_init, float) else None
    if start_user is not None:
        out.append(("kernel", off, off + start_user))
    if stages:
        first_stage = float(stages[0]["start_s"])  # type: ignore[arg-type]
        if start_user is not None:
            out.append(("init start-up", off + start_user, off + first_stage))
        out += [(str(s["name"]), off + float(s["start_s"]),  # type: ignore[arg-type]
                 off + float(s["end_s"])) for s in stages]  # type: ignore[arg-type]
    elif start_user is not None:
        out.append(("init work", off + start_user, off + ready))
    elif isinstance(first, float):
        out.append(("init work", off + first, off + ready))
    shut = rec["host_shutdown_s"]
    if powerdown is not None and isinstance(shut, float):
        out.append(("shutdown", powerdown, shut))
    return [{"name": n, "start_s": round(a, 6), "end_s": round(b, 6)} for n, a, b in out
            if b >= a]
