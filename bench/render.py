"""Text a person reads: one-line frames, the timeline table, the ready report."""

from __future__ import annotations

from guestinit.wire import Frame, FrameType

MAX_FIELD = 60


def _short(value: object, limit: int = MAX_FIELD) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ms(ns: int) -> str:
    return f"{ns / 1e6:.1f}"


def frame_line(frame: Frame) -> str:
    """``ready     t=1234.5ms  modules=[...] ...``: type, guest time, short fields."""
    skip = {"timeline"}
    parts = [f"{frame.type.value:<9}", f"t={ms(frame.t)}ms"]
    for key in sorted(frame.fields):
        if key in skip:
            continue
        parts.append(f"{key}={_short(frame.fields[key])}")
    timeline = frame.fields.get("timeline")
    if isinstance(timeline, list):
        parts.append(f"timeline=[{len(timeline)} spans]")
    return "  ".join(parts)


def timeline_table(spans: list[tuple[str, int, int]]) -> str:
    """Stage, start (ms since kernel start, CLOCK_BOOTTIME), duration, in run order."""
    if not spans:
        return "  (no timeline)"
    width = max(8, *(len(name) for name, _, _ in spans))
    rows = [f"  {'stage':<{width}}  {'start ms':>10}  {'duration ms':>11}"]
    rows.append(f"  {'-' * width}  {'-' * 10}  {'-' * 11}")
    for name, start, end in spans:
        rows.append(f"  {name:<{width}}  {ms(start):>10}  {ms(end - start):>11}")
    first = min(s for _, s, _ in spans)
    last = max(e for _, _, e in spans)
    rows.append(f"  {'total':<{width}}  {ms(first):>10}  {ms(last - first):>11}")
    return "\n".join(rows)


def _items(value: object, depth: int = 0) -> list[str]:
    """Lines for a nested value: lists of records one per line, maps as ``key: ...``."""
    pad = "  " * depth
    if isinstance(value, list):
        return [f"{pad}- {_describe(v)}" for v in value]
    if isinstance(value, dict):
        out: list[str] = []
        for k, v in value.items():
            if isinstance(v, list) and any(isinstance(x, dict) for x in v) and depth < 2:
                out.append(f"{pad}{k}:")
                out.extend(_items(v, depth + 1))
            else:
                out.append(f"{pad}{k}: {_describe(v)}")
        return out
    return [pad + _describe(value)]


def _describe(value: object) -> str:
    if isinstance(value, dict):
        name = value.get("name") or value.get("slot") or value.get("address")
        rest = ", ".join(f"{k}={_short(v, 60)}" for k, v in value.items() if v is not name)
        return f"{name}: {rest}" if name is not None else rest
    if isinstance(value, list):
        return ", ".join(_short(v, 40) for v in value) or "(none)"
    return _short(value, 200)


def ready_report(frame: Frame) -> str:
    """What the ``ready`` frame says about the guest, for people."""
    out = ["timeline:", timeline_table(frame.timeline())]
    mode = frame.fields.get("mode")
    if mode is not None:
        out.append(f"mode: {_short(mode)}")
    for key in ("inventory", "modules", "daemons"):
        value = frame.fields.get(key)
        if value is None:
            continue
        items = _items(value)
        if key == "modules" and isinstance(value, list):
            out.append(f"modules ({len(value)}): {', '.join(_short(v, 40) for v in value)}")
            continue
        out.append(f"{key}:" + ("" if items else " (none)"))
        out.extend(f"  {item}" for item in items)
    return "\n".join(out)


def failed_report(frame: Frame) -> str:
    assert frame.type is FrameType.FAILED
    out = [
        f"guest failed in stage {_short(frame.fields.get('stage'))}: "
        f"{_short(frame.fields.get('reason'), 400)}",
        "timeline so far:",
        timeline_table(frame.timeline()),
    ]
    return "\n".join(out)
