"""Packing the staging tree: pyc compilation, initramfs (cpio + lz4/zstd), erofs + dm-verity."""

from __future__ import annotations

import io
import os
import stat
import sys
from pathlib import Path

from rootfs import cpio
from rootfs.steps import BuildError, run

ZSTD_LEVEL = 19  # ~13 s for the cpu image on one core; level 12: ~1.3 s, +17% size
# How the initramfs is compressed. The guest kernel unpacks it before it runs /init, and
# under TCG that is most of the difference between inits: for the cpu image (21 MB) the
# kernel ran /init at 1.30 s with zstd -19, 1.17 s with zstd -1, 1.05 s with lz4 and
# 1.05 s uncompressed (3 runs each, one suite run). lz4 is the default: as fast to boot
# as none at less than half the size. The kernel reads lz4's legacy format only (-l).
COMPRESSION = ("lz4", "zstd", "none")
DEFAULT_COMPRESSION = "lz4"
_MAGIC = {b"\x28\xb5\x2f\xfd": "zstd", b"\x02\x21\x4c\x18": "lz4", b"0707": "none"}
# dm-verity parameters: fixed salt and UUIDs make the hash tree reproducible.
VERITY_SALT = "0" * 64
VERITY_UUID = "7f1f0d5c-6a53-4b39-9b0e-67756573746e"
EROFS_UUID = "2b7f3c8e-3d0a-4a52-8e1c-67756573746e"
# Device nodes the init needs before it mounts devtmpfs: the console for stdio, and
# urandom because Python reads it for its hash seed when getrandom() would still block.
SPECIAL_NODES = (cpio.Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
                 cpio.Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
                 cpio.Entry("dev/random", stat.S_IFCHR | 0o666, rdev=(1, 8)),
                 cpio.Entry("dev/urandom", stat.S_IFCHR | 0o666, rdev=(1, 9)))

_COMPILE = """
import os, py_compile, sys
root, sourceless = sys.argv[1], sys.argv[2] == "1"
for src in sys.stdin.read().split("\\0"):
    if src:
        py_compile.compile(src, cfile=src + "c" if sourceless else None,
                           dfile="/" + src[len(root):].lstrip("/"), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        if sourceless:
            os.unlink(src)
"""


def compile_pycs(root: Path, sources: list[str], sourceless: bool = False) -> None:
    """Byte-compile in one child with a fixed hash seed (marshal output is then stable).

    ``sourceless``: write ``x.pyc`` next to ``x.py`` and drop the source (Python imports
    such legacy pycs when there is no source); otherwise ``__pycache__/x.cpython-311.pyc``.
    """
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": ""}
    env.pop("PYTHONPYCACHEPREFIX", None)
    run([sys.executable, "-I", "-c", _COMPILE, str(root), "1" if sourceless else "0"], env=env,
        stdin="\0".join(sources).encode(), what="byte-compile python")


def cpio_bytes(root: Path, epoch: int) -> bytes:
    entries = cpio.entries_from_dir(root)
    have = {e.path for e in entries}
    entries += [e for e in SPECIAL_NODES if e.path not in have]
    buf = io.BytesIO()
    cpio.write(buf, entries, epoch)
    return buf.getvalue()


def initramfs(root: Path, out: Path, epoch: int, level: int = ZSTD_LEVEL,
              compression: str = DEFAULT_COMPRESSION) -> Path:
    target = out / "initramfs.img"
    data = cpio_bytes(root, epoch)
    if compression == "zstd":
        data = run(["zstd", "-q", f"-{level}", "-T1", "--no-progress", "-c"], stdin=data,
                   what="compress initramfs (zstd)")
    elif compression == "lz4":
        data = run(["lz4", "-l", "-9", "-q", "-c"], stdin=data, what="compress initramfs (lz4)")
    elif compression != "none":
        raise BuildError(f"initramfs compression {compression!r}: use one of "
                         f"{', '.join(COMPRESSION)}")
    target.write_bytes(data)
    return target


