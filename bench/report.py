"""The boot report: what ``guestinit-bench boot`` prints, and what ``--json`` writes."""

from __future__ import annotations

import json
import statistics
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
    rows = [
        ("host, QEMU spawn -> ready frame", _s(t.get("host_ready_s"))),
        ("host, QEMU spawn -> failed frame", _s(t.get("host_failed_s"))),
        ("guest, first frame (BOOTTIME)", _ms(t.get("guest_first_frame_ns"))),
        ("guest, init exec (stage early)", _ms(t.get("guest_init_exec_ns"))),
        ("guest, ready frame (BOOTTIME)", _ms(t.get("guest_ready_ns"))),
        ("host, QEMU spawn -> QEMU exit", _s(t.get("host_exit_s"))),
    ]
    # Rows the boot never reached are left out, except the one everybody looks for.
    shown = [(k, v) for i, (k, v) in enumerate(rows) if v != "-" or i == 0]
    out.append("timings:")
    out.extend(f"  {label:<33} {value}" for label, value in shown)
    if shutdown is not None:
        audit = shutdown.fields.get("audit")
        n_audit = len(audit) if isinstance(audit, list) else 0
        out.append(f"shutdown: {shutdown.fields['reason']} ({n_audit} audit events)")
    if res.ok:
        out.append(f"result: OK (ready, clean shutdown, QEMU exit status {res.qemu_rc})")
    else:
        out.append(f"result: FAILED: {res.reason}")
        tail = _console_tail(res.console_log)
        if tail:
            out.append("console (last lines):")
            out.extend(f"  {line}" for line in tail)
        out.append(f"console log: {res.console_log}")
        if res.qemu_stderr.strip():
            out.append("QEMU stderr (tail):")
            out.extend(f"  {line}" for line in res.qemu_stderr.strip().splitlines()[-8:])
    return "\n".join(out)


def _console_tail(path: str, lines: int = 8) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()[-8192:]
    except OSError:
        return []
    return [line[:200] for line in text.splitlines() if line.strip()][-lines:]


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


MEDIAN_KEYS = (
    ("host_ready_s", "host, QEMU spawn -> ready frame", 1.0, "s"),
    ("guest_init_exec_ns", "guest, init exec (BOOTTIME)", 1e-6, "ms"),
    ("guest_ready_ns", "guest, ready frame (BOOTTIME)", 1e-6, "ms"),
    ("host_exit_s", "host, QEMU spawn -> QEMU exit", 1.0, "s"),
)


def medians(results: list[BootResult]) -> dict[str, float | None]:
    """Median per timing over the boots that were OK (None when none has it)."""
    out: dict[str, float | None] = {}
    for key, _, _, _ in MEDIAN_KEYS:
        values = [r.timings[key] for r in results if r.ok and r.timings.get(key) is not None]
        out[key] = statistics.median(v for v in values if v is not None) if values else None
    return out


def medians_text(results: list[BootResult]) -> str:
    ok = sum(r.ok for r in results)
    rows = [f"median of {ok} OK boot(s) out of {len(results)}:"]
    med = medians(results)
    for key, label, scale, unit in MEDIAN_KEYS:
        values = [r.timings.get(key) for r in results if r.ok]
        nums = [v * scale for v in values if v is not None]
        value = med[key]
        if value is None:
            rows.append(f"  {label:<34} -")
            continue
        spread = f"  (min {min(nums):.2f}, max {max(nums):.2f})" if len(nums) > 1 else ""
        rows.append(f"  {label:<34} {value * scale:.2f} {unit}{spread}")
    return "\n".join(rows)


def one_line(res: BootResult) -> str:
    t = res.timings
    if not res.ok:
        return f"FAILED: {res.reason}"
    return (f"OK  ready {_s(t.get('host_ready_s'))} host, init exec "
            f"{_ms(t.get('guest_init_exec_ns'))}, ready {_ms(t.get('guest_ready_ns'))} guest")


def write_json(results: BootResult | list[BootResult], fh: TextIO,
               machine: dict[str, object] | None = None) -> None:
    """One boot: its document. Several: ``{"runs": [...], "median": {...}}``.
    ``machine`` (the VMM setup and host, as in suite.json) goes in at the top level."""
    if isinstance(results, BootResult):
        doc: dict[str, object] = to_json(results)
    else:
        doc = {"schema": JSON_SCHEMA, "ok": all(r.ok for r in results),
               "runs": [to_json(r) for r in results], "median": medians(results)}
        if len(results) == 1:
            doc = to_json(results[0])
    if machine is not None:
        doc["machine"] = machine
    json.dump(doc, fh, indent=1)
    fh.write("\n")
