"""The early mounts and their teardown: plans are data, ``apply_*`` does them.

Under a test root (``root != "/"``) /dev is a private tmpfs instead of the
host's devtmpfs (device nodes made by a test must never land in the host's
/dev), and a target that a test has already populated (a fake /sys or /proc
tree) is left alone so the fake stays visible.
"""

from __future__ import annotations

import os

from guestinit.effects import MNT_DETACH, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REMOUNT

TYPE_CHECKING = False
if TYPE_CHECKING:
    from guestinit.effects import Effects


class Mount:
    __slots__ = ("data", "deferred", "flags", "fstype", "optional", "source", "target")

    def __init__(self, source: str, target: str, fstype: str, flags: int = 0, data: str = "",
                 optional: bool = False, deferred: bool = False) -> None:
        self.source = source
        self.target = target
        self.fstype = fstype
        self.flags = flags
        self.data = data
        self.optional = optional
        # deferred: mounted on a side thread while the boot goes on (only the agent
        # needs it); the first cgroup2 mount costs ~11 ms of kernel time
        self.deferred = deferred

    def __repr__(self) -> str:
        return f"Mount({self.fstype} on {self.target})"


NOSUID_NODEV_NOEXEC = MS_NOSUID | MS_NODEV | MS_NOEXEC


def _populated(path: str) -> bool:
    try:
        return bool(os.listdir(path))
    except OSError:
        return False


def plan_mounts(root: str, mountinfo: str = "", private_dev: bool | None = None) -> list[Mount]:
    """What the early stage mounts, in order, skipping what is already there.

    ``private_dev`` (default: whether ``root`` is a test root) mounts a tmpfs on
    /dev instead of devtmpfs."""
    test_root = os.path.realpath(root) != "/" if private_dev is None else private_dev

    def j(path: str) -> str:
        return os.path.join(root, path)

    dev = (Mount("tmpfs", j("dev"), "tmpfs", MS_NOSUID, "mode=0755,size=4m") if test_root
           else Mount("devtmpfs", j("dev"), "devtmpfs", MS_NOSUID, "mode=0755"))
    plan = [
        Mount("proc", j("proc"), "proc", NOSUID_NODEV_NOEXEC),
        Mount("sysfs", j("sys"), "sysfs", NOSUID_NODEV_NOEXEC),
        dev,
        Mount("devpts", j("dev/pts"), "devpts", MS_NOSUID | MS_NOEXEC,
              "gid=5,mode=620,ptmxmode=000", optional=True),
        # no size=: the kernel's default, half the RAM, as kata-agent's own init-mode mounts
        # (src/agent/src/mount.rs INIT_ROOTFS_MOUNTS); guest-pull unpacks container
        # images under /run/kata-containers/image
        Mount("shm", j("dev/shm"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
        Mount("run", j("run"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
        Mount("tmp", j("tmp"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
        Mount("cgroup2", j("sys/fs/cgroup"), "cgroup2", NOSUID_NODEV_NOEXEC,
              "nsdelegate", optional=True, deferred=True),
        Mount("securityfs", j("sys/kernel/security"), "securityfs", NOSUID_NODEV_NOEXEC,
              optional=True),
        Mount("configfs", j("sys/kernel/config"), "configfs", NOSUID_NODEV_NOEXEC,
              optional=True),
    ]
    mounted = {line.split()[4] for line in mountinfo.splitlines() if len(line.split()) > 4}
    out = []
    for m in plan:
        if m.target in mounted:
            continue
        if m.fstype in ("proc", "sysfs") and _populated(m.target):
            continue  # already mounted (or a test's fake tree)
        out.append(m)
    return out


def apply_mounts(plan: list[Mount], effects: Effects) -> list[str]:
    """Carry out the plan; returns the targets mounted. Optional ones may fail quietly
    only when the kernel lacks the filesystem (ENODEV) or the mount point (ENOENT), or
    refuses it (EPERM: configfs where its module is not loaded, a container).

    EBUSY on a target that is already a mount point is the kernel's own mount, not a
    failure: a kernel with CONFIG_DEVTMPFS_MOUNT mounts devtmpfs on /dev when it mounts
    a real root itself (an erofs root from ``dm-mod.create=``, no initramfs), before
    /proc exists for the plan to see it."""
    done = []
    for m in plan:
        try:
            effects.makedirs(m.target)
            effects.mount(m.source, m.target, m.fstype, m.flags, m.data)
        except OSError as exc:
            if m.optional and exc.errno in (1, 2, 19):  # EPERM, ENOENT, ENODEV
                continue
            if exc.errno == 16 and os.path.ismount(m.target):  # EBUSY: already there
                continue
            raise
        done.append(m.target)
    return done


def plan_teardown(mountinfo: str, root: str) -> list[str]:
    """Mount points under ``root`` to unmount at shutdown, deepest first."""
    base = os.path.realpath(root).rstrip("/")
    targets = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        target = fields[4].replace("\\040", " ")
        if target == (base or "/"):
            continue
        if base and not target.startswith(base + "/"):
            continue
        targets.append(target)
    return sorted(set(targets), key=lambda t: (-t.count("/"), t))


def apply_teardown(targets: list[str], effects: Effects) -> list[str]:
    """Unmount (lazily: busy mounts must not stall poweroff); returns audit lines."""
    audit = []
    for target in targets:
        try:
            effects.umount(target, MNT_DETACH)
            audit.append(f"umount {target}")
        except OSError as exc:
            audit.append(f"umount {target} failed: {exc.strerror or exc}")
    return audit


def plan_readonly(targets: tuple[str, ...], root: str) -> list[Mount]:
    return [Mount("none", os.path.join(root, t.lstrip("/")), "", MS_REMOUNT | MS_RDONLY)
            for t in targets]
