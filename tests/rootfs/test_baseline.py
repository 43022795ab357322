"""The baseline inits' boot script: real frames from busybox sh, the cpu profile's modules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import msgpack
import pytest

from guestinit import wire
from rootfs import profile, tree_extras

BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="busybox-static is not installed")


def send(init: str, tmp_path: Path, uptime: str, *calls: str) -> bytes:
    """Run the generated frame functions with busybox sh on the host; fd 4 is a file."""
    assert BUSYBOX is not None
    (tmp_path / "uptime").write_text(uptime)
    out = tmp_path / "report.bin"
    script = (tree_extras.frame_functions(init, str(tmp_path / "uptime"))
              + f'exec 4> "{out}"\n' + "".join(f"{c}\n" for c in calls))
    subprocess.run([BUSYBOX, "sh", "-c", script], check=True, timeout=10)
    return out.read_bytes()


def decode(data: bytes) -> list[wire.Frame]:
    reader = wire.FrameReader()
    items = reader.feed(data) + reader.eof()
    assert all(isinstance(i, wire.Frame) for i in items), items
    return [i for i in items if isinstance(i, wire.Frame)]


@needs_busybox
@pytest.mark.parametrize(("uptime", "ns"), [
    ("12.34 5.67\n", 12_340_000_000),
    ("0.09 0.00\n", 90_000_000),  # 09 is no octal number: the fraction must not read as one
    ("1.00 0.00\n", 1_000_000_000),
    ("4294967.29 1.00\n", 4_294_967_290_000_000),  # past 2**32 ns: 64-bit shell arithmetic
])
def test_ready_frame_carries_uptime_as_boottime_ns(tmp_path: Path, uptime: str, ns: int) -> None:
    (frame,) = decode(send("busybox", tmp_path, uptime, "send_ready"))
    assert frame.type is wire.FrameType.READY
    assert frame.t == ns
    assert frame.boot_id == "baseline-busybox"
    assert frame.fields == {"mode": "cpu", "timeline": [], "init": "busybox"}


@needs_busybox
def test_shutdown_follows_ready_on_one_stream(tmp_path: Path) -> None:
    data = send("systemd", tmp_path, "3.07 0.10\n", "send_ready", "send_shutdown")
    ready, down = decode(data)
    assert (ready.type, down.type) == (wire.FrameType.READY, wire.FrameType.SHUTDOWN)
    assert ready.boot_id == down.boot_id == "baseline-systemd"
    assert down.t == 3_070_000_000
    assert down.fields == {"reason": "power button (ACPI powerdown request)", "audit": [],
                           "init": "systemd"}
    # ``init`` is part of the schema (optional) and on the wire
    body = msgpack.unpackb(data[4:4 + int.from_bytes(data[:4], "big")])
    assert body["init"] == "systemd"


def test_frame_is_split_around_a_fixed_width_t() -> None:
    head, tail = tree_extras.frame_around_t(wire.FrameType.READY, "busybox", {"timeline": []})
    assert head.endswith(b"\xcf")
    t = 7_654_321_000_000
    (frame,) = decode(head + t.to_bytes(8, "big") + tail)
    assert frame.t == t and frame.get("timeline") == []


def script(init: profile.Init) -> list[str]:
    return tree_extras.baseline_script(init.value, "6.1.0-test", ["kernel/a.ko"]).splitlines()


def test_power_button_is_open_before_ready() -> None:
    lines = script(profile.Init.BUSYBOX)
    opened = lines.index('[ -n "$button" ] && exec 3< "$button"')
    ready = lines.index("send_ready")
    assert opened < ready < lines.index("  send_shutdown") < lines.index("  poweroff -f")
    assert "insmod /lib/modules/6.1.0-test/kernel/a.ko" in lines[:ready]


def test_busybox_mounts_and_systemd_leaves_them_to_pid1() -> None:
    busybox, systemd = script(profile.Init.BUSYBOX), script(profile.Init.SYSTEMD)
    for target in ("/proc", "/sys", "/dev", "/run", "/tmp"):
        assert any(line.startswith("mount ") and line.endswith(f" {target}") for line in busybox)
    assert [line for line in systemd if line.startswith("mount ")] == [
        "mount -t tmpfs -o nosuid,nodev,mode=1777 tmp /tmp"]
    assert "  kill -48 1" in systemd and "  poweroff -f" not in systemd


def test_applets_the_script_runs_are_installed() -> None:
    for applet in ("mount", "insmod", "dd", "sync", "kill", "poweroff", "sleep", "echo"):
        assert applet in tree_extras.BUSYBOX_APPLETS


@pytest.mark.parametrize("name", ["baseline-busybox", "baseline-systemd"])
def test_baselines_load_the_cpu_profiles_modules(name: str) -> None:
    cpu, base = profile.load("cpu").kernel, profile.load(name).kernel
    assert base.early == cpu.early
    assert set(cpu.modules) <= set(base.modules)
    assert {"button", "evdev"} <= set(base.early)
