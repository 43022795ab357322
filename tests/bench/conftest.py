from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from bench.image import Image

HERE = Path(__file__).parent


@pytest.fixture
def fake_vmm(tmp_path: Path) -> str:
    """An executable that stands in for qemu-system-x86_64 (see fakevmm.py)."""
    path = tmp_path / "fake-qemu"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "fakevmm.py"} "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def paper_image(tmp_path: Path) -> Image:
    """Image files that exist but never boot (the fake VMM does not read them)."""
    d = tmp_path / "img"
    d.mkdir()
    for name in ("vmlinuz", "initramfs.img"):
        (d / name).write_bytes(b"\0" * 16)
    (d / "cmdline.txt").write_text("console=ttyS0 quiet\n")
    return Image(str(d), str(d / "vmlinuz"), str(d / "initramfs.img"),
                 "console=ttyS0 quiet")


def qemu_pids() -> set[int]:
    """PIDs of every QEMU or stand-in VMM on the machine (to prove none was left behind)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        # The stand-in execs python, so it is known by its script name.
        if argv[0].endswith(b"qemu-system-x86_64") or any(a.endswith(b"fakevmm.py")
                                                           for a in argv[1:3]):
            pids.add(int(entry))
    return pids
