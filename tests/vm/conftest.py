"""The VM tier: the real ``cpu`` image (out/cpu) booted in QEMU with Debian's kernel.

``./build.sh test`` builds out/cpu before pytest runs; when it is missing this
fixture builds it, and fails (never skips) with the builder's message if it cannot.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from bench import image, proc
from bench.boot import BootOptions, BootResult, boot

REPO = Path(__file__).resolve().parents[2]
# GUESTINIT_VM_IMAGE points the tier at another build of the cpu profile.
CPU_IMAGE = Path(os.environ.get("GUESTINIT_VM_IMAGE") or REPO / "out" / "cpu")
REQUIRED = ("vmlinuz", "initramfs.img", "cmdline.txt", "rootfs.erofs", "rootfs.verity",
            "roothash.txt", "cmdline-erofs.txt")
STANDIN = "/usr/lib/guestinit/guestinit/testing/agent_standin.py"
BOOT_TIMEOUT = 60.0


def agent(*args: str) -> str:
    """A ``guestinit.agent=`` cmdline word running the agent stand-in with ``args``."""
    words = ["/usr/bin/python3.11", "-IS", STANDIN, *args]
    return f'guestinit.agent="{" ".join(words)}"'


def _builder() -> str:
    beside = Path(sys.executable).parent / "guestinit-build"
    found = str(beside) if beside.exists() else shutil.which("guestinit-build")
    if found is None:
        pytest.fail("guestinit-build is not installed: run ./build.sh setup")
    return found


@pytest.fixture(scope="session")
def cpu_image() -> str:
    if not all((CPU_IMAGE / name).is_file() for name in REQUIRED):
        try:
            proc.run([_builder(), "image", "cpu", "--out", str(CPU_IMAGE)], timeout=1800,
                     cwd=str(REPO))
        except proc.RunError as exc:
            pytest.fail(f"building the cpu image for the vm tier failed:\n{exc}")
    missing = [n for n in REQUIRED if not (CPU_IMAGE / n).is_file()]
    if missing:
        pytest.fail(f"guestinit-build image cpu left {CPU_IMAGE} without {', '.join(missing)}")
    return str(CPU_IMAGE)


TUNED_IMAGE = Path(os.environ.get("GUESTINIT_VM_TUNED_IMAGE") or REPO / "out" / "cpu-tuned")


@pytest.fixture(scope="session")
def tuned_image() -> str:
    """out/cpu-tuned: the cpu image on the kernel ./build.sh kernel builds (cached)."""
    needed = (*REQUIRED, "vmlinux")
    if not all((TUNED_IMAGE / name).is_file() for name in needed):
        try:
            proc.run([_builder(), "image", "cpu-tuned", "--out", str(TUNED_IMAGE)],
                     timeout=3600, cwd=str(REPO))
        except proc.RunError as exc:
            pytest.fail(f"building the cpu-tuned image for the vm tier failed:\n{exc}")
    missing = [n for n in needed if not (TUNED_IMAGE / n).is_file()]
    if missing:
        pytest.fail(f"guestinit-build image cpu-tuned left {TUNED_IMAGE} without "
                    f"{', '.join(missing)}")
    return str(TUNED_IMAGE)


def boot_vm(directory: str, workdir: Path, *, erofs: bool = False, entry: str = "auto",
            **kw: object) -> BootResult:
    opts = BootOptions(timeout=BOOT_TIMEOUT, workdir=str(workdir), erofs=erofs,
                       **kw)  # type: ignore[arg-type]
    res = boot(image.load(directory, erofs=erofs, entry=entry), opts, progress=None)
    return res


def explain(res: BootResult) -> str:
    """Failure context for an assert message: reason, frames, console tail."""
    tail = ""
    if os.path.exists(res.console_log):
        with open(res.console_log, encoding="utf-8", errors="replace") as fh:
            tail = "\n".join(fh.read().splitlines()[-25:])
    frames = [f"{r.host_s:.2f}s {r.frame!r}"[:300] for r in res.frames]
    return (f"reason: {res.reason}\nerrors: {res.errors}\nframes:\n" + "\n".join(frames)
            + f"\nconsole ({res.console_log}):\n{tail}")


KATA_IMAGE = Path(os.environ.get("GUESTINIT_VM_KATA_IMAGE") or REPO / "out" / "kata")
KATA_NEEDED = ("vmlinuz", "initramfs.img", "kata-containers.img", "root_hash.txt",
               "configuration.toml", "configuration-initrd.toml")


@pytest.fixture(scope="session")
def kata_image() -> str:
    """out/kata: the kata profile (its kernel built by ./build.sh kernel, cached)."""
    if not all((KATA_IMAGE / n).is_file() for n in KATA_NEEDED):
        try:
            proc.run([_builder(), "image", "kata", "--out", str(KATA_IMAGE)], timeout=3600,
                     cwd=str(REPO))
        except proc.RunError as exc:
            pytest.fail(f"building the kata image for the vm tier failed:\n{exc}")
    return str(KATA_IMAGE)
