from __future__ import annotations

from pathlib import Path

import pytest

from guestinit import mounts
from guestinit.effects import MNT_DETACH, MS_RDONLY, MS_REMOUNT, DryEffects

MOUNTINFO = """\
22 1 0:20 / / rw - rootfs rootfs rw
23 22 0:21 / /proc rw,nosuid - proc proc rw
24 22 0:22 / /sys rw - sysfs sysfs rw
25 22 0:5 / /dev rw - devtmpfs devtmpfs rw
26 25 0:23 / /dev/pts rw - devpts devpts rw
30 24 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
"""


def test_plan_in_a_vm_mounts_devtmpfs_in_order(tmp_path: Path) -> None:
    plan = mounts.plan_mounts(str(tmp_path), "", private_dev=False)
    assert [m.target for m in plan][:4] == [str(tmp_path / d) for d in
                                            ("proc", "sys", "dev", "dev/pts")]
    assert plan[2].fstype == "devtmpfs"
    assert {m.fstype for m in plan if m.optional} == {"devpts", "cgroup2", "securityfs", "configfs"}


def test_plan_skips_what_is_already_mounted() -> None:
    plan = mounts.plan_mounts("/", MOUNTINFO)
    # /proc and /sys are mounted (by mountinfo, and populated on this host)
    assert [m.target for m in plan] == ["/dev/shm", "/run", "/tmp", "/sys/kernel/security",
                                        "/sys/kernel/config"]


def test_test_root_gets_private_tmpfs_dev_and_keeps_fake_trees(tmp_path: Path) -> None:
    (tmp_path / "sys" / "bus").mkdir(parents=True)
    (tmp_path / "proc").mkdir()
    plan = mounts.plan_mounts(str(tmp_path), "")
    targets = {m.target: m for m in plan}
    assert str(tmp_path / "sys") not in targets  # the fake sysfs stays visible
    assert targets[str(tmp_path / "proc")].fstype == "proc"
    assert targets[str(tmp_path / "dev")].fstype == "tmpfs"


def test_apply_tolerates_only_optional_missing_filesystems() -> None:
    plan = [mounts.Mount("a", "/a", "tmpfs"), mounts.Mount("b", "/b", "securityfs", optional=True)]
    fx = DryEffects()
    assert mounts.apply_mounts(plan, fx) == ["/a", "/b"]
    fx = DryEffects(fail={"mount"})
    with pytest.raises(OSError, match="mount a"):
        mounts.apply_mounts(plan, fx)


class BusyEffects(DryEffects):
    def mount(self, source: str, target: str, fstype: str, flags: int = 0,
              data: str = "") -> None:
        raise OSError(16, "Device or resource busy")


def test_busy_on_an_existing_mount_point_is_the_kernels_own_mount(tmp_path: Path) -> None:
    # /proc is a mount point on any Linux host: the kernel mounted devtmpfs there itself
    kernel_mounted = [mounts.Mount("devtmpfs", "/proc", "devtmpfs")]
    assert mounts.apply_mounts(kernel_mounted, BusyEffects()) == []
    with pytest.raises(OSError, match="busy"):  # busy elsewhere is a real failure
        mounts.apply_mounts([mounts.Mount("devtmpfs", str(tmp_path), "devtmpfs")],
                            BusyEffects())


def test_teardown_is_deepest_first_and_lazy() -> None:
    targets = mounts.plan_teardown(MOUNTINFO, "/")
    assert targets.index("/dev/pts") < targets.index("/dev")
    assert targets.index("/sys/fs/cgroup") < targets.index("/sys")
    assert "/" not in targets
    fx = DryEffects()
    audit = mounts.apply_teardown(targets, fx)
    assert fx.calls[0] == ("umount", targets[0], MNT_DETACH)
    assert audit == [f"umount {t}" for t in targets]


def test_teardown_under_a_test_root_touches_only_that_root() -> None:
    info = MOUNTINFO + "40 22 0:30 / /tmp/x/root/proc rw - proc proc rw\n"
    assert mounts.plan_teardown(info, "/tmp/x/root") == ["/tmp/x/root/proc"]


def test_readonly_plan() -> None:
    (m,) = mounts.plan_readonly(("/usr",), "/")
    assert m.target == "/usr" and m.flags == MS_REMOUNT | MS_RDONLY
