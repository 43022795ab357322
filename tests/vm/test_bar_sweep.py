"""bar-sweep end to end: the cpu image on microvm with PCIe, without and with a 4 GiB BAR,
the guest reporting the size it saw and mapping 64 MiB of it in its bench stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import cli
from bench.suite_schema import load_suite

pytestmark = pytest.mark.vm
GIB = 1 << 30


def test_two_size_sweep_sees_the_configured_bar_and_maps_it(
        cpu_image: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = tmp_path / "sweep"
    rc = cli.main(["bar-sweep", "--sizes", "0,4G", "--runs", "1", "--warmup", "0",
                   "--bar-map", "64M", "--image", cpu_image, "--out", str(result)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = load_suite(result)  # the suite schema, bar_sweep section included
    rows = {r["bar_bytes"]: r for r in doc["bar_sweep"]["sizes"]}
    assert rows[0]["guest_bar_bytes"] == [0] and rows[4 * GIB]["guest_bar_bytes"] == [4 * GIB]
    for row in rows.values():
        assert row["ready_s"]["n_ok"] == 1
        assert row["pci_enum_s"]["median"] > 0  # from the guest kernel's ring
        assert row["discover_s"]["median"] > 0
        assert row["qemu_peak_rss_mib"]["median"] > 0
    mapped = rows[4 * GIB]["bar_map"]
    assert rows[0]["bar_map"] is None and mapped["mmap_ns"] > 0
    assert mapped["pte_bytes_per_gib"] > 0  # page tables grew: 4 KiB PTEs for the BAR
    assert mapped["stream_gib_s"] > 0 and mapped["fault_in_per_gib_4k_ns"] > 0
    assert doc["machine"]["machine_type"] == "microvm,pcie=on"
    assert doc["machine"]["cpu"].endswith(",phys-bits=40")
    for name in ("bar-sweep.md", "bar-sweep.svg", "bar-sweep.png", "bar-sweep.prom",
                 "suite.md", "timeline.svg"):
        assert (result / name).stat().st_size > 0, name
    assert "| 4 GiB | 4 GiB |" in captured.out
