"""Packing the assembled tree into the profile's formats: the initramfs, erofs with its
dm-verity tree, and Kata's disk and drop-ins (with the driver bundle moved into an
extension image when asked). ``build.py`` assembles the tree; this writes the images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rootfs import extension, kata, pack, profile
from rootfs.closure import Origin, Tree
from rootfs.steps import Progress


@dataclass(frozen=True)
class Options:
    compression: str
    zstd_level: int
    kata_prefix: str
    extension_name: str | None  # the driver bundle goes into this Kata extension image


def pack_all(tree: Tree, out: Path, staging: Path, formats: tuple[profile.Format, ...],
             prof: profile.Profile, epoch: int, progress: Progress, opts: Options,
             bundle: Origin | None) -> tuple[dict[str, Path], str | None, list[str]]:
    """Every image of ``formats`` in ``out``; (outputs by name, the erofs root hash, the
    image paths that went into the extension image instead of the base)."""
    outputs: dict[str, Path] = {}
    ext_root, moved = staging.parent / f"{staging.name}.ext", list[str]()
    if opts.extension_name is not None:  # the bundle's files go to the extension image
        assert bundle is not None
        moved = extension.split(tree, bundle, ext_root)
    roothash = None
    try:
        if {profile.Format.INITRAMFS, profile.Format.KATA_INITRD} & set(formats):
            with progress.step(f"pack initramfs (cpio newc + {opts.compression})"):
                outputs["initramfs.img"] = pack.initramfs(tree.root, out, epoch,
                                                          opts.zstd_level, opts.compression)
        if profile.Format.EROFS in formats:
            with progress.step("pack erofs + dm-verity"):
                roothash = pack.erofs_verity(tree.root, out, epoch, prof.name)
                outputs.update({n: out / n for n in ("rootfs.erofs", "rootfs.verity",
                                                      "roothash.txt", "cmdline-erofs.txt")})
        if {profile.Format.KATA, profile.Format.KATA_INITRD} & set(formats):
            with progress.step("Kata's disk (msdos: p1 erofs, p2 verity) and drop-ins"):
                outputs.update(_kata(tree, out, staging, formats, prof, epoch, opts,
                                     ext_root, outputs.get("initramfs.img")))
    finally:
        if moved:
            extension.restore(tree, ext_root, moved)
    return outputs, roothash, moved


def _kata(tree: Tree, out: Path, staging: Path, formats: tuple[profile.Format, ...],
          prof: profile.Profile, epoch: int, opts: Options, ext_root: Path,
          initramfs: Path | None) -> dict[str, Path]:
    outputs: dict[str, Path] = {}
    erofs = None
    if profile.Format.KATA in formats:
        erofs = out / "rootfs.erofs"
        if profile.Format.EROFS not in formats:
            erofs = pack.mkfs_erofs(tree.root, staging.parent / (staging.name + ".erofs"),
                                    epoch, prof.name)
    rd = initramfs if profile.Format.KATA_INITRD in formats else None
    extra_toml = ""
    try:
        if opts.extension_name is not None:
            ext, files = extension.write(ext_root, out, opts.extension_name, epoch,
                                         opts.kata_prefix, prof.name)
            outputs.update(files)
            extra_toml = extension.render([ext])
        outputs.update(kata.write_outputs(out, erofs, rd, prof.name, opts.kata_prefix,
                                          prof.kernel.kata_params, extra_toml))
    finally:
        if erofs is not None and erofs.parent != out:
            erofs.unlink(missing_ok=True)
    return outputs
