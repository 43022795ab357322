"""An image directory (``guestinit-build image PROFILE --out DIR``) as the harness sees it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

KERNEL = "vmlinuz"
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
    kernel: str
    initramfs: str | None  # None for an erofs boot: the kernel mounts the verity root itself
    cmdline: str  # cmdline.txt (or cmdline-erofs.txt), one line, whitespace-normalised
    erofs: str | None = None  # set for --erofs boots: the erofs image ...
    verity: str | None = None  # ... its dm-verity hash tree ...
    roothash: str | None = None  # ... and the root hash that pins it (also in the cmdline)

    @property
    def disks(self) -> list[str]:
        """Block devices in attach order: vda = erofs, vdb = verity hash tree."""
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


def load(directory: str, *, erofs: bool = False) -> Image:
    """Find the files a boot needs in ``directory``; raise ImageError naming what is missing."""
    if not os.path.isdir(directory):
        raise ImageError(
            f"image directory {directory} does not exist; build it with "
            f"guestinit-build image cpu --out {directory}"
        )
    kernel = _need(directory, KERNEL)
    if not erofs:
        initramfs = _need(directory, INITRAMFS)
        return Image(directory, kernel, initramfs, _one_line(_need(directory, CMDLINE)))
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
    return Image(directory, kernel, rd, erofs_cmdline, disk, verity, roothash)
