"""The erofs + dm-verity root, for kernels whose dm/verity/erofs/virtio-blk are modules.

With ``guestinit.verity.roothash=HEX`` on the cmdline the init in the initramfs
loads those modules, finds the data disk (erofs magic) and the hash disk
(veritysetup superblock), creates a read-only dm-verity device over them with
the device-mapper ioctls, mounts the erofs from it and switches root to it:
the mounts of the early stage move along, the initramfs root is replaced and the
boot goes on in the same process, now rooted in the verified tree (what it imports
from here on comes from there); with ``verity.reexec`` ``/sbin/init`` of the
verified tree (guestinit again) is exec'ed instead. Nothing from
the disk is trusted before verity checks it: the salt, sizes and algorithm
come from the hash disk, but a root hash that does not match them fails every
read, so a wrong superblock is refused like a flipped data byte.

A kernel with those drivers built in needs none of this: ``rootfs`` writes
``dm-mod.create=`` for it instead.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
import time

from guestinit.stages import BootError, Stage
from guestinit.sysfs import write_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from guestinit.boot import Boot
    from guestinit.config import Config

MODULES = ("virtio_blk", "dm_verity", "erofs")
DONE_MARKER = "run/guestinit/verity-root"  # written before the switch; the new init skips
NEW_ROOT = "sysroot"
ENV_SPANS = "GUESTINIT_SPANS"  # timeline of the initramfs init, handed to the verified one
DM_NAME = "vroot"
MS_MOVE = 8192
MS_RDONLY = 1

# veritysetup's on-disk superblock (block 0 of the hash device)
SUPERBLOCK = struct.Struct("<8sII16s32sIIQH6s256s")
SB_MAGIC = b"verity\0\0"
EROFS_MAGIC = 0xE0F5E1E2  # little-endian u32 at byte 1024 of an erofs image

# <linux/dm-ioctl.h>
DM_IOCTL_HEADER = struct.Struct("=3IIIIiIIIQ128s129s7s")  # struct dm_ioctl, 312 bytes
DM_TARGET_SPEC = struct.Struct("=QQiI16s")  # struct dm_target_spec, 40 bytes
DM_VERSION = (4, 0, 0)
DM_READONLY_FLAG = 1 << 0
DM_DEV_CREATE, DM_DEV_REMOVE, DM_DEV_SUSPEND, DM_TABLE_LOAD = 3, 4, 6, 9


class VerityError(Exception):
    pass


class Superblock:
    __slots__ = ("algorithm", "data_block_size", "data_blocks", "hash_block_size", "hash_type",
                 "salt")

    def __init__(self, raw: bytes) -> None:
        if len(raw) < SUPERBLOCK.size:
            raise VerityError(f"hash device superblock is {len(raw)} bytes, "
                              f"need {SUPERBLOCK.size}")
        (magic, version, self.hash_type, _uuid, alg, self.data_block_size,
         self.hash_block_size, self.data_blocks, salt_size, _pad,
         salt) = SUPERBLOCK.unpack_from(raw)
        if magic != SB_MAGIC:
            raise VerityError(f"no verity superblock (magic {magic!r})")
        if version != 1:
            raise VerityError(f"verity superblock version {version}, expected 1")
        if salt_size > len(salt):
            raise VerityError(f"verity salt size {salt_size} is over {len(salt)}")
        for name, size in (("data", self.data_block_size), ("hash", self.hash_block_size)):
            if size < 512 or size > 1 << 20 or size & (size - 1):
                raise VerityError(f"verity {name} block size {size} is not a power of two "
                                  "in 512..1M")
        self.algorithm = alg.rstrip(b"\0").decode("ascii", "replace")
        if not self.algorithm.replace("-", "").isalnum():
            raise VerityError(f"verity algorithm {self.algorithm!r} is not a hash name")
        self.salt = salt[:salt_size]


def table(sb: Superblock, data_dev: str, hash_dev: str, roothash: str) -> tuple[int, str]:
    """(length in sectors, verity target parameters) for the dm table."""
    sectors = sb.data_blocks * sb.data_block_size // 512
    # hash tree starts at hash block 1: block 0 holds the superblock
    params = (f"{sb.hash_type} {data_dev} {hash_dev} {sb.data_block_size} {sb.hash_block_size} "
              f"{sb.data_blocks} 1 {sb.algorithm} {roothash} {sb.salt.hex() or '-'}")
    return sectors, params


def check_roothash(text: str) -> str:
    value = text.strip().lower()
    if len(value) < 32 or len(value) % 2 or any(c not in "0123456789abcdef" for c in value):
        raise VerityError(f"guestinit.verity.roothash={text!r} is not a hex digest")
    return value


def dm_ioctl(name: str, flags: int = 0, payload: bytes = b"", targets: int = 0) -> bytearray:
    """A struct dm_ioctl buffer (header, then ``payload``) for the control device."""
    size = DM_IOCTL_HEADER.size + len(payload) + 1024  # room for the kernel's answer
    header = DM_IOCTL_HEADER.pack(*DM_VERSION, size, DM_IOCTL_HEADER.size, targets, 0, flags,
                                  0, 0, 0, name.encode(), b"", b"")
    buf = bytearray(size)
    buf[:len(header)] = header
    buf[len(header):len(header) + len(payload)] = payload
    return buf


def target_spec(sectors: int, ttype: str, params: str) -> bytes:
    text = params.encode() + b"\0"
    text += b"\0" * (-(DM_TARGET_SPEC.size + len(text)) % 8)
    # next: offset from this spec to the next one (the kernel ignores it for the last)
    return DM_TARGET_SPEC.pack(0, sectors, 0, DM_TARGET_SPEC.size + len(text),
                               ttype.encode()) + text


def _request(nr: int) -> int:
    # _IOWR(0xfd, nr, struct dm_ioctl)
    return (3 << 30) | (DM_IOCTL_HEADER.size << 16) | (0xFD << 8) | nr


def _call(control: int, nr: int, buf: bytearray, what: str) -> bytearray:
    import fcntl

    try:
        fcntl.ioctl(control, _request(nr), buf, True)
    except OSError as exc:
        raise VerityError(f"device-mapper {what}: {exc.strerror or exc}") from None
    return buf


def create(control: int, sectors: int, params: str, name: str = DM_NAME) -> tuple[int, int]:
    """Create, load and resume the read-only verity device ``name``; its (major, minor)."""
    _call(control, DM_DEV_CREATE, dm_ioctl(name, DM_READONLY_FLAG), "create")
    spec = target_spec(sectors, "verity", params)
    try:
        _call(control, DM_TABLE_LOAD,
              dm_ioctl(name, DM_READONLY_FLAG, spec, targets=1), "load verity table")
        out = _call(control, DM_DEV_SUSPEND, dm_ioctl(name, DM_READONLY_FLAG), "resume")
    except VerityError:
        remove(control, name)
        raise
    dev = DM_IOCTL_HEADER.unpack_from(out)[10]
    return os.major(dev), os.minor(dev)


def remove(control: int, name: str) -> None:
    """Remove the device-mapper device ``name``, quietly (a clean-up on a failure path)."""
    try:
        _call(control, DM_DEV_REMOVE, dm_ioctl(name), "remove")
    except VerityError:
        pass


def virtio_disks(root: str, want: int = 2, wait: float = 5.0) -> list[str]:
    """The vd* disks, waiting (bounded) until ``want`` of them have shown up."""
    deadline = time.monotonic() + wait
    while True:
        try:
            names = sorted(n for n in os.listdir(os.path.join(root, "sys/block"))
                           if n.startswith("vd"))
        except OSError:
            names = []
        if len(names) >= want or time.monotonic() > deadline:
            return names
        time.sleep(0.005)


def classify(root: str, wait: float = 5.0) -> tuple[str, str]:
    """(data disk, hash disk) among the virtio disks, by what their first blocks hold."""
    data = hashes = None
    seen = []
    for name in virtio_disks(root, wait=wait):
        path = os.path.join(root, "dev", name)
        head = _read_head(path)
        seen.append(name)
        if head.startswith(SB_MAGIC):
            hashes = path
        elif len(head) >= 1028 and struct.unpack_from("<I", head, 1024)[0] == EROFS_MAGIC:
            data = path
    if data is None or hashes is None:
        raise VerityError(f"need an erofs disk and a verity hash disk; virtio disks: "
                          f"{', '.join(seen) or 'none'}")
    return data, hashes


def _read_head(path: str, wait: float = 5.0) -> bytes:
    # devtmpfs creates the node a moment after the driver registered the disk
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(path, "rb", buffering=0) as f:
                return f.read(4096)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise VerityError(f"{path} did not appear within {wait:.0f}s") from None
            time.sleep(0.005)
        except OSError as exc:
            raise VerityError(f"read {path}: {exc.strerror or exc}") from None


def wanted(boot: Boot, cfg: Config) -> str | None:
    """The root hash when this init must set up the verity root, else None."""
    if boot.root != "/" or os.path.exists(boot.path(DONE_MARKER)):
        return None
    return cfg.str("verity.roothash") or None


def switch_to_verity_root(boot: Boot, roothash_text: str, cfg: Config) -> None:
    """Set up the verity root and switch to it; BootError if that fails. Returns rooted
    in the verified tree, or (``verity.reexec``) execs its init and never returns."""
    from guestinit import kmod

    try:
        roothash = check_roothash(roothash_text)
        with boot.timeline.stage("verity"):
            # the transport (virtio_mmio) first: the image's early modules, as configured
            kmod.load_early(boot, [*cfg.words("modules"), *MODULES])
            data, hashes = classify(boot.root)
            with open(hashes, "rb", buffering=0) as f:
                sb = Superblock(f.read(4096))
            sectors, params = table(sb, data, hashes, roothash)
            control = os.open(boot.path("dev/mapper/control"), os.O_RDWR | os.O_CLOEXEC)
            try:
                major, minor = create(control, sectors, params)
            finally:
                os.close(control)
            node = boot.path("dev/mapper", DM_NAME)
            if not os.path.exists(node):
                boot.effects.mknod(node, stat.S_IFBLK | 0o600, major, minor)
            new_root = boot.path(NEW_ROOT)
            boot.effects.makedirs(new_root)
            try:
                boot.effects.mount(node, new_root, "erofs", MS_RDONLY)
            except OSError as exc:
                raise VerityError(f"mount the verity root (erofs on {node}, from {data} "
                                  f"checked against {hashes}): {exc.strerror or exc}; "
                                  "a rootfs.erofs that does not match its root hash is "
                                  "refused here") from None
        boot.kmsg.log(6, f"verity root: {data} + {hashes}, root hash {roothash[:16]}...; "
                      "switching root")
        _switch_root(boot, new_root, cfg.bool("verity.reexec"))
    except VerityError as exc:
        raise BootError(Stage.EARLY, f"verity root: {exc}") from None
    except BootError as exc:  # the module loader's, named as this stage's
        raise BootError(Stage.EARLY, f"verity root: {exc.reason}") from None
    except OSError as exc:
        raise BootError(Stage.EARLY, f"verity root: {exc}") from None


def free_initramfs(top: str, keep: str) -> int:
    """Delete the initramfs's files, as switch_root does: once the verified root takes
    over they would hold their RAM (~20 MiB for the cpu image) for the life of the VM.
    Only entries on ``top``'s own filesystem, never below ``keep`` (the new root) or a
    mount point; the directories stay. Returns the bytes freed."""
    dev = os.lstat(top).st_dev
    freed = 0
    for dirpath, dirnames, filenames in os.walk(top):
        descend = []
        for name in dirnames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                os.unlink(path)  # bin -> usr/bin and the like: os.walk lists them here
            elif path != keep and st.st_dev == dev:
                descend.append(name)
        dirnames[:] = descend
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_dev == dev:
                os.unlink(path)
                freed += st.st_size
    return freed


def _switch_root(boot: Boot, new_root: str, reexec: bool) -> None:
    for sub in ("dev", "proc", "sys", "run", "tmp"):
        target = os.path.join(new_root, sub)
        if os.path.ismount(boot.path(sub)) and os.path.isdir(target):
            boot.effects.mount(boot.path(sub), target, "", MS_MOVE)
    try:
        freed = free_initramfs("/", new_root)
        boot.kmsg.log(6, f"verity root: initramfs files deleted ({freed >> 20} MiB freed)")
    except OSError as exc:  # what is left only costs memory
        boot.kmsg.log(4, f"verity root: initramfs not fully freed: {exc}")
    marker = os.path.join(new_root, DONE_MARKER)
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    write_text(marker, f"{time.clock_gettime_ns(time.CLOCK_BOOTTIME)}\n")
    os.chdir(new_root)
    boot.effects.mount(".", "/", "", MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    if not reexec:
        # Going on here saves a second interpreter start and every import again. The
        # code that runs so far came with the kernel (the initramfs); what is imported
        # from now on is read from the verified tree, the same build. The interpreter's
        # own files stay in RAM while mapped, so less is freed than counted above. Path
        # finders forget what they listed in the initramfs (importlib.invalidate_caches,
        # without importing importlib: not frozen into the init, docs/guest.md "Two start
        # phases"); on the init's core phase there are none yet.
        for finder in sys.meta_path:
            if hasattr(finder, "invalidate_caches"):
                finder.invalidate_caches()
        boot.kmsg.log(6, "verity root: switched; the boot goes on from the verified tree")
        return
    # the initramfs part of the boot, for the new init's timeline ("initramfs", "verity")
    spans = [["initramfs" if n == Stage.EARLY else n, s, e]
             for n, s, e in boot.timeline.snapshot()]
    env = {"PATH": "/usr/sbin:/usr/bin", ENV_SPANS: ";".join(f"{n}:{s}:{e}" for n, s, e in spans)}
    boot.kmsg.close()
    os.execve("/sbin/init", ["/sbin/init"], env)


def inherited_spans(environ: dict[str, str] | os._Environ[str]) -> list[tuple[str, int, int]]:
    """The spans a switching initramfs init handed over (malformed entries dropped)."""
    out = []
    for item in environ.get(ENV_SPANS, "").split(";"):
        name, _, rest = item.partition(":")
        start, _, end = rest.partition(":")
        if name and start.isdigit() and end.isdigit() and int(start) <= int(end):
            out.append((name[:64], int(start), int(end)))
    return out
