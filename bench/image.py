"""An image directory (``guestinit-build image PROFILE --out DIR``) as the harness sees it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

KERNEL = "vmlinuz"
PVH_KERNEL = "vmlinux"  # built kernels only: the uncompressed ELF, entered at its PVH note
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the note that marks a PVH entry point (name "Xen")
INITRAMFS = "initramfs.img"
EROFS = "rootfs.erofs"
VERITY = "rootfs.verity"
ROOTHASH = "roothash.txt"
CMDLINE = "cmdline.txt"
# The whole cmdline for an erofs boot: dm-mod.create with the verity table, root=/dev/dm-0.
CMDLINE_EROFS = "cmdline-erofs.txt"

_HEX = re.compile(r"^[0-9a-f]{64,128}$")


class ImageError(ValueError):
    """The image directory is missing a file or holds a bad one; says how to fix it."""


@dataclass(frozen=True)
class Image:
    directory: str
    kernel: str  # vmlinux when it has a PVH entry (no decompression, no real mode), else vmlinuz
    initramfs: str | None  # None for an erofs boot: the kernel mounts the verity root itself
    cmdline: str  # cmdline.txt (or cmdline-erofs.txt), one line, whitespace-normalised
    erofs: str | None = None  # set for --erofs boots: the erofs image ...
    verity: str | None = None  # ... its dm-verity hash tree ...
    roothash: str | None = None  # ... and the root hash that pins it (also in the cmdline)
    entry: str = "bzimage"  # how QEMU enters the kernel: bzimage (16-bit setup) or pvh
    machine: str = "microvm"  # or "kata": q35 + OVMF, the cmdline from configuration.toml
    kata_disk: str | None = None  # Kata's kata-containers.img (p1 erofs, p2 verity)
    extensions: tuple[tuple[str, str], ...] = ()  # Kata extension images: (name, disk)

    @property
    def disks(self) -> list[str]:
        """Block devices in attach order: vda = erofs, vdb = verity hash tree (microvm);
        Kata's one disk with both partitions (kata)."""
        if self.kata_disk is not None:
            return [self.kata_disk]
        return [p for p in (self.erofs, self.verity) if p is not None]


