"""The extensions stage: Kata's extension images, mounted fail-closed before ``modules``.

Kata's runtime attaches each ``[[hypervisor.qemu.guest_extension_images]]`` entry as a
read-only virtio-blk disk whose serial is ``extension-<name>`` and names it on the
cmdline as ``kata.extension.<name>.verity_params=...`` (kata-containers @7c6ba40c54:
``src/runtime/virtcontainers/qemu.go``; Kata's own guest does this in
``src/agent/kata-extension-mount.sh``, whose rules are followed here). The disk has p1
(erofs) and, when measured, p2 (the hash tree, no superblock):

- hash partition and verity params: a dm-verity device ``extension-<name>`` checks p1;
- hash partition, no params: refused (verity stripped from the cmdline);
- params, no hash partition: refused (nothing to verify against);
- neither: p1 mounted as it is (an unmeasured extension).

Each is mounted read-only at /run/kata-extensions/<name>; then the ``usr`` of every
extension that has one is laid over /usr (a read-only overlay, the first extension
named on top), so the loader, the device nodes, the daemons and the CDI spec find a
driver bundle from the gpu extension where the base image would have had it. Any
failure fails the boot naming the extension; nothing is left half-mounted.
"""

from __future__ import annotations

import os
import stat
import time

from guestinit.effects import MS_RDONLY
from guestinit.stages import BootError, Stage
from guestinit.sysfs import find_named, read_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from guestinit.boot import Boot

PREFIX, SUFFIX = "kata.extension.", ".verity_params"
MOUNT_DIR = "run/kata-extensions"
DISK_WAIT = 5.0  # s for an extension's disk to show up (built-in virtio-blk: at once)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def wanted(cmdline: str) -> list[tuple[str, str]]:
    """(name, verity params) of every extension the cmdline names, in order; a name
    given twice takes its last value, as the kernel does. ValueError for a bad name."""
    from guestinit.config import cmdline_words

    found: dict[str, str] = {}
    for word in cmdline_words(cmdline):
        key, _, value = word.partition("=")
        if key.startswith(PREFIX) and key.endswith(SUFFIX) and len(key) > len(PREFIX + SUFFIX):
            name = key[len(PREFIX):-len(SUFFIX)]
            if not set(name) <= _NAME_CHARS:
                raise ValueError(f"{key}: an extension name has only letters, digits, - and _")
            found.pop(name, None)
            found[name] = value.strip('"')
    return list(found.items())


def verity_fields(text: str) -> dict[str, str]:
    """``root_hash=H,salt=S,data_blocks=N,...`` as a map; ValueError naming what is off."""
    fields = {}
    for item in text.split(","):
        item = item.strip()
        if item:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"verity params entry {item!r} has no '='")
            fields[key] = value
    for key in ("root_hash", "salt", "data_blocks"):
        if not fields.get(key):
            raise ValueError(f"verity params have no {key}")
    for key in ("data_blocks", "data_block_size", "hash_block_size"):
        if not fields.setdefault(key, "4096").isdigit():
            raise ValueError(f"verity params {key}={fields[key]!r} is not a number")
    return fields


def find_disk(root: str, name: str, wait: float | None = None) -> str | None:
    """The block device (``vdb``) whose virtio serial is ``extension-<name>``, waiting up
    to ``wait`` (default DISK_WAIT) seconds for it (a partition has no serial)."""
    deadline = time.monotonic() + (DISK_WAIT if wait is None else wait)
    while (disk := find_named(root, "block", f"extension-{name}", "serial")) is None:
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)
    return disk


def partition(root: str, disk: str, number: int) -> tuple[str, str] | None:
    """(name, ``major:minor``) of partition ``number`` of ``disk`` (vdb1, nvme0n1p1)."""
    part = f"{disk}{'p' if disk[-1].isdigit() else ''}{number}"
    dev = read_text(os.path.join(root, "sys/class/block", part, "dev"), (OSError,))
    return None if dev is None else (part, dev.strip())


def plan_table(data: str, hashes: str, fields: dict[str, str]) -> tuple[int, str]:
    """(sectors, dm-verity table) for p1 checked against p2, as Kata's cmdline sets up its
    root (hypervisor.go GetKernelRootParams): hash start 0, no superblock, sha256."""
    blocks, dbs = int(fields["data_blocks"]), int(fields["data_block_size"])
    return blocks * dbs // 512, (f"1 {data} {hashes} {dbs} {fields['hash_block_size']} "
                                 f"{blocks} 0 sha256 {fields['root_hash']} {fields['salt']}")


