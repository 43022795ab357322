from __future__ import annotations

from bench.render import frame_line, ready_report, timeline_table
from guestinit.wire import Frame, FrameType


def test_timeline_table_has_start_and_duration_in_ms_and_a_total() -> None:
    table = timeline_table([("early", 1_500_000_000, 1_512_500_000),
                            ("modules", 1_512_500_000, 1_812_500_000)])
    lines = table.splitlines()
    assert lines[0].split() == ["stage", "start", "ms", "duration", "ms"]
    assert lines[2].split() == ["early", "1500.0", "12.5"]
    assert lines[3].split() == ["modules", "1512.5", "300.0"]
    assert lines[4].split() == ["total", "1500.0", "312.5"]


def test_timeline_table_without_spans_says_so() -> None:
    assert "no timeline" in timeline_table([])


def test_frame_line_is_one_short_line() -> None:
    frame = Frame(FrameType.PROGRESS, "b", 2_000_000, {"stage": "modules", "event": "start",
                                                       "detail": "x" * 500})
    line = frame_line(frame)
    assert "\n" not in line
    assert line.startswith("progress")
    assert "t=2.0ms" in line and "stage=modules" in line
    assert len(line) < 200 and "..." in line


def test_ready_report_lists_modules_inventory_and_daemons() -> None:
    frame = Frame(FrameType.READY, "b", 9, {
        "timeline": [["early", 1, 2]], "modules": ["virtio_console", "vsock"],
        "inventory": {"accelerators": [{"name": "0000:00:05.0", "vendor": "0x10de"}]},
        "daemons": [{"name": "persistenced", "pid": 7}], "mode": "gpu",
    })
    text = ready_report(frame)
    assert "modules (2): virtio_console, vsock" in text
    assert "0x10de" in text and "persistenced" in text and "mode: gpu" in text
