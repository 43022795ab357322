"""Composable Kata images: the driver bundle in an extension image beside the base image.

Kata's runtime-rs NVIDIA classes boot a base image plus verity-protected extension
images (``[[hypervisor.qemu.guest_extension_images]]`` with ``name``, ``path`` and
``verity_params`` in ``configuration-qemu-nvidia-gpu-runtime-rs.toml.in``; the Go
runtime reads the same table, ``src/runtime/pkg/katautils/config.go``). Each is attached
read-only as a virtio-blk disk with serial ``extension-<name>`` (``qemu.go``) and named
on the cmdline as ``kata.extension.<name>.verity_params=...``; the disk has Kata's
layout (p1 erofs, p2 hash tree without superblock: ``image_builder.sh`` with
``SKIP_DAX_HEADER=yes``, as ``rootfs/kata.py`` writes it). The gpu extension carries the
driver stack; the guest mounts it under /run/kata-extensions/<name>
(``src/agent/kata-extension-mount.sh``); guestinit then lays its ``usr`` over /usr
(guestinit/extensions.py), so every stage finds the driver where the base image would
have had it.

``guestinit-build image PROFILE --driver DIR --extension gpu`` builds the image as one
tree, then moves every file that came from the driver bundle into the extension's tree
before packing (the base keeps its users, config and the generated modules.dep, which
names the bundle's modules by their /usr paths) and puts them back for the manifest and
SBOM, which describe everything that ships.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from rootfs import kata, pack
from rootfs.closure import Origin, Tree
from rootfs.steps import BuildError

NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # config.go isValidExtensionName


@dataclass(frozen=True)
class Extension:
    name: str
    path: str  # where the Kata host has the image (the drop-in's path =)
    verity_params: str


def disk_name(name: str) -> str:
    return f"extension-{name}.img"


def root_hash_name(name: str) -> str:
    return f"root_hash_extension-{name}.txt"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise BuildError(f"--extension {name!r}: only ASCII letters, digits, '-' and '_' "
                         "(the name is a virtio-blk serial and a cmdline key in Kata)")
    return name


def split(tree: Tree, origin: Origin, ext_root: Path) -> list[str]:
    """Move every file of ``origin`` out of ``tree`` into ``ext_root`` (same paths);
    the image paths moved."""
    moved = sorted(path for path, o in tree.origins.items() if o == origin
                   and tree.host(path).is_file())
    if not moved:
        raise BuildError(f"--extension: the driver bundle {origin.package} put no file in "
                         "the image; there is nothing to move into an extension")
    for path in moved:
        dst = ext_root / path.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tree.host(path).rename(dst)
    return moved


def restore(tree: Tree, ext_root: Path, moved: list[str]) -> None:
    """Put the moved files back (the manifest and SBOM list all that ships)."""
    for path in moved:
        src = ext_root / path.lstrip("/")
        if src.exists():
            src.rename(tree.host(path))
    shutil.rmtree(ext_root, ignore_errors=True)


def write(ext_root: Path, out: Path, name: str, epoch: int, prefix: str,
          profile: str) -> tuple[Extension, dict[str, Path]]:
    """The extension's disk and its verity parameters in ``out``."""
    erofs = pack.mkfs_erofs(ext_root, out / f".extension-{name}.erofs", epoch,
                            f"extension {name}")
    try:
        params = kata.write_checked_disk(erofs, out / disk_name(name), out / root_hash_name(name))
    finally:
        erofs.unlink(missing_ok=True)
    ext = Extension(name, f"{prefix.rstrip('/')}/{profile}/{disk_name(name)}",
                    params.format())
    return ext, {n: out / n for n in (disk_name(name), root_hash_name(name))}


def render(extensions: list[Extension]) -> str:
    """The ``[[hypervisor.qemu.guest_extension_images]]`` entries of the drop-in."""
    out = []
    for ext in extensions:
        out += ["", "[[hypervisor.qemu.guest_extension_images]]",
                f"name = {kata.toml_str(ext.name)}", f"path = {kata.toml_str(ext.path)}",
                f"verity_params = {kata.toml_str(ext.verity_params)}"]
    return "\n".join(out) + ("\n" if out else "")
