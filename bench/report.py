"""The boot report: what ``guestinit-bench boot`` prints, and what ``--json`` writes."""

from __future__ import annotations

import json
from typing import TextIO

from bench.boot import BootResult
from bench.render import failed_report, frame_line, ready_report
from guestinit.wire import Frame, FrameType

JSON_SCHEMA = 1


def _s(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _ms(value: float | int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f} ms"


def text(res: BootResult) -> str:
    out: list[str] = []
    for rec in res.frames:
        if rec.frame.type is FrameType.DEGRADED:
            out.append(f"degraded: {rec.frame.fields['name']}: {rec.frame.fields['reason']}")
    for err in res.errors:
        out.append(f"bad input from the guest: {err}")
    ready = res.first(FrameType.READY)
    failed = res.first(FrameType.FAILED)
    shutdown = res.first(FrameType.SHUTDOWN)
    if ready is not None:
        out.append(ready_report(ready))
    if failed is not None:
        out.append(failed_report(failed))
    t = res.timings
    out.append("timings:")
    out.append(f"  host, QEMU spawn -> ready frame   {_s(t.get('host_ready_s'))}")
    if t.get("host_failed_s") is not None:
        out.append(f"  host, QEMU spawn -> failed frame  {_s(t.get('host_failed_s'))}")
    out.append(f"  guest, first frame (BOOTTIME)     {_ms(t.get('guest_first_frame_ns'))}")
    out.append(f"  guest, init exec (stage early)    {_ms(t.get('guest_init_exec_ns'))}")
    out.append(f"  guest, ready frame (BOOTTIME)     {_ms(t.get('guest_ready_ns'))}")
    out.append(f"  host, QEMU spawn -> QEMU exit     {_s(t.get('host_exit_s'))}")
    if shutdown is not None:
        audit = shutdown.fields.get("audit")
        n_audit = len(audit) if isinstance(audit, list) else 0
        out.append(f"shutdown: {shutdown.fields['reason']} ({n_audit} audit events)")
    if res.ok:
        out.append(f"result: OK (ready, clean shutdown, QEMU exit status {res.qemu_rc})")
    else:
        out.append(f"result: FAILED: {res.reason}")
        out.append(f"console log: {res.console_log}")
        if res.qemu_stderr.strip():
            out.append("QEMU stderr (tail):")
            out.extend(f"  {line}" for line in res.qemu_stderr.strip().splitlines()[-8:])
    return "\n".join(out)


def frames_text(res: BootResult) -> str:
    return "\n".join(f"  +{r.host_s:6.2f}s  {frame_line(r.frame)}" for r in res.frames)


def plain(value: object) -> object:
    """msgpack can carry bytes; JSON cannot."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _frame_json(host_s: float, frame: Frame) -> dict[str, object]:
    out: dict[str, object] = {"host_s": round(host_s, 6)}
    out.update((k, plain(v)) for k, v in frame.to_map().items())
    return out


def to_json(res: BootResult) -> dict[str, object]:
    return {
        "schema": JSON_SCHEMA,
        "ok": res.ok,
        "reason": res.reason,
        "accel": res.accel,
        "accel_why": res.accel_why,
        "cmdline": res.cmdline,
        "qemu_argv": res.argv,
        "qemu_rc": res.qemu_rc,
        "forced": res.forced,
        "console_log": res.console_log,
        "timings": dict(res.timings),
        "errors": list(res.errors),
        "frames": [_frame_json(r.host_s, r.frame) for r in res.frames],
    }


def write_json(res: BootResult, fh: TextIO) -> None:
    json.dump(to_json(res), fh, indent=1)
    fh.write("\n")
