"""The driver's userspace in the image: version line, ELF sonames, what is found and how it
becomes mounts and hooks (real trees in tmp_path)."""

from __future__ import annotations

import io
import pathlib

import pytest
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile

from guestinit.nvidia import driver_files
from guestinit.nvidia.driver_files import Library, Userspace
from guestinit.testing import nvidia_bundle
from tests.fixtures.accel import fake_nvidia_proc

VER = "550.54.15"
LIB = "/usr/lib/x86_64-linux-gnu"


@pytest.mark.parametrize(("text", "version"), [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Feb 13 01:04:09 UTC 2024\n"
     "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n", "550.54.15"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  560.35.03  Release Build  "
     "(dvs-builder@U16-I3-B03-4-3)  Fri Aug 16 21:42:42 UTC 2024\n", "560.35.03"),
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  (guestinit stand-in)\n",
     "550.54.15"),  # the stand-in kernel module's line (tests/fixtures/nvidia-kmod)
    ("GCC version:  gcc version 12.2.0\n", ""),
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module\n", ""),
])
def test_driver_version_from_the_nvrm_line(text: str, version: str) -> None:
    assert driver_files.parse_driver_version(text) == version


def test_soname_read_from_elf_agrees_with_pyelftools(tmp_path: pathlib.Path) -> None:
    data = nvidia_bundle.elf_with_soname("libcuda.so.1")
    (tmp_path / "lib.so").write_bytes(data)
    assert driver_files.read_soname(str(tmp_path / "lib.so")) == "libcuda.so.1"
    seen = [t.soname for seg in ELFFile(io.BytesIO(data)).iter_segments()  # type: ignore[attr-defined]
            if isinstance(seg, DynamicSegment) for t in seg.iter_tags()
            if t.entry.d_tag == "DT_SONAME"]
    assert seen == ["libcuda.so.1"]


@pytest.mark.parametrize("content", [
    b"not an ELF file at all",
    b"\x7fELF\x01\x01\x01" + bytes(100),  # 32-bit
    b"\x7fELF\x02\x02\x01" + bytes(100),  # big-endian
    b"\x7fELF\x02\x01",  # truncated
])
def test_soname_of_what_is_not_a_64_bit_le_elf_is_empty(tmp_path: pathlib.Path,
                                                         content: bytes) -> None:
    (tmp_path / "f").write_bytes(content)
    assert driver_files.read_soname(str(tmp_path / "f")) == ""


def test_soname_of_an_elf_without_dt_soname_is_empty(tmp_path: pathlib.Path) -> None:
    data = bytearray(nvidia_bundle.elf_with_soname("libx.so.1"))
    dyn = 64 + 2 * 56
    data[dyn + 32:dyn + 40] = (0x6ffffff0).to_bytes(8, "little")  # DT_SONAME -> DT_VERSYM
    (tmp_path / "f").write_bytes(bytes(data))
    assert driver_files.read_soname(str(tmp_path / "f")) == ""


def image(root: pathlib.Path) -> pathlib.Path:
    """A root with the stand-in bundle plus decoys the rules must skip."""
    fake_nvidia_proc(root, [])
    nvidia_bundle.install(root)
    lib = root / LIB.lstrip("/")
    (lib / "libcuda.so.1").symlink_to(f"libcuda.so.{VER}")  # a link, not a regular file
    (lib / "libnvidia-ml.so.535.104.05").write_bytes(b"")  # another driver's version
    (lib / f"libnvidia-gone.so.{VER}").mkdir()  # not a file
    (lib / f"notlib.so.{VER}").write_bytes(b"")  # not lib*
    (lib / f"libnvidia-glcore.so.{VER}").write_bytes(
        nvidia_bundle.elf_with_soname(f"libnvidia-glcore.so.{VER}"))  # soname = file name
    fw = root / "lib/firmware/nvidia"
    (fw / VER).mkdir(parents=True)
    (fw / VER / "gsp_ga10x.bin").write_bytes(b"fw")
    (fw / VER / "gsp_tu10x.bin").write_bytes(b"fw")
    (fw / "535.104.05").mkdir()
    (fw / "535.104.05/gsp_ga10x.bin").write_bytes(b"old")
    return root


def test_read_userspace_finds_what_is_there_and_only_that(tmp_path: pathlib.Path) -> None:
    files = driver_files.read_userspace(str(image(tmp_path)))
    assert files.version == VER and files.libdir == LIB
    assert [(lib.path, lib.soname) for lib in files.libraries] == [
        (f"{LIB}/libcuda.so.{VER}", "libcuda.so.1"),
        (f"{LIB}/libnvidia-glcore.so.{VER}", f"libnvidia-glcore.so.{VER}"),
        (f"{LIB}/libnvidia-ml.so.{VER}", "libnvidia-ml.so.1"),
        (f"{LIB}/libnvidia-ptxjitcompiler.so.{VER}", "libnvidia-ptxjitcompiler.so.1")]
    assert files.binaries == ["/usr/bin/nvidia-smi", "/usr/bin/nvidia-persistenced"]
    assert files.firmware == [f"/lib/firmware/nvidia/{VER}/gsp_ga10x.bin",
                              f"/lib/firmware/nvidia/{VER}/gsp_tu10x.bin"]
    assert files.sockets == [] and files.hook == "/usr/bin/nvidia-cdi-hook"