def mount_one(boot: Boot, name: str, params: str) -> dict[str, object]:
    """Mount extension ``name`` at /run/kata-extensions/<name>; its facts."""
    disk = find_disk(boot.root, name)
    if disk is None:
        raise BootError(Stage.EXTENSIONS, f"extension {name}: no disk with serial "
                        f"extension-{name} (the cmdline names it in {PREFIX}{name}{SUFFIX}; "
                        "is the image in the configuration's guest_extension_images?)")
    data, hashes = partition(boot.root, disk, 1), partition(boot.root, disk, 2)
    if data is None:
        raise BootError(Stage.EXTENSIONS, f"extension {name}: /dev/{disk} has no partition "
                        "1 (Kata's layout: p1 erofs, p2 the hash tree)")
    if hashes is not None and not params:
        raise BootError(Stage.EXTENSIONS, f"extension {name}: /dev/{disk} has a hash "
                        "partition but the cmdline gives no verity params; refusing to mount "
                        "it unverified")
    if hashes is None and params:
        raise BootError(Stage.EXTENSIONS, f"extension {name}: verity params given but "
                        f"/dev/{disk} has no hash partition to check against")
    target = boot.path(MOUNT_DIR, name)
    boot.effects.makedirs(target)
    source, facts = _device(boot, name, data, hashes[1] if hashes else None, params)
    try:
        boot.effects.mount(source, target, "erofs", MS_RDONLY)
    except OSError as exc:
        if hashes is not None:
            _remove(boot, name)
        why = (": its data does not match its hash tree (a changed image, or verity "
               "params of another build)" if hashes is not None else "")
        raise BootError(Stage.EXTENSIONS, f"extension {name}: mount erofs from {source}: "
                        f"{exc.strerror or exc}{why}") from None
    return {"name": name, "disk": disk, "mounted_at": "/" + MOUNT_DIR + "/" + name, **facts}


def _device(boot: Boot, name: str, data: tuple[str, str], hashes: str | None,
            params: str) -> tuple[str, dict[str, object]]:
    from guestinit import verity

    if hashes is None:  # unmeasured: p1 itself
        return boot.path("dev", data[0]), {"verity": False}
    try:
        fields = verity_fields(params)
    except ValueError as exc:
        raise BootError(Stage.EXTENSIONS, f"extension {name}: {exc}") from None
    sectors, table = plan_table(data[1], hashes, fields)
    dm_name = f"extension-{name}"
    try:
        control = os.open(boot.path("dev/mapper/control"), os.O_RDWR | os.O_CLOEXEC)
        try:
            major, minor = verity.create(control, sectors, table, dm_name)
        finally:
            os.close(control)
        node = boot.path("dev/mapper", dm_name)
        if not os.path.exists(node):
            boot.effects.mknod(node, stat.S_IFBLK | 0o600, major, minor)
    except (OSError, verity.VerityError) as exc:
        raise BootError(Stage.EXTENSIONS, f"extension {name}: dm-verity over {data[0]} "
                        f"({data[1]}) and {hashes}: {exc}") from None
    return node, {"verity": True, "root_hash": fields["root_hash"]}


def _remove(boot: Boot, name: str) -> None:
    from guestinit import verity

    try:
        control = os.open(boot.path("dev/mapper/control"), os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        verity.remove(control, f"extension-{name}")
    finally:
        os.close(control)


def overlay_usr(boot: Boot, mounted: list[dict[str, object]]) -> str | None:
    """Lay the ``usr`` of each mounted extension over /usr; the lowerdir option used."""
    lowers = [boot.path(str(m["mounted_at"]).lstrip("/"), "usr") for m in mounted]
    lowers = [d for d in lowers if os.path.isdir(d)]
    if not lowers:
        return None
    option = "lowerdir=" + ":".join([*lowers, boot.path("usr")])
    try:
        boot.effects.mount("overlay", boot.path("usr"), "overlay", MS_RDONLY, option)
    except OSError as exc:
        raise BootError(Stage.EXTENSIONS, f"overlay the extensions' usr on /usr: "
                        f"{exc.strerror or exc}") from None
    return option


def run_extensions(boot: Boot) -> None:
    try:
        named = wanted(boot.cmdline)
    except ValueError as exc:
        raise BootError(Stage.EXTENSIONS, str(exc)) from None
    mounted = [mount_one(boot, name, params) for name, params in named]
    overlay = overlay_usr(boot, mounted)
    for m in mounted:
        how = f"verity root hash {str(m['root_hash'])[:16]}..." if m["verity"] else "unverified"
        boot.audit_event(f"extension {m['name']}: /dev/{m['disk']} at {m['mounted_at']} ({how})")
    boot.facts.extensions = {"mounted": mounted, "usr_overlay": overlay}
