"""End-to-end: the cpu image booted in QEMU microvm, judged by the frames it sends."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from guestinit.wire import FrameType
from tests.vm.conftest import agent, assert_main_phase_after_ready, boot_vm, explain

pytestmark = pytest.mark.vm

STAGES = ["early", "log", "config", "discover", "modules", "devices", "daemons", "cdi",
          "lockdown", "agent", "ready"]
SYSLOG_PROBE = "vm-tier-syslog-probe"
# What the stand-in's syslog line adds after the message; the kernel echoes its cmdline
# (which holds the message) on the console too, so the message alone proves nothing.
SYSLOG_LINE = f"{SYSLOG_PROBE} pid="
# The stand-in, an independent reader, reports what /sys/module shows after our loader ran.
CHECKED = ("virtio_mmio", "virtio_console", "vsock", "vmw_vsock_virtio_transport", "evdev")
MODULES_LINE = "in /sys/module: "
AGENT_SOCKET = "/run/agent-standin.sock"


def test_happy_path_ready_over_virtio_port_then_powerdown(cpu_image: str, tmp_path: Path) -> None:
    # loglevel=7 puts syslog lines (forwarded to kmsg at their own priority) on the console,
    # which is how the host sees that the syslog server got the agent stand-in's line.
    probe = agent("--message", SYSLOG_PROBE, "--check-modules", ",".join(CHECKED),
                  "--listen", AGENT_SOCKET)
    res = boot_vm(cpu_image, tmp_path, append=f"{probe} loglevel=7 "
                  f"guestinit.agent.ready=unix:{AGENT_SOCKET}", hold_until=MODULES_LINE)
    assert res.ok, explain(res)
    ready = res.first(FrameType.READY)
    assert ready is not None
    names = [name for name, _, _ in ready.timeline()]
    assert [s for s in names if s in STAGES] == STAGES, names
    modules = ready.fields.get("modules")
    assert isinstance(modules, list)
    for mod in ("virtio_mmio", "virtio_console", "vsock"):
        assert mod in modules, f"{mod} not loaded by guestinit's loader: {modules}"
    facts = ready.fields.get("agent")  # ready means the stand-in listens, not just spawned
    assert isinstance(facts, dict) and facts.get("listening_at") == f"unix:{AGENT_SOCKET}", facts
    assert "agent:ready" in names
    daemons = ready.fields.get("daemons")
    assert isinstance(daemons, list) and any("agent" in repr(d) for d in daemons), daemons
    shutdown = res.first(FrameType.SHUTDOWN)
    assert shutdown is not None and res.qemu_rc == 0 and not res.forced
    assert_main_phase_after_ready(res)
    with open(res.console_log, encoding="utf-8", errors="replace") as fh:
        console = fh.read()
    assert SYSLOG_LINE in console
    line = next(x for x in console.splitlines() if MODULES_LINE in x)
    assert all(f"{m}=yes" in line for m in CHECKED), line
    t = res.timings
    assert t["guest_init_exec_ns"] is not None and t["guest_ready_ns"] is not None
    assert 0 < t["guest_init_exec_ns"] < t["guest_ready_ns"]


def test_bad_cmdline_value_fails_fast_and_powers_off(
    cpu_image: str, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    res = boot_vm(cpu_image, tmp_path, append="guestinit.log=loud")
    failed = res.first(FrameType.FAILED)
    assert failed is not None, explain(res)
    assert "guestinit.log" in str(failed.fields["reason"]), failed
    assert res.first(FrameType.READY) is None
    # The guest powers itself off: QEMU exits on its own, nobody had to stop it.
    assert res.qemu_rc == 0 and not res.forced, explain(res)
    assert not res.ok and "guestinit.log" in res.reason
    record_property("host_failed_s", res.timings["host_failed_s"])
    record_property("host_exit_s", res.timings["host_exit_s"])
    print(f"failed frame {res.timings['host_failed_s']:.2f}s after QEMU start, "
          f"QEMU exit at {res.timings['host_exit_s']:.2f}s")


def test_agent_exit_is_an_orderly_shutdown(cpu_image: str, tmp_path: Path) -> None:
    res = boot_vm(cpu_image, tmp_path, append=agent("--exit-after", "1"), shutdown=False)
    assert res.ok, explain(res)
    shutdown = res.first(FrameType.SHUTDOWN)
    assert shutdown is not None
    assert "agent" in str(shutdown.fields["reason"]).lower(), shutdown
    assert "host_powerdown_s" not in res.timings  # nobody asked: the guest stopped itself


@pytest.mark.parametrize("reexec", [False, True])
def test_erofs_verity_root_boots_the_same_way(cpu_image: str, tmp_path: Path,
                                              reexec: bool) -> None:
    # by default the initramfs's init goes on rooted in the verified tree; with
    # verity.reexec=1 the verified tree's /sbin/init takes over, and its timeline holds
    # the first init's part as the span "initramfs"
    res = boot_vm(cpu_image, tmp_path, erofs=True,
                  append=agent() + (" guestinit.verity.reexec=1" if reexec else ""))
    assert res.ok, explain(res)
    ready = res.first(FrameType.READY)
    assert ready is not None
    names = [n for n, _, _ in ready.timeline()]
    assert [n for n in names if n in STAGES] == STAGES
    assert "verity" in names
    assert ("initramfs" in names) == reexec, names


def _tampered_copy(src: str, dst: Path) -> Path:
    """out/cpu with one byte of rootfs.erofs flipped: the erofs volume name in the
    superblock (offset 1024 + 64), which the filesystem itself does not check but
    dm-verity must, since block 0 is read at mount."""
    dst.mkdir()
    for name in os.listdir(src):
        if name != "rootfs.erofs":
            os.symlink(os.path.join(src, name), dst / name)
    shutil.copy(os.path.join(src, "rootfs.erofs"), dst / "rootfs.erofs")
    with open(dst / "rootfs.erofs", "r+b") as fh:
        fh.seek(1024 + 64)
        byte = fh.read(1)
        fh.seek(1024 + 64)
        fh.write(bytes([byte[0] ^ 0xFF]))
    return dst


def test_erofs_with_a_flipped_byte_is_refused(cpu_image: str, tmp_path: Path) -> None:
    bad = _tampered_copy(cpu_image, tmp_path / "tampered")
    res = boot_vm(str(bad), tmp_path / "run", erofs=True, append=agent(), exit_grace=10.0)
    assert not res.ok
    assert res.first(FrameType.READY) is None, "a tampered root was used: " + explain(res)
    with open(res.console_log, encoding="utf-8", errors="replace") as fh:
        console = fh.read()
    # Refused by dm-verity, not by some unrelated breakage.
    assert "verity" in console and "corrupted" in console, explain(res)


def test_without_an_entropy_source_the_init_never_waits_for_the_crng(cpu_image: str,
                                                                     tmp_path: Path) -> None:
    # qemu64, no RDRAND, no virtio-rng: the kernel CRNG is ready only late (if at all
    # before the VM stops). The launcher's hash seed means Python reads no entropy, so
    # the init's first frame comes before the CRNG is ready, never after it.
    res = boot_vm(cpu_image, tmp_path, append="guestinit.agent=none", entropy="none")
    assert res.ok, explain(res)
    shutdown = res.first(FrameType.SHUTDOWN)
    assert shutdown is not None
    kernel = shutdown.fields.get("kernel")
    assert isinstance(kernel, dict) and isinstance(kernel.get("run_init_ns"), int), kernel
    first = res.timings["guest_first_frame_ns"]
    assert isinstance(first, int) and first > kernel["run_init_ns"]
    crng = kernel.get("crng_ready_ns")
    assert crng is None or first < crng, (first, crng)
