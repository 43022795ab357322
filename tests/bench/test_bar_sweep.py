"""bar-sweep without a VM: sizes, the plan and its QEMU line, the BAR check, the section,
its renderings, and the schema; plus bar-map's CLI over a file stand-in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import bar_report, bar_sweep, cli
from bench.boot import BootResult, Received
from bench.qemu import BAR_BDF, BarDevice, VmSpec, phys_bits_for, qemu_argv
from bench.stats import summarize_variant
from bench.suite import SuiteError, Variant
from bench.suite_schema import validate
from guestinit.wire import Frame, FrameType
from tests.bench.suitedoc import MACHINE

GIB = 1 << 30
NULL_RUN = dict.fromkeys(("host_first_output_s", "host_shutdown_s", "host_exit_s",
                          "guest_run_init_s", "guest_crng_ready_s", "guest_first_frame_s",
                          "guest_ready_s", "kernel_offset_s"))


def test_sizes_are_powers_of_two_given_once() -> None:
    assert bar_sweep.parse_sizes("0, 1G,4G,256G") == [0, GIB, 4 * GIB, 256 * GIB]
    for text, why in (("3G", "not a power of two"), ("4G,4096M", "given twice"),
                      ("4Q", "whole number"), (",", "no sizes")):
        with pytest.raises(SuiteError, match=why):
            bar_sweep.parse_sizes(text)


def test_one_address_width_places_the_largest_size_and_too_large_ones_are_refused() -> None:
    assert phys_bits_for(0) == phys_bits_for(256 * GIB) == 40  # QEMU's TCG default holds 256G
    assert phys_bits_for(512 * GIB) == 41 and phys_bits_for(1 << 40) == 42
    variants, refused = bar_sweep.plan([0, 4 * GIB, 512 * GIB, 1 << 52], bar_map_span=GIB)
    assert [v.name for v in variants] == ["bar-0", "bar-4GiB", "bar-512GiB"]
    assert {v.bar.phys_bits for v in variants if v.bar} == {41}  # the same machine for all
    assert len(refused) == 1 and "bar-4096TiB" in refused[0] and "phys-bits=52" in refused[0]
    assert "guestinit.bench.bar" not in variants[0].append  # no device: nothing to map
    assert f"guestinit.bench.bar={BAR_BDF}:2 guestinit.bench.bar_span={GIB}" in variants[1].append


def _spec(bar: BarDevice | None) -> VmSpec:
    return VmSpec(kernel="k", initramfs="i", cmdline="c", console_log="l", report_socket="r",
                  qmp_socket="q", bar=bar)


def test_the_qemu_line_has_pcie_the_sparse_backend_and_the_address_width() -> None:
    argv = " ".join(qemu_argv(_spec(BarDevice(64 * GIB, 41))))
    assert "-M microvm,x-option-roms=off,pcie=on" in argv
    assert "-cpu qemu64,+rdrand,phys-bits=41" in argv
    assert f"memory-backend-ram,id=bar0,size={64 * GIB},share=on,reserve=off" in argv
    assert "ivshmem-plain,memdev=bar0,addr=01.0" in argv
    zero = " ".join(qemu_argv(_spec(BarDevice(0))))
    assert "pcie=on" in zero and "ivshmem" not in zero  # size 0: the same machine, no device
    plain = " ".join(qemu_argv(_spec(None)))
    assert "pcie" not in plain and "phys-bits" not in plain


def _result(pci: object, bench: object = None) -> BootResult:
    fields: dict[str, Any] = {"timeline": [], "inventory": {"devices": [], "pci": pci}}
    if bench is not None:
        fields["bench"] = bench
    res = BootResult(ok=True)
    res.frames.append(Received(1.0, Frame(FrameType.READY, "b", 1, fields)))
    return res


def test_a_guest_that_sees_another_bar_size_fails_the_run_naming_both() -> None:
    v = Variant("bar-4GiB", "cpu", "guestinit", bar=BarDevice(4 * GIB))
    good = _result([{"bdf": BAR_BDF, "id": "1af4:1110", "bars": [[0, 256], [2, 4 * GIB]]}],
                   {"bar": {"mmap_ns": 5, "huge_pages": False, "path": "/x",
                            "touch_4k": {"per_touch_ns": 3.5}}})
    rec: dict[str, object] = {"ok": True, "reason": ""}
    bar_sweep.check_run(v, good, rec)
    assert rec["ok"] and rec["guest_bar_bytes"] == 4 * GIB
    assert rec["bar_map"] == {"mmap_ns": 5, "huge_pages": False, "touch_4k_ns": 3.5}
    for pci, saw in (([{"bdf": BAR_BDF, "bars": [[2, 2 * GIB]]}], "the guest saw 2 GiB"),
                     ([], f"the guest saw no BAR 2 at {BAR_BDF}"),
                     ("junk", "the guest saw no PCI list")):
        rec = {"ok": True, "reason": ""}
        bar_sweep.check_run(v, _result(pci), rec)
        assert rec["ok"] is False and rec["reason"] == f"BAR size: configured 4 GiB, {saw}"


def _doc(tmp_path: Path) -> dict[str, Any]:
    """A two-size sweep document: ready grows 0.1 s from 0 to 64 GiB."""
    variants, refused = bar_sweep.plan([0, 64 * GIB, 1 << 52])
    doc_variants: dict[str, Any] = {}
    for v, ready in zip(variants, (4.0, 4.1), strict=True):
        assert v.bar is not None
        runs = [{**NULL_RUN, "run": i + 1, "ok": True, "reason": "",
                 "host_ready_s": ready + i * 0.01,
                 "guest_pci_enum_s": 0.05, "userspace_s": 0.7, "qemu_peak_rss_mib": 300.0,
                 "bar_bytes": v.bar.size, "guest_bar_bytes": v.bar.size,
                 "bar_map": {"mmap_ns": 5e6, "pte_bytes_per_gib": 2 << 20} if v.bar.size
                 else None,
                 "stages": [{"name": "discover", "start_s": 1.0, "end_s": 1.3}], "spans": []}
                for i in range(3)]
        doc_variants[v.name] = {"image": str(tmp_path), "root": "initramfs", "init": "guestinit",
                                "append": v.append, "entropy": "rdrand", "cmdline": "",
                                "runs": runs, "warmup_failures": [], "failures": [],
                                **summarize_variant(runs)}
    return {"schema": 1, "kind": "guestinit-bench-suite", "created": "2026-12-03T12:00:00Z",
            "machine": MACHINE, "settings": {"runs": 3, "warmup": 0, "order": "interleaved",
                                             "timeout_s": 60.0, "base_cmdline": ""},
            "variants": doc_variants, "ratios": {},
            "bar_sweep": bar_sweep.section(doc_variants, variants, refused)}


def test_the_section_states_cost_per_64_gib_and_validates(tmp_path: Path) -> None:
    doc = validate(_doc(tmp_path))
    sweep = doc["bar_sweep"]
    assert [r["bar_bytes"] for r in sweep["sizes"]] == [0, 64 * GIB]
    assert sweep["cost"]["ready_s"]["per_64gib_s"] == pytest.approx(0.1)
    assert sweep["cost"]["pci_enum_s"]["per_64gib_s"] == pytest.approx(0.0)
    assert sweep["sizes"][1]["bar_map"] == {"mmap_ns": 5e6, "pte_bytes_per_gib": 2 << 20}
    assert sweep["sizes"][1]["discover_s"]["median"] == pytest.approx(0.3)
    broken = json.loads(json.dumps(doc))
    broken["bar_sweep"]["sizes"][0]["bar_bytes"] = -1
    with pytest.raises(Exception, match="bar_bytes"):
        validate(broken)


def test_renderings_show_every_size_and_the_refused_one(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    md = bar_report.markdown(doc)
    assert "| 0 | 0 | 50.0 | 300.0 | 4.010 |" in md
    assert "| 64 GiB | 64 GiB |" in md and "+100.0 ms per 64 GiB" in md
    assert "## Sizes not booted" in md and "bar-4096TiB" in md
    prom = bar_report.openmetrics(doc)
    assert f'guestinit_bench_bar_sweep_ready_median_seconds{{bar_bytes="{64 * GIB}"' in prom
    assert prom.rstrip().endswith("# EOF")
    written = bar_report.write_all(doc, tmp_path / "out")
    svg = (tmp_path / "out" / "bar-sweep.svg").read_text()
    assert all(p.stat().st_size > 0 for p in written)
    assert 'id="ready-0"' in svg and 'id="ready-64_GiB"' in svg


def test_bar_map_cli_measures_a_file_and_refuses_a_bad_target(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stand_in = tmp_path / "bar"
    with open(stand_in, "wb") as fh:
        fh.truncate(32 << 20)
    out = tmp_path / "bar-map.json"
    assert cli.main(["bar-map", "--file", str(stand_in), "--span", "8M", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["kind"] == "guestinit-bench-bar-map" and doc["result"]["span_bytes"] == 8 << 20
    assert "4 KiB pages" in capsys.readouterr().out
    assert cli.main(["bar-map", "0000:00:01.0:2", "--sysfs", str(tmp_path)]) == 2
    assert "PCI device 0000:00:01.0: not in" in capsys.readouterr().err
    dev = tmp_path / "bus" / "pci" / "devices" / "0000:00:01.0"
    dev.mkdir(parents=True)
    (dev / "resource").write_text("0 0 0\n0 0 0\n0xc000 0xc1ffffff 0x14220c\n")
    (dev / "resource2").write_bytes(b"")
    (dev / "enable").write_text("0\n")
    assert cli.main(["bar-map", "0000:00:01.0:2", "--sysfs", str(tmp_path)]) == 2
    assert "memory decoding is off" in capsys.readouterr().err


def _device_script(tmp_path: Path, fixture: str) -> tuple[Path, list[str], str]:
    """bench/device/bar-map.sh under umockdev-run with a fixture's PCI devices as udev's
    (the script's udev enumeration sees only those), its bar-map step on an empty sysfs:
    a GPU on the test host is never touched. The result directory, steps, stdout."""
    import shutil
    import sys

    from rootfs import proc
    from tests.fixtures.umockdev_tree import FIXTURES
    from tests.vm.conftest import REPO

    umockdev_run = shutil.which("umockdev-run")
    assert umockdev_run, "umockdev-run missing: apt-get install umockdev (build.sh setup)"
    sysfs = tmp_path / "sys"
    (sysfs / "bus/pci/devices").mkdir(parents=True)
    done = proc.run([umockdev_run, "-d", str(FIXTURES / f"{fixture}.umockdev"), "--", "env",
                     f"SYSFS={sysfs}", f"PYTHON={sys.executable}", "bash",
                     str(REPO / "bench/device/bar-map.sh"), str(tmp_path / "results")],
                    timeout=120, cwd=str(REPO))
    (result,) = (tmp_path / "results").iterdir()
    return result, (result / "steps.txt").read_text().splitlines(), done.stdout


def test_the_device_script_records_every_step_and_goes_on_without_a_gpu(tmp_path: Path) -> None:
    """No NVIDIA GPU: each step is recorded with its status, bar-map says why it was
    skipped, and the script still ends well (on the GPU host it maps the largest BAR)."""
    result, steps, out = _device_script(tmp_path, "empty")
    names = [line.split("\t")[0] for line in steps]
    assert names == ["lspci", "lspci-numeric", "nvidia-smi", "nvidia-smi-xml",
                     "nvidia-smi-topo", "proc-tree", "proc-files", "gpus", "bar-map"]
    assert all("\trc=" in line for line in steps[:-1])
    assert "skipped\tno NVIDIA GPU" in steps[-1] and f"results in {result}" in out
    assert (result / "host.txt").read_text().strip()
    assert json.loads((result / "gpus.json").read_text()) == []


def test_the_device_script_finds_the_gpu_through_udev_and_maps_its_largest_bar(
        tmp_path: Path) -> None:
    """An H100 in udev's enumeration: gpus.json describes it, and bar-map is run on its
    BAR 1 (128 GiB; here the empty sysfs makes that step fail, which is recorded)."""
    result, steps, _ = _device_script(tmp_path, "h100x1")
    (gpu,) = json.loads((result / "gpus.json").read_text())
    assert gpu["bdf"] == "0000:18:00.0" and gpu["kind"] == "gpu" and gpu["device"] == "0x2330"
    assert [(b["index"], b["size"]) for b in gpu["bars"]] == [
        (0, 16 << 20), (1, 128 << 30), (3, 32 << 20)]
    (bar_map,) = [line for line in steps if line.startswith("bar-map\t")]
    assert "\trc=0\t" not in bar_map and "bar-map 0000:18:00.0:1 " in bar_map


def test_the_kvm_device_script_stops_with_the_reason_where_kvm_cannot_run(
        tmp_path: Path) -> None:
    """Where /dev/kvm is no usable device (here: a plain file) the KVM suite script writes
    the machine's description and one line saying why it stopped, and exits 0."""
    import sys

    from rootfs import proc
    from tests.vm.conftest import REPO

    not_a_device = tmp_path / "kvm"
    not_a_device.write_text("")
    done = proc.run(["env", f"KVM_DEVICE={not_a_device}", f"PYTHON={sys.executable}", "bash",
                     str(REPO / "bench/device/kvm-suite.sh"), str(tmp_path / "results")],
                    timeout=120)
    (result,) = (tmp_path / "results").iterdir()
    assert result.name.startswith(tuple(f"20{y}" for y in range(20, 100)))
    assert "-kvm-" in result.name
    steps = (result / "steps.txt").read_text()
    assert f"stopped: {not_a_device} is not a usable character device: no KVM here" in steps
    machine = (result / "machine.txt").read_text()
    assert "qemu: QEMU emulator version" in machine and "cores" in machine
    assert "no KVM here" in done.stderr and not (result / "suite").exists()


def test_suite_bar_takes_one_power_of_two_size() -> None:
    args = cli.parser().parse_args(["suite", "--bar", "4G"])
    assert args.bar == 4 * GIB
    assert cli.parser().parse_args(["suite"]).bar is None
    for bad in ("3G", "4G,8G", "x"):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(["suite", "--bar", bad])
    machine: dict[str, object] = {"accel": "tcg", "cpu": "qemu64,+rdrand",
                                  "machine_type": "microvm"}
    bar_sweep.on_pcie(machine, BarDevice(512 * GIB, phys_bits_for(512 * GIB)))
    assert machine == {"accel": "tcg", "cpu": "qemu64,+rdrand,phys-bits=41",
                       "machine_type": "microvm,pcie=on"}


def test_stand_in_gpus_and_switches_take_consecutive_slots() -> None:
    bar = BarDevice(64 << 20, count=2, edu=4)
    assert bar.bdfs() == [f"0000:00:0{i}.0" for i in range(1, 7)]
    argv = " ".join(qemu_argv(_spec(bar)))
    assert "ivshmem-plain,memdev=bar1,addr=02.0" in argv
    assert argv.count("-device edu,") == 4 and "edu,addr=06.0" in argv
    assert BarDevice(0, edu=1).bdfs() == ["0000:00:01.0"]  # no ivshmem: edu at the first slot


def test_suite_standin_takes_gpu_and_switch_counts() -> None:
    assert cli.parser().parse_args(["suite", "--standin", "2,4"]).standin == (2, 4)
    for bad in ("2", "a,b", "20,20"):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(["suite", "--standin", bad])
