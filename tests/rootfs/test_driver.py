"""Driver bundles: a fake NVIDIA bundle (stand-in programs, modules with real ELF .modinfo)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from guestinit.testing import nvidia_bundle
from rootfs import cpio, pack, profile
from rootfs.build import build_image
from rootfs.kernel import KernelTree
from rootfs.steps import BuildError, Progress


def fake_module(src: Path, dst: Path, fields: dict[str, str], tmp: Path) -> None:
    """A real module file with its .modinfo replaced (objcopy), standing in for nvidia*.ko."""
    info = tmp / f"{dst.stem}.modinfo"
    info.write_bytes(b"".join(f"{k}={v}\0".encode() for k, v in fields.items()))
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["objcopy", "--remove-section", ".modinfo", "--add-section",
                    f".modinfo={info}", str(src), str(dst)], check=True)


def make_bundle(root: Path, kt: KernelTree, release: str | None = None) -> Path:
    nvidia_bundle.install(root)
    (root / "VERSION").write_text("550.54.15\n")
    fw = root / "lib/firmware/nvidia/550.54.15/gsp_ga10x.bin"
    fw.parent.mkdir(parents=True)
    fw.write_bytes(b"\0" * 4096)
    mods = root / "lib/modules" / (release or kt.release) / "kernel/drivers/video"
    src = kt.modules / "kernel/lib/libcrc32c.ko"
    magic = f"{release or kt.release} SMP preempt mod_unload modversions "
    fake_module(src, mods / "nvidia.ko", {"license": "Dual MIT/GPL", "depends": "drm",
                "name": "nvidia", "vermagic": magic,
                "alias": "pci:v000010DEd*sv*sd*bc03sc02i00*"}, root.parent)
    fake_module(src, mods / "nvidia-uvm.ko", {"license": "Dual MIT/GPL", "depends": "nvidia",
                "name": "nvidia_uvm", "vermagic": magic}, root.parent)
    return root


def test_gpu_image_with_bundle(kernel_tree: KernelTree, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle", kernel_tree)
    out = tmp_path / "out"
    build_image(profile.load("nvidia-gpu"), out, driver_dir=bundle, locked=True,
                progress=Progress(quiet=True), zstd_level=3)
    ents = {e.path: e for e in cpio.read(pack.decompress(out / "initramfs.img"))}
    base = f"usr/lib/modules/{kernel_tree.release}"
    dep = ents[f"{base}/modules.dep"].data.decode()
    uvm = next(line for line in dep.splitlines() if "nvidia-uvm.ko:" in line)
    assert uvm.split(":")[1].split()[0] == "kernel/drivers/video/nvidia.ko"
    assert "kernel/drivers/gpu/drm/drm.ko" in uvm  # nvidia's own dependency, from the kernel
    assert "alias pci:v000010DEd*sv*sd*bc03sc02i00* nvidia\n" in \
        ents[f"{base}/modules.alias"].data.decode()
    assert ents["usr/bin/nvidia-smi"].data.startswith(b"#!/usr/bin/python3 -IS")
    assert ents["usr/bin/python3"].data == b"python3.11"
    # the stand-ins' socket: frozen into the one executable (the partition service imports
    # it at module level) or a file
    assert ("usr/lib/python3.11/socket.pyc" in ents
            or b"socket\0" in ents["usr/bin/python3.11"].data)
    assert "usr/lib/firmware/nvidia/550.54.15/gsp_ga10x.bin" in ents
    assert b"nvidia-persistenced:x:120:120:" in ents["etc/passwd"].data
    man = json.loads((out / "manifest.json").read_text())
    rows = {r["path"]: r for r in man["files"]}
    assert rows["/usr/bin/nvidia-smi"]["package"] == "nvidia-driver"
    assert rows["/usr/bin/nvidia-smi"]["version"] == "550.54.15"
    assert rows[f"/{base}/kernel/drivers/video/nvidia.ko"]["package"] == "nvidia-driver"
    assert "pci=realloc" in (out / "cmdline.txt").read_text()


STANDINS = "usr/lib/guestinit/guestinit/testing/"


def test_a_production_image_has_no_stand_ins_and_one_that_asks_has_them(
        kernel_tree: KernelTree, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle", kernel_tree)
    prod = profile.load("nvidia-gpu")
    assert not prod.standins and not profile.load("nvidia-servicevm-kata").standins
    assert profile.load("cpu").standins and not profile.load("kata").standins
    build_image(prod, tmp_path / "prod", driver_dir=bundle, locked=True,
                progress=Progress(quiet=True), zstd_level=3)
    prod_files = {e.path for e in cpio.read(pack.decompress(tmp_path / "prod" / "initramfs.img"))}
    assert "usr/lib/guestinit/guestinit/pci.py" in prod_files  # the init itself is there
    assert not [p for p in prod_files if p.startswith(STANDINS)]
    # the VM tier's way: the same profile with --standins
    build_image(prod, tmp_path / "test", driver_dir=bundle, locked=True,
                progress=Progress(quiet=True), zstd_level=3, standins=True)
    ents = {e.path: e for e in cpio.read(pack.decompress(tmp_path / "test" / "initramfs.img"))}
    assert {f"{STANDINS}agent_standin.py", f"{STANDINS}fake_nvidia.py"} <= set(ents)
    # the stand-ins' own imports (socket, signal...) are in the stdlib closure
    # (a file, or frozen into the one executable: argparse)
    python = ents["usr/bin/python3.11"].data
    for module in ("socket", "signal", "contextlib", "argparse"):
        assert (f"usr/lib/python3.11/{module}.pyc" in ents
                or module.encode() + b"\0" in python), module  # the frozen table's name


def test_bundle_for_another_kernel_is_rejected(kernel_tree: KernelTree, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle", kernel_tree, release="6.1.0-1-amd64")
    with pytest.raises(BuildError, match=r"modules are built for 6\.1\.0-1-amd64"):
        build_image(profile.load("nvidia-gpu"), tmp_path / "out", driver_dir=bundle,
                    locked=True, progress=Progress(quiet=True), zstd_level=3)


def test_module_vermagic_mismatch_names_file(kernel_tree: KernelTree, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle", kernel_tree)
    uvm = bundle / "lib/modules" / kernel_tree.release / "kernel/drivers/video/nvidia-uvm.ko"
    fake_module(kernel_tree.modules / "kernel/lib/libcrc32c.ko", uvm,
                {"name": "nvidia_uvm", "depends": "nvidia", "vermagic": "5.15.0-1 SMP"}, tmp_path)
    with pytest.raises(BuildError, match=r"nvidia-uvm\.ko: built for 5\.15\.0-1"):
        build_image(profile.load("nvidia-gpu"), tmp_path / "out", driver_dir=bundle,
                    locked=True, progress=Progress(quiet=True), zstd_level=3)


def test_servicevm_needs_fabricmanager_and_gpu_needs_bundle(kernel_tree: KernelTree,
                                                            tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle", kernel_tree)
    (bundle / "usr/bin/nv-fabricmanager").unlink()
    with pytest.raises(BuildError, match="usr/bin/nv-fabricmanager is missing"):
        build_image(profile.load("nvidia-servicevm"), tmp_path / "out", driver_dir=bundle,
                    locked=True, progress=Progress(quiet=True), zstd_level=3)
    with pytest.raises(BuildError, match="pass --driver DIR"):
        build_image(profile.load("nvidia-gpu"), tmp_path / "out", locked=True,
                    progress=Progress(quiet=True))
    with pytest.raises(BuildError, match="takes no driver bundle"):
        build_image(profile.load("cpu"), tmp_path / "out", driver_dir=bundle, locked=True,
                    progress=Progress(quiet=True))
    shutil.rmtree(bundle)
