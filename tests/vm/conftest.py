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

from bench import image
from bench.boot import BootOptions, BootResult, boot
from rootfs import proc

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


def ensure_image(profile: str, directory: Path, needed: tuple[str, ...],
                 extra: tuple[str, ...] = ()) -> str:
    """``directory`` holding ``needed``: built with guestinit-build when it does not (a
    built kernel comes from the cache); fails, never skips, with the builder's message."""
    if not all((directory / n).is_file() for n in needed):
        try:
            proc.run([_builder(), "image", profile, *extra, "--out", str(directory)], timeout=3600,
                     cwd=str(REPO))
        except proc.RunError as exc:
            pytest.fail(f"building the {profile} image for the vm tier failed:\n{exc}")
    missing = [n for n in needed if not (directory / n).is_file()]
    if missing:
        pytest.fail(f"guestinit-build image {profile} left {directory} without "
                    f"{', '.join(missing)}")
    return str(directory)


@pytest.fixture(scope="session")
def cpu_image() -> str:
    return ensure_image("cpu", CPU_IMAGE, REQUIRED)


TUNED_IMAGE = Path(os.environ.get("GUESTINIT_VM_TUNED_IMAGE") or REPO / "out" / "cpu-tuned")


@pytest.fixture(scope="session")
def tuned_image() -> str:
    """out/cpu-tuned: the cpu image on the kernel ./build.sh kernel builds (cached)."""
    return ensure_image("cpu-tuned", TUNED_IMAGE, (*REQUIRED, "vmlinux"))


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


def assert_main_phase_after_ready(res: BootResult) -> None:
    """The image's executable ran the interpreter's main start phase after the ready frame
    (``start:main`` on the shutdown frame's timeline): nothing the boot imported came from
    the image's files (docs/guest.md, "Two start phases")."""
    from guestinit.wire import FrameType

    ready, shutdown = res.first(FrameType.READY), res.first(FrameType.SHUTDOWN)
    assert ready is not None and shutdown is not None, explain(res)
    spans = {name: start for name, start, _ in shutdown.timeline()}
    assert "start:main" in spans, explain(res)
    assert spans["start:main"] >= ready.t, (
        f"the main start phase began {(ready.t - spans['start:main']) / 1e6:.1f} ms before "
        "ready: a boot-path import is not frozen in (the guest's kmsg line names it)")


KATA_IMAGE = Path(os.environ.get("GUESTINIT_VM_KATA_IMAGE") or REPO / "out" / "kata")
KATA_NEEDED = ("vmlinuz", "initramfs.img", "kata-containers.img", "root_hash.txt",
               "configuration.toml", "configuration-initrd.toml")


@pytest.fixture(scope="session")
def kata_image() -> str:
    """out/kata: the kata profile (its kernel built by ./build.sh kernel, cached)."""
    return ensure_image("kata", KATA_IMAGE, KATA_NEEDED, ("--standins",))
