from __future__ import annotations

from pathlib import Path

import pytest

from bench import image


def _make(d: Path, *names: str) -> None:
    d.mkdir(exist_ok=True)
    for name in names:
        (d / name).write_text("console=ttyS0\n  quiet\n" if name == "cmdline.txt" else "x")


def test_missing_directory_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(image.ImageError, match=r"does not exist.*guestinit-build image cpu"):
        image.load(str(tmp_path / "nope"))


def test_missing_file_is_named(tmp_path: Path) -> None:
    _make(tmp_path / "img", "vmlinuz", "cmdline.txt")
    with pytest.raises(image.ImageError, match=r"initramfs\.img is missing"):
        image.load(str(tmp_path / "img"))


def test_initramfs_boot_has_no_disks_and_a_normalised_cmdline(tmp_path: Path) -> None:
    _make(tmp_path / "img", "vmlinuz", "initramfs.img", "cmdline.txt")
    img = image.load(str(tmp_path / "img"))
    assert img.cmdline == "console=ttyS0 quiet"
    assert img.disks == []
    assert img.initramfs == str(tmp_path / "img" / "initramfs.img")


def test_erofs_boot_needs_disk_hash_tree_and_roothash(tmp_path: Path) -> None:
    d = tmp_path / "img"
    _make(d, "vmlinuz", "initramfs.img", "cmdline.txt", "rootfs.erofs")
    with pytest.raises(image.ImageError, match=r"rootfs\.verity is missing"):
        image.load(str(d), erofs=True)
    _make(d, "rootfs.verity")
    (d / "roothash.txt").write_text("not-hex\n")
    with pytest.raises(image.ImageError, match=r"roothash\.txt holds 'not-hex'"):
        image.load(str(d), erofs=True)
    (d / "roothash.txt").write_text("AB" * 32 + "\n")
    with pytest.raises(image.ImageError, match=r"cmdline-erofs\.txt is missing"):
        image.load(str(d), erofs=True)
    other = f'dm-mod.create="v,,,ro,0 8 verity {"cd" * 32}"'
    (d / "cmdline-erofs.txt").write_text(f"root=/dev/dm-0 {other}")
    with pytest.raises(image.ImageError, match="does not pin the root hash"):
        image.load(str(d), erofs=True)
    table = f'dm-mod.create="v,,,ro,0 8 verity {"ab" * 32}"'
    (d / "cmdline-erofs.txt").write_text(f"console=ttyS0  {table} root=/dev/dm-0\n")
    img = image.load(str(d), erofs=True)
    assert img.disks == [str(d / "rootfs.erofs"), str(d / "rootfs.verity")]
    assert img.initramfs is None  # the kernel mounts the verity root; no initramfs
    assert img.cmdline == f"console=ttyS0 {table} root=/dev/dm-0"
    # Without root= an initramfs sets up the verity root, so it goes along.
    (d / "cmdline-erofs.txt").write_text(f"guestinit.root=verity:{'ab' * 32}\n")
    assert image.load(str(d), erofs=True).initramfs == str(d / "initramfs.img")
