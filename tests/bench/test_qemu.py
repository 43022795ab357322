from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import qemu
from bench.qemu import VmSpec, choose_accel, kernel_cmdline, qemu_argv


def test_cmdline_adds_report_channel_console_and_panic_after_the_image_words() -> None:
    line = kernel_cmdline("quiet root=x", 'guestinit.log=debug guestinit.agent="/bin/a -x"')
    assert line.split()[:2] == ["quiet", "root=x"]
    assert "console=ttyS0" in line.split()
    assert "panic=-1" in line.split()
    words = line.split(" ")
    report = words.index("guestinit.report=virtio-port:guestinit.report")
    assert words.index("guestinit.log=debug") > report  # --append comes last, so it wins
    assert line.endswith(' guestinit.agent="/bin/a -x"')  # quoting is the kernel's to parse


def test_cmdline_keeps_the_image_console_and_panic() -> None:
    line = kernel_cmdline("console=hvc0 panic=5")
    assert line.count("console=") == 1 and "console=hvc0" in line
    assert line.count("panic=") == 1


def _spec(**kw: object) -> VmSpec:
    base: dict[str, object] = dict(
        kernel="/k", initramfs="/i", cmdline="quiet x=1", console_log="/c.log",
        report_socket="/r.sock", qmp_socket="/q.sock",
    )
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def test_argv_is_a_microvm_with_report_port_qmp_and_serial_log() -> None:
    argv = qemu_argv(_spec())
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-M") + 1].startswith("microvm")
    assert argv[argv.index("-append") + 1] == "quiet x=1"  # one argv word, never re-split
    assert "-nodefaults" in argv and "-no-user-config" in argv and "-no-reboot" in argv
    assert argv[argv.index("-accel") + 1] == "tcg"
    # QEMU is the client of both sockets: the harness listens before QEMU starts.
    assert "socket,id=report,path=/r.sock" in argv
    assert "socket,id=qmp,path=/q.sock" in argv
    assert "server" not in joined
    assert "virtserialport,chardev=report,name=guestinit.report" in argv
    assert "chardev=qmp,mode=control" in argv
    assert "file,id=console,path=/c.log" in argv
    assert "virtio-blk-device" not in joined


def test_argv_attaches_disks_read_only_in_order_and_kvm_when_chosen() -> None:
    argv = qemu_argv(_spec(disks=["/a.erofs", "/a.verity"], accel="kvm", memory_mib=333))
    drives = [argv[i + 1] for i, w in enumerate(argv) if w == "-drive"]
    assert drives == [
        "id=disk0,file=/a.erofs,format=raw,if=none,readonly=on",
        "id=disk1,file=/a.verity,format=raw,if=none,readonly=on",
    ]
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-m") + 1] == "333"


def test_requested_accel_is_used_without_probing(tmp_path: Path) -> None:
    assert choose_accel("tcg", "/nonexistent") == ("tcg", "requested")
    with pytest.raises(ValueError, match=r"'fast'.*auto, kvm or tcg"):
        choose_accel("fast", "/nonexistent")


def _dev(tmp_path: Path) -> str:
    """A stand-in for /dev/kvm that opens, so the harness goes on to its probe boot."""
    dev = tmp_path / "kvm"
    dev.touch()
    return str(dev)


def _auto(kernel: Path, tmp_path: Path) -> tuple[str, str]:
    return choose_accel("auto", str(kernel), cache_dir=str(tmp_path), kvm_device=_dev(tmp_path))


def test_auto_accel_without_kvm_device_is_tcg(tmp_path: Path) -> None:
    accel, why = choose_accel("auto", "/k", kvm_device=str(tmp_path / "none"))
    assert accel == "tcg" and "none" in why


def test_auto_accel_trusts_the_cached_probe(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not a kernel")
    key = qemu._probe_key(str(kernel), qemu.QEMU)
    (tmp_path / "kvm-probe.json").write_text(json.dumps({key: True}))
    assert _auto(kernel, tmp_path)[0] == "kvm"
    (tmp_path / "kvm-probe.json").write_text(json.dumps({key: False}))
    accel, why = _auto(kernel, tmp_path)
    assert accel == "tcg" and "cached" in why


def test_kvm_probe_fails_fast_for_a_file_that_is_no_kernel(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 4096)
    accel, why = _auto(kernel, tmp_path)
    assert accel == "tcg" and "probe" in why
    cached = json.loads((tmp_path / "kvm-probe.json").read_text())
    assert list(cached.values()) == [False]


def test_tcg_cmdline_pins_the_tsc_rate_unless_the_image_does() -> None:
    assert "tsc_early_khz=2596120" in kernel_cmdline("quiet", tsc_khz=2596120).split()
    assert "tsc_early_khz" not in kernel_cmdline("quiet", tsc_khz=None)
    line = kernel_cmdline("tsc_early_khz=1000", tsc_khz=2596120)
    assert line.split().count("tsc_early_khz=1000") == 1 and "2596120" not in line


def _cpuinfo(tmp_path: Path, model: str, flags: str, mhz: str = "1234.5") -> str:
    text = (f"processor\t: 0\nmodel name\t: {model}\ncpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n\n"
            f"processor\t: 1\nmodel name\t: other\ncpu MHz\t\t: 99\nflags\t\t: {flags}\n")
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


def test_host_tsc_rate_from_sysfs_model_name_or_hypervisor(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    stable = "fpu tsc constant_tsc nonstop_tsc"
    intel = _cpuinfo(tmp_path, "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz", stable)
    assert qemu.host_tsc_khz(intel, str(sysfs)) == 2_100_000
    vm = _cpuinfo(tmp_path, "AMD EPYC", stable + " tsc_known_freq hypervisor", "2596.120")
    assert qemu.host_tsc_khz(vm, str(sysfs)) == 2_596_120
    # cpu MHz on bare metal is the current clock, not the TSC rate: no guess.
    assert qemu.host_tsc_khz(_cpuinfo(tmp_path, "AMD EPYC", stable), str(sysfs)) is None
    assert qemu.host_tsc_khz(_cpuinfo(tmp_path, "X @ 2.10GHz", "fpu tsc"), str(sysfs)) is None
    (sysfs / "devices/system/cpu/cpu0").mkdir(parents=True)
    (sysfs / "devices/system/cpu/cpu0/tsc_freq_khz").write_text("3000000\n")
    assert qemu.host_tsc_khz(intel, str(sysfs)) == 3_000_000


def _fake_qemu(tmp_path: Path, console: str) -> str:
    """A QEMU stand-in that writes ``console`` to its -chardev file and then waits."""
    tmp_path.mkdir()
    script = tmp_path / "qemu"
    script.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in file,id=console,path=*) log="${a#*path=}";; esac; done\n'
        f"printf '%s' '{console}' > \"$log\"\n"
        "exec sleep 30\n")
    script.chmod(0o755)
    return str(script)


def test_kvm_probe_wants_the_kernel_to_reach_its_root_not_only_its_banner(
        tmp_path: Path) -> None:
    """On a host whose KVM runs a PVH kernel up to its banner and then stops with an
    emulation failure, the banner alone passed the probe and every boot then hung."""
    banner = "[    0.000000] Linux version 6.1.192-guestinit\\n"
    assert not qemu.probe_kvm("/k", _fake_qemu(tmp_path / "a", banner), seconds=1.0)
    late = banner + "[    0.9] Kernel panic - not syncing: VFS: Unable to mount root fs\\n"
    assert qemu.probe_kvm("/k", _fake_qemu(tmp_path / "b", late), seconds=3.0)