def _need(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise ImageError(
            f"image {directory}: {name} is missing; build the image first "
            f"(guestinit-build image cpu --out {directory})"
        )
    return path


def _one_line(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return " ".join(fh.read().split())


def pvh_entry(path: str) -> int | None:
    """The PVH entry address ``path``'s ELF notes give (XEN_ELFNOTE_PHYS32_ENTRY), or None
    when ``path`` is no ELF or has no such note (then a VMM cannot enter it directly)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            for seg in elf.iter_segments("PT_NOTE"):
                for note in seg.iter_notes():  # type: ignore[attr-defined]
                    if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                        desc = note["n_desc"]
                        raw = desc if isinstance(desc, bytes) else desc.encode("latin-1")
                        return int.from_bytes(raw[:4].ljust(4, b"\0"), "little")
    except (OSError, ELFError):
        return None
    return None


def pick_kernel(directory: str, entry: str = "auto") -> tuple[str, str]:
    """(kernel path, entry): ``vmlinux`` when present with a PVH note (``entry`` auto or
    pvh), else ``vmlinuz``. ``entry="pvh"`` without a PVH vmlinux is an ImageError."""
    if entry not in ("auto", "pvh", "bzimage"):
        raise ValueError(f"kernel entry {entry!r}: use auto, pvh or bzimage")
    elf = os.path.join(directory, PVH_KERNEL)
    if entry != "bzimage" and os.path.isfile(elf) and pvh_entry(elf) is not None:
        return elf, "pvh"
    if entry == "pvh":
        raise ImageError(f"image {directory}: no {PVH_KERNEL} with a PVH entry note; only "
                         "kernels built by ./build.sh kernel (profile cpu-tuned) have one")
    return _need(directory, KERNEL), "bzimage"


def load(directory: str, *, erofs: bool = False, entry: str = "auto",
         profile: str = "cpu") -> Image:
    """Find the files a boot needs in ``directory``; raise ImageError naming what is missing
    (and the ``profile`` that builds it). ``entry`` picks how the kernel is entered
    (``pick_kernel``)."""
    if not os.path.isdir(directory):
        raise ImageError(
            f"image directory {directory} does not exist; build it with "
            f"guestinit-build image {profile} --out {directory}"
        )
    kernel, how = pick_kernel(directory, entry)
    if not erofs:
        initramfs = _need(directory, INITRAMFS)
        return Image(directory, kernel, initramfs, _one_line(_need(directory, CMDLINE)),
                     entry=how)
    disk = _need(directory, EROFS)
    verity = _need(directory, VERITY)
    roothash = _one_line(_need(directory, ROOTHASH)).lower()
    if not _HEX.match(roothash):
        raise ImageError(
            f"image {directory}: {ROOTHASH} holds {roothash[:80]!r}, not a hex root hash; "
            "rebuild the image"
        )
    erofs_cmdline = _one_line(_need(directory, CMDLINE_EROFS))
    if roothash not in erofs_cmdline:
        raise ImageError(
            f"image {directory}: {CMDLINE_EROFS} does not pin the root hash in {ROOTHASH} "
            f"({roothash[:16]}...); the files come from different builds, rebuild the image"
        )
    # With root= the kernel mounts the verity root itself (dm-mod.create); without it an
    # initramfs does (loads virtio_blk/dm-verity/erofs, then switches root), so pass it.
    has_root = any(w.startswith("root=") for w in erofs_cmdline.split())
    rd = None if has_root else _need(directory, INITRAMFS)
    return Image(directory, kernel, rd, erofs_cmdline, disk, verity, roothash, how)


def load_kata(directory: str, *, initrd: bool = False, disk: str | None = None,
              max_vcpus: int = 1, debug: bool = False,
              extensions: dict[str, str] | None = None) -> Image:
    """The image as Kata boots it: ``configuration.toml`` (``image =``, the verity disk) or,
    with ``initrd``, ``configuration-initrd.toml``; the cmdline is the one Kata's runtime
    would write for it (bench.kata), with the configuration's extension images attached.
    ``disk`` boots another copy of the disk and ``extensions`` other copies of extension
    disks by name (tampered ones in the tests)."""
    from bench import kata
    from rootfs import kata as layout
    from rootfs.steps import BuildError

    if not os.path.isdir(directory):
        raise ImageError(f"image directory {directory} does not exist; build it with "
                         f"guestinit-build image {os.path.basename(directory.rstrip('/'))} "
                         f"--out {directory} (a profile in Kata's format: kata, "
                         "nvidia-gpu-kata, ...)")
    name = layout.CONFIGURATION_INITRD if initrd else layout.CONFIGURATION
    try:
        drop = layout.read_configuration(Path(_need(directory, name)))
    except BuildError as exc:
        raise ImageError(f"image {directory}: {exc}") from None
    rt = kata.Runtime(image=drop.image is not None, rootfs_type=drop.rootfs_type,
                      disable_image_nvdimm=drop.disable_image_nvdimm,
                      kernel_verity_params=drop.kernel_verity_params,
                      kernel_params=drop.kernel_params, max_vcpus=max_vcpus, debug=debug,
                      extensions=tuple((n, v) for n, _p, v in drop.extensions))
    extension_disks = tuple((n, (extensions or {}).get(n) or _need(directory,
                                                                    os.path.basename(p)))
                            for n, p, _v in drop.extensions)
    try:
        cmdline = kata.kernel_parameters(rt)
    except kata.KataConfigError as exc:
        raise ImageError(f"image {directory}: {name}: {exc}") from None
    kernel = _need(directory, os.path.basename(drop.kernel))
    if initrd:
        rd = _need(directory, os.path.basename(drop.initrd or INITRAMFS))
        return Image(directory, kernel, rd, cmdline, machine="kata", extensions=extension_disks)
    image_disk = disk or _need(directory, os.path.basename(drop.image or layout.DISK))
    return Image(directory, kernel, None, cmdline, machine="kata", kata_disk=image_disk,
                 extensions=extension_disks)


# Words of an erofs boot's cmdline that mount the verity root (rootfs/pack.py writes them):
# a replaced cmdline keeps them, or the kernel would boot without its root.
ROOT_KEYS = ("dm-mod.create", "root", "rootfstype", "rootflags", "rootwait", "ro", "init",
             "guestinit.verity.roothash")
_WORD = re.compile(r'(?:[^\s"]+|"[^"]*")+')


def kernel_words(text: str) -> list[str]:
    """The parameters of a kernel cmdline; ``a="b c"`` is one parameter, as the kernel reads it."""
    return _WORD.findall(text)


def replace_cmdline(image: Image, words: str) -> str:
    """``words`` instead of the image's cmdline; for an erofs boot, plus the image's root words."""
    if image.erofs is None:
        return " ".join(kernel_words(words))
    root = [w for w in kernel_words(image.cmdline) if w.split("=", 1)[0] in ROOT_KEYS]
    given = kernel_words(words)
    return " ".join([*given, *(w for w in root if w not in given)])
