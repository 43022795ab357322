from __future__ import annotations

import stat
import sys
from pathlib import Path

import psutil
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


def vmm_processes(root: psutil.Process | None = None) -> set[psutil.Process]:
    """The QEMU or stand-in VMM processes that descend from ``root`` (default: this test
    process), so a VMM anything else on the machine runs is never counted. Zombies are
    left out: they have exited, only their parent has not reaped them yet."""
    found = set()
    for child in (root or psutil.Process()).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and _is_vmm(child.cmdline()):
                found.add(child)
        except psutil.NoSuchProcess:
            continue
    return found


def still_running(processes: set[psutil.Process]) -> set[psutil.Process]:
    """Those of ``processes`` that have not exited (the same process: pid and start time)."""
    alive = set()
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.add(p)
        except psutil.NoSuchProcess:
            continue
    return alive


def _is_vmm(argv: list[str]) -> bool:
    # The stand-in execs python, so it is known by its script name.
    return bool(argv) and (argv[0].endswith("qemu-system-x86_64")
                           or any(a.endswith("fakevmm.py") for a in argv[1:3]))
