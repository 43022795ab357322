"""Kmsg writing to regular files, /dev/full and a FIFO in tmp_path (never the host's kmsg)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from guestinit.config import LogLevel
from guestinit.kmsg import MAX_LINE, Kmsg, clip


def test_line_format_and_levels(tmp_path: Path) -> None:
    dev = tmp_path / "kmsg"
    dev.touch()
    k = Kmsg(str(dev), level=LogLevel.INFO)
    assert k.is_open
    k.log(3, "mount proc: EBUSY")
    k.log(6, "stage early done")
    k.log(7, "debug detail")  # above the threshold: dropped
    k.set_level(LogLevel.DEBUG)
    k.log(7, "now visible")
    k.set_level(LogLevel.OFF)
    k.log(3, "nothing at off")
    k.raw("<14>daemon: not at off either")
    k.close()
    assert dev.read_text() == (
        "<3>guestinit: mount proc: EBUSY\n"
        "<6>guestinit: stage early done\n"
        "<7>guestinit: now visible\n"
    )


def test_multiline_text_is_one_record_per_line(tmp_path: Path) -> None:
    dev = tmp_path / "kmsg"
    dev.touch()
    k = Kmsg(str(dev))
    k.log(4, "Traceback:\n  File x\nValueError: y\n")
    k.close()
    assert dev.read_text().splitlines() == [
        "<4>guestinit: Traceback:", "<4>guestinit:   File x", "<4>guestinit: ValueError: y"]


def test_long_lines_are_cut_on_a_character_boundary(tmp_path: Path) -> None:
    dev = tmp_path / "kmsg"
    dev.touch()
    k = Kmsg(str(dev))
    k.log(6, "é" * 2000)
    k.raw("<14>" + "a" * 5000)
    k.close()
    first, second = dev.read_bytes().split(b"\n")[:2]
    assert len(first) + 1 <= MAX_LINE and len(first) + 1 >= MAX_LINE - 2
    first.decode("utf-8")  # no half character at the cut
    assert len(second) + 1 == MAX_LINE
    assert clip("aé".encode(), 2) == b"a"
    assert clip(b"abc", 3) == b"abc"


def test_fallback_when_the_device_is_missing_then_reopens(tmp_path: Path) -> None:
    dev = tmp_path / "dev" / "kmsg"
    out = io.StringIO()
    k = Kmsg(str(dev), fallback=out)
    assert not k.is_open
    k.log(6, "before devtmpfs")
    assert out.getvalue() == "<6>guestinit: before devtmpfs\n"
    dev.parent.mkdir()
    dev.touch()  # "devtmpfs is mounted"
    k.log(6, "after")
    assert k.is_open
    assert dev.read_text() == "<6>guestinit: after\n"
    assert out.getvalue() == "<6>guestinit: before devtmpfs\n"
    k.close()


def test_write_errors_go_to_the_fallback() -> None:
    out = io.StringIO()
    k = Kmsg("/dev/full", fallback=out)  # every write fails with ENOSPC
    assert k.is_open
    k.log(3, "disk full")
    assert k.write_errors == 1
    assert out.getvalue() == "<3>guestinit: disk full\n"
    k.close()


def test_never_raises_even_with_a_closed_fallback(tmp_path: Path) -> None:
    out = io.StringIO()
    out.close()  # its write() raises ValueError
    dev = tmp_path / "missing"
    k = Kmsg(str(dev), fallback=out)
    k.log(3, "nobody hears this")  # must not raise
    k.raw("<3>nor this")
    assert not k.is_open and k.write_errors == 0  # no device yet: no write failed on it
    dev.touch()
    k.log(6, "heard")  # the swallowed error left it working: the open is retried
    k.close()
    assert dev.read_text() == "<6>guestinit: heard\n"  # the lost lines were not kept
    full = Kmsg("/dev/full", fallback=out)  # the device fails, then the fallback too
    full.log(3, "disk full")
    full.raw("<3>still full")
    assert full.is_open and full.write_errors == 2
    full.close()


def test_fifo_gets_whole_records(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        k = Kmsg(str(fifo))
        k.log(6, "one")
        k.raw("<30>svc[3]: two\n")
        assert os.read(reader, 4096) == b"<6>guestinit: one\n<30>svc[3]: two\n"
        k.close()
    finally:
        os.close(reader)


def test_kernel_record_parsed() -> None:
    from guestinit.kmsg import parse_record

    assert parse_record(b"6,339,1552563,-;Run /init as init process\n SUBSYSTEM=x") == (
        1552563000, "Run /init as init process")
    assert parse_record(b"garbage") is None
    assert parse_record(b"6,1,abc,-;x") is None


def test_kernel_marks_read_from_a_records_file(tmp_path: Path) -> None:
    from guestinit.kmsg import kernel_marks

    # /dev/kmsg returns one record per read; a file holding one record reads the same.
    ring = tmp_path / "kmsg"
    ring.write_bytes(b"5,10,62000,-;random: crng init done\n")
    assert kernel_marks(str(ring)) == {"crng_ready_ns": 62000000}
    assert kernel_marks(str(tmp_path / "absent")) == {}



def test_pci_marks_split_the_bus_scan_from_resource_assignment() -> None:
    # /dev/kmsg hands one record per read, which a file cannot: feed the records one by
    # one to the tracker kernel_marks feeds until the kernel runs init.
    from guestinit.kmsg import _PciMarks, parse_record

    lines = [
        (90, "pci_bus 0000:00: a line before the root bridge is not the scan"),
        (100, "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])"),
        (120, "PCI host bridge to bus 0000:00"),
        (130, "pci_bus 0000:00: root bus resource [bus 00-ff]"),
        (150, "pci 0000:00:01.0: [1af4:1110] type 00 class 0x050000"),
        (160, "pci 0000:00:01.0: BAR 2 [mem 0x00000000-0xffffffff 64bit pref]"),
        (170, "ACPI: PCI: Interrupt link GSI0 configured for IRQ 16"),
        (400, "pci 0000:00:01.0: BAR 2 [mem 0xc000000000-0xc0ffffffff 64bit pref]: assigned"),
        (410, "pci_bus 0000:00: resource 4 [mem 0xc0000000-0xdfffffff window]"),
    ]
    pci = _PciMarks()
    for i, (us, text) in enumerate(lines):
        parsed = parse_record(f"6,{i},{us},-;{text}\n".encode())
        assert parsed is not None
        pci.take(*parsed)
    assert pci.found == {"pci_root_ns": 100_000, "pci_scanned_ns": 160_000,
                         "pci_done_ns": 410_000}
    no_device = _PciMarks()  # no BAR to assign: the scan ends before the bus resources
    for us, text in (lines[1], lines[3], (300, "pci_bus 0000:00: resource 4 [mem x]")):
        no_device.take(us * 1000, text)
    assert no_device.found["pci_scanned_ns"] == 130_000
