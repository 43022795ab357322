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


PVH_NOTE = """\
.section .note.Xen, "a", @note
.balign 4
.long 4
.long 4
.long {type}
.asciz "Xen"
.balign 4
.long 0x1000120
.text
.globl _start
_start: ret
"""


def _elf(path: Path, note_type: int) -> Path:
    """A real ELF (GNU as + ld) whose PT_NOTE holds a Xen note of ``note_type``."""
    import subprocess

    src = path.with_suffix(".s")
    src.write_text(PVH_NOTE.format(type=note_type))
    subprocess.run(["as", "-o", str(path.with_suffix(".o")), str(src)], check=True)
    subprocess.run(["ld", "-o", str(path), str(path.with_suffix(".o"))], check=True)
    return path


def test_pvh_entry_is_read_from_the_xen_note(tmp_path: Path) -> None:
    assert image.pvh_entry(str(_elf(tmp_path / "pvh", 18))) == 0x1000120
    assert image.pvh_entry(str(_elf(tmp_path / "other", 17))) is None  # another Xen note
    (tmp_path / "text").write_text("not an ELF")
    assert image.pvh_entry(str(tmp_path / "text")) is None
    assert image.pvh_entry(str(tmp_path / "missing")) is None


def test_a_pvh_vmlinux_is_preferred_and_entry_can_be_forced(tmp_path: Path) -> None:
    d = tmp_path / "img"
    _make(d, "vmlinuz", "initramfs.img", "cmdline.txt")
    assert image.load(str(d)).entry == "bzimage"
    with pytest.raises(image.ImageError, match=r"no vmlinux with a PVH entry note"):
        image.load(str(d), entry="pvh")
    _elf(d / "vmlinux", 17)  # an ELF without the PVH note is not entered directly
    assert image.load(str(d)).kernel == str(d / "vmlinuz")
    _elf(d / "vmlinux", 18)
    img = image.load(str(d))
    assert (img.kernel, img.entry) == (str(d / "vmlinux"), "pvh")
    forced = image.load(str(d), entry="bzimage")
    assert (forced.kernel, forced.entry) == (str(d / "vmlinuz"), "bzimage")
    with pytest.raises(ValueError, match="use auto, pvh or bzimage"):
        image.load(str(d), entry="elf")
