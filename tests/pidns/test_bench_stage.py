"""The bench stage (guestinit.bench.bar=): bar-map run by the real init as PID 1, over a
fake PCI device whose BAR file is a sparse stand-in, and its failure naming the device."""

from __future__ import annotations

from pathlib import Path

from guestinit.wire import FrameType
from tests.pidns.harness import NsInit

BDF = "0000:00:01.0"
MIB = 1 << 20


def one_device_root(root: Path) -> None:
    dev = root / "sys/bus/pci/devices" / BDF
    dev.mkdir(parents=True)
    for name, value in (("vendor", "0x1af4"), ("device", "0x1110"), ("class", "0x050000"),
                        ("enable", "0")):
        (dev / name).write_text(value + "\n")
    (dev / "resource").write_text(
        "0x00000000c0000000 0x00000000c00000ff 0x0000000000040200\n"
        "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
        "0x000000c000000000 0x000000c001ffffff 0x000000000014220c\n")
    (dev / "resource0").write_bytes(bytes(256))
    with open(dev / "resource2", "wb") as fh:
        fh.truncate(32 * MIB)


def test_bench_stage_maps_the_bar_and_reports_in_the_ready_frame(
        ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, f"guestinit.agent=none guestinit.bench.bar={BDF}:2 "
                   "guestinit.bench.bar_span=8M", root_setup=one_device_root)
    ready = init.wait_frame(FrameType.READY, timeout=30)
    names = [n for n, _, _ in ready.timeline()]
    assert names.index("discover") < names.index("bench") < names.index("modules")
    bar = ready.get("bench")["bar"]  # type: ignore[index]
    assert (bar["bdf"], bar["bar"], bar["bar_bytes"], bar["span_bytes"]) == (
        BDF, 2, 32 * MIB, 8 * MIB)
    assert bar["mmap_ns"] > 0 and bar["stream_gib_s"] > 0
    assert bar["enabled_for_run"] is True  # no driver had enabled the stand-in
    assert (init.root / "sys/bus/pci/devices" / BDF / "enable").read_text() == "0"
    pci = ready.get("inventory")["pci"]  # type: ignore[index]
    assert pci == [{"bdf": BDF, "id": "1af4:1110", "class": "0x050000",
                    "bars": [[0, 256], [2, 32 * MIB]]}]


def test_a_bar_the_device_lacks_fails_the_boot_naming_it(
        ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, f"guestinit.agent=none guestinit.bench.bar={BDF}:4",
                   root_setup=one_device_root)
    failed = init.wait_frame(FrameType.FAILED, timeout=30)
    assert failed.get("stage") == "bench"
    assert f"PCI device {BDF}: no BAR 4 to map" in str(failed.get("reason"))
    assert "resource0, resource2" in str(failed.get("reason"))