def test_every_binary_the_image_has_is_found_in_nvidia_bin(tmp_path: pathlib.Path) -> None:
    fake_nvidia_proc(tmp_path, [])
    bindir = tmp_path / "opt/nvidia/bin"
    bindir.mkdir(parents=True)
    for name in driver_files.BINARIES:
        (bindir / name).write_text("#!/bin/true\n")
    files = driver_files.read_userspace(str(tmp_path), bindir="/opt/nvidia/bin")
    assert files.binaries == [f"/opt/nvidia/bin/{b}" for b in driver_files.BINARIES]
    assert files.libraries == [] and files.hook == ""


def test_the_library_dir_is_a_parameter(tmp_path: pathlib.Path) -> None:
    fake_nvidia_proc(tmp_path, [])
    (tmp_path / "usr/lib64").mkdir(parents=True)
    (tmp_path / f"usr/lib64/libcuda.so.{VER}").write_bytes(b"")
    files = driver_files.read_userspace(str(tmp_path), libdir="/usr/lib64")
    assert [lib.path for lib in files.libraries] == [f"/usr/lib64/libcuda.so.{VER}"]
    assert driver_files.read_userspace(str(tmp_path)).libraries == []


def test_sockets_are_found_in_run_before_var_run(tmp_path: pathlib.Path) -> None:
    fake_nvidia_proc(tmp_path, [])
    for rel in ("var/run/nvidia-persistenced/socket", "var/run/nvidia-fabricmanager/socket",
                "run/nvidia-fabricmanager/socket"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    files = driver_files.read_userspace(str(tmp_path))
    assert files.sockets == ["/var/run/nvidia-persistenced/socket",
                             "/run/nvidia-fabricmanager/socket"]
    assert driver_files.mounts(files) == [
        {"hostPath": p, "containerPath": p, "options": ["nosuid", "nodev", "bind", "noexec"]}
        for p in files.sockets]


def test_no_version_no_libraries_or_firmware(tmp_path: pathlib.Path) -> None:
    image(tmp_path)
    (tmp_path / "proc/driver/nvidia/version").unlink()
    files = driver_files.read_userspace(str(tmp_path))
    assert files.version == "" and files.libraries == [] and files.firmware == []
    assert files.binaries  # binaries do not depend on the version
    assert driver_files.hooks(files) == []


def test_symlinks_follow_sonames_and_the_dev_links() -> None:
    libs = [Library(f"{LIB}/libnvidia-opticalflow.so.{VER}", "libnvidia-opticalflow.so.1"),
            Library(f"{LIB}/libnvidia-glcore.so.{VER}", f"libnvidia-glcore.so.{VER}"),
            Library(f"{LIB}/libnvidia-nvvm.so.{VER}", "libnvidia-nvvm.so.4"),
            Library(f"{LIB}/libcuda.so.{VER}", "")]  # no soname: only the dev link
    assert driver_files.symlinks(libs) == [
        (f"libcuda.so.{VER}", f"{LIB}/libcuda.so"),
        (f"libnvidia-nvvm.so.{VER}", f"{LIB}/libnvidia-nvvm.so.4"),
        ("libnvidia-opticalflow.so.1", f"{LIB}/libnvidia-opticalflow.so"),
        (f"libnvidia-opticalflow.so.{VER}", f"{LIB}/libnvidia-opticalflow.so.1")]


def test_hooks_need_the_hook_binary_and_libraries() -> None:
    libs = [Library(f"{LIB}/libnvidia-ml.so.{VER}", "libnvidia-ml.so.1")]
    with_hook = Userspace(VER, LIB, libs, hook="/usr/bin/nvidia-cdi-hook")
    assert driver_files.hooks(with_hook) == [
        {"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook",
         "args": ["nvidia-cdi-hook", "create-symlinks",
                  "--link", f"libnvidia-ml.so.{VER}::{LIB}/libnvidia-ml.so.1"]},
        {"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook",
         "args": ["nvidia-cdi-hook", "update-ldcache", "--folder", LIB]}]
    assert driver_files.hooks(Userspace(VER, LIB, libs)) == []
    assert driver_files.hooks(Userspace(VER, LIB, [], hook="/usr/bin/nvidia-cdi-hook")) == []
    # nothing to link (soname = file name): ldcache only
    tls = Library(f"{LIB}/libnvidia-tls.so.{VER}", f"libnvidia-tls.so.{VER}")
    flat = Userspace(VER, LIB, [tls], hook="/usr/bin/nvidia-cdi-hook")
    assert [h["args"] for h in driver_files.hooks(flat)] == [
        ["nvidia-cdi-hook", "update-ldcache", "--folder", LIB]]


def test_mounts_are_read_only_binds_without_type() -> None:
    files = Userspace(VER, LIB, [Library(f"{LIB}/libcuda.so.{VER}", "libcuda.so.1")],
                      binaries=["/usr/bin/nvidia-smi"],
                      firmware=[f"/lib/firmware/nvidia/{VER}/gsp_ga10x.bin"])
    assert driver_files.mounts(files) == [
        {"hostPath": p, "containerPath": p, "options": ["ro", "nosuid", "nodev", "bind"]}
        for p in (f"{LIB}/libcuda.so.{VER}", "/usr/bin/nvidia-smi",
                  f"/lib/firmware/nvidia/{VER}/gsp_ga10x.bin")]