def mkfs_erofs(root: Path, image: Path, epoch: int, name: str) -> Path:
    run(["mkfs.erofs", "--quiet", "-x-1", f"-T{epoch}", f"-U{EROFS_UUID}", "--all-root", "-zlz4hc",
         image, root], what=f"mkfs.erofs for {name}")
    return image


def erofs_verity(root: Path, out: Path, epoch: int, name: str) -> str:
    image, hashes = mkfs_erofs(root, out / "rootfs.erofs", epoch, name), out / "rootfs.verity"
    text = run(["veritysetup", "format", image, hashes, f"--salt={VERITY_SALT}",
                f"--uuid={VERITY_UUID}"], what=f"veritysetup format for {name}").decode()
    roothash = verity_field(text, "Root hash")
    (out / "roothash.txt").write_text(roothash + "\n")
    return roothash


def verity_field(text: str, key: str) -> str:
    """A field of ``veritysetup format``'s output (``Data blocks: 12 [...]``: 12)."""
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k.strip() == key:
            return v.split("[", 1)[0].strip()
    raise BuildError(f"veritysetup: no '{key}' in its output: {text[:300]!r}")


# Kernel options that let the kernel itself mount the verity root (dm-mod.create, root=).
VERITY_BUILTIN = ("CONFIG_BLK_DEV_DM", "CONFIG_DM_VERITY", "CONFIG_EROFS_FS", "CONFIG_VIRTIO_BLK")
ROOTHASH_KEY = "guestinit.verity.roothash"


def write_erofs_cmdline(out: Path, words: list[str], roothash: str, builtin: bool) -> str:
    """The cmdline for booting ``rootfs.erofs`` (vda) under dm-verity (hash tree on vdb).

    ``builtin`` (dm-mod, dm-verity, erofs and virtio-blk are ``=y``): the kernel mounts
    the root itself from ``dm-mod.create`` (which exists only in a built-in dm-mod), no
    initramfs needed. Otherwise (Debian's kernel: all four are modules) the initramfs
    must load them and set up verity, so the cmdline carries only the root hash, as
    ``guestinit.verity.roothash=``; salt, block sizes and algorithm are in the hash
    tree's superblock.
    """
    if builtin:
        size = (out / "rootfs.erofs").stat().st_size
        sectors, blocks = size // 512, size // 4096
        # hash_start_block 1: veritysetup format puts its superblock in block 0
        table = (f"vroot,,,ro,0 {sectors} verity 1 /dev/vda /dev/vdb 4096 4096 {blocks} 1 "
                 f"sha256 {roothash} {VERITY_SALT}")
        parts = [*words, f'dm-mod.create="{table}"', "root=/dev/dm-0", "rootfstype=erofs",
                 "ro", "init=/usr/sbin/init"]
    else:
        parts = [*words, f"{ROOTHASH_KEY}={roothash}"]
    text = " ".join(parts) + "\n"
    (out / "cmdline-erofs.txt").write_text(text)
    return text


def verity_verify(out: Path, roothash: str) -> None:
    run(["veritysetup", "verify", out / "rootfs.erofs", out / "rootfs.verity", roothash],
        what="veritysetup verify (rootfs.erofs against rootfs.verity and roothash.txt)")


def compression_of(path: Path) -> str:
    """``lz4``, ``zstd`` or ``none``, from the file's magic; BuildError for anything else."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    raise BuildError(f"{path}: not an initramfs this builder writes (magic {head.hex()})")


def decompress(path: Path) -> bytes:
    kind = compression_of(path)
    if kind == "none":
        return path.read_bytes()
    tool = ["zstd", "-q", "-d", "-c"] if kind == "zstd" else ["lz4", "-d", "-q", "-c"]
    return run([*tool, path], what=f"decompress {path.name} ({kind})")
