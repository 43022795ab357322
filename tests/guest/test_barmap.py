"""bar-map: sysfs errors, and a real measurement of a mapped file."""

from __future__ import annotations

from pathlib import Path

import pytest

from guestinit import barmap
from guestinit.barmap import BarMapError

MIB = 1 << 20


def _device(sysfs: Path, bdf: str, lines: list[str], resources: dict[int, int]) -> Path:
    dev = sysfs / "bus" / "pci" / "devices" / bdf
    dev.mkdir(parents=True)
    (dev / "resource").write_text("\n".join(lines) + "\n")
    (dev / "enable").write_text("0\n")
    for index, size in resources.items():
        with open(dev / f"resource{index}", "wb") as fh:
            fh.truncate(size)  # sparse: a mappable stand-in of that size
    return dev


MEM64 = "0x000000c000000000 0x000000c003ffffff 0x000000000014220c"  # 64 MiB, 64-bit pref
IO = "0x0000000000001000 0x000000000000101f 0x0000000000040101"
UNSET = "0x0000000000000000 0x0000000000000000 0x0000000000000000"


def test_resource_path_errors_name_the_device_and_what_it_has(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    _device(sysfs, "0000:00:01.0", [IO, UNSET, MEM64], {0: 32, 2: 64 * MIB})
    assert barmap.resource_path("0000:00:01.0", 2, str(sysfs)).endswith("0000:00:01.0/resource2")
    with pytest.raises(BarMapError, match=r"0000:00:09.0: not in .*lspci -D"):
        barmap.resource_path("0000:00:09.0", 2, str(sysfs))
    with pytest.raises(BarMapError, match=r"no BAR 4 to map .*it has: resource0, resource2"):
        barmap.resource_path("0000:00:01.0", 4, str(sysfs))
    with pytest.raises(BarMapError, match="BAR 0 is an I/O port BAR"):
        barmap.resource_path("0000:00:01.0", 0, str(sysfs))


def test_a_mapped_file_gives_every_figure_and_page_tables_grow(tmp_path: Path) -> None:
    stand_in = tmp_path / "bar"
    with open(stand_in, "wb") as fh:
        fh.truncate(64 * MIB)
    r = barmap.measure(str(stand_in), 16 * MIB)
    assert (r["bar_bytes"], r["span_bytes"]) == (64 * MIB, 16 * MIB)
    assert r["touch_4k"]["touches"] == 8 * MIB // 4096  # type: ignore[index]
    assert r["touch_2m"]["touches"] == 4  # type: ignore[index]
    assert r["touch_4k"]["per_touch_ns"] > 0  # type: ignore[index]
    assert r["stream_gib_s"] > 0  # type: ignore[operator]
    pte = r["vm_pte_kib"]
    assert isinstance(pte, dict) and pte["touched"] > pte["before"] >= 0
    assert r["pte_bytes_per_gib"] > 0 and r["huge_pages"] is False  # type: ignore[operator]
    assert r["enabled_for_run"] is False
    assert stand_in.stat().st_size == 64 * MIB  # read-only: nothing written or grown


def test_spans_the_bar_cannot_hold_are_refused_with_both_sizes(tmp_path: Path) -> None:
    stand_in = tmp_path / "bar"
    with open(stand_in, "wb") as fh:
        fh.truncate(8 * MIB)
    with pytest.raises(BarMapError, match="the BAR is 8 MiB, smaller than the span 16 MiB"):
        barmap.measure(str(stand_in), 16 * MIB)
    with pytest.raises(BarMapError, match="too small; bar-map needs at least 4 MiB"):
        barmap.measure(str(stand_in), 2 * MIB)
    assert barmap.measure(str(stand_in))["span_bytes"] == 8 * MIB  # default: min(1G, BAR)
    with pytest.raises(BarMapError, match="absent: No such file"):
        barmap.measure(str(tmp_path / "absent"))


def test_decoding_is_turned_on_for_the_run_and_off_again(tmp_path: Path) -> None:
    dev = _device(tmp_path / "sys", "0000:00:01.0", [UNSET, UNSET, MEM64], {2: 8 * MIB})
    r = barmap.measure(str(dev / "resource2"), enable_dir=str(dev))
    assert r["enabled_for_run"] is True
    assert (dev / "enable").read_text() == "0"
    (dev / "enable").write_text("1\n")  # a bound driver enabled it: left alone
    assert barmap.measure(str(dev / "resource2"), enable_dir=str(dev))["enabled_for_run"] is False
    assert (dev / "enable").read_text() == "1\n"
