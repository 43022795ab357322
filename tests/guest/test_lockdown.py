"""Lockdown: modules_disabled after the last module, read-only remounts keeping their flags."""

from __future__ import annotations

import pathlib

import pytest

from guestinit import lockdown
from guestinit.effects import MS_BIND, MS_NODEV, MS_NOSUID, MS_RDONLY, MS_REMOUNT, DryEffects
from guestinit.stages import BootError
from tests.fixtures.accel import kmsg_text, make_boot

MOUNTINFO = """\
22 1 0:21 / / rw,relatime shared:1 - erofs /dev/vda ro
23 22 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw
30 22 0:30 / /usr rw,nosuid,nodev,relatime shared:9 - ext4 /dev/vdb rw
31 22 0:31 / /opt\\040data rw,relatime shared:10 - ext4 /dev/vdc rw
"""


def fake_proc(root: pathlib.Path, mountinfo: str = MOUNTINFO) -> pathlib.Path:
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(mountinfo.replace(" /usr ", f" {root}/usr ")
                                              .replace(" /opt", f" {root}/opt"))
    flag = root / "proc/sys/kernel/modules_disabled"
    flag.write_text("0\n")
    return flag


def test_mountinfo_options_and_escapes() -> None:
    info = lockdown.parse_mountinfo(MOUNTINFO)
    assert info["/usr"] == {"rw", "nosuid", "nodev", "relatime"}
    assert "/opt data" in info


def test_readonly_plan_keeps_per_mount_flags() -> None:
    plan = lockdown.plan_readonly(("/usr", "/opt data"), lockdown.parse_mountinfo(MOUNTINFO))
    assert plan == [("/usr", MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV),
                    ("/opt data", MS_REMOUNT | MS_BIND | MS_RDONLY)]
    with pytest.raises(ValueError, match="remount /srv read-only: /srv is not a mount point"):
        lockdown.plan_readonly(("/srv",), lockdown.parse_mountinfo(MOUNTINFO))


def test_lockdown_writes_modules_disabled_and_audits(tmp_path: pathlib.Path) -> None:
    flag = fake_proc(tmp_path)
    boot = make_boot(tmp_path, cmdline="guestinit.readonly=/usr")
    lockdown.run_lockdown(boot)
    assert isinstance(boot.effects, DryEffects)
    assert boot.effects.calls == [
        ("mount", "", f"{tmp_path}/usr", "", MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
         | MS_NODEV, ""),
        ("write", str(flag), "1"),
    ]
    assert boot.audit == [f"lockdown: {tmp_path}/usr read-only", "lockdown: modules_disabled=1"]
    assert boot.facts.lockdown is True


def test_real_write_to_a_fake_flag_file(tmp_path: pathlib.Path) -> None:
    from guestinit.effects import Effects

    flag = fake_proc(tmp_path)
    lockdown.run_lockdown(make_boot(tmp_path, effects=Effects()))
    assert flag.read_text().startswith("1")  # O_WRONLY without O_TRUNC, as sysctl files take it


def test_disabled_by_config(tmp_path: pathlib.Path) -> None:
    flag = fake_proc(tmp_path)
    boot = make_boot(tmp_path, cmdline="guestinit.lockdown=0")
    lockdown.run_lockdown(boot)
    assert isinstance(boot.effects, DryEffects) and boot.effects.calls == []
    assert flag.read_text() == "0\n" and "disabled by config" in kmsg_text(tmp_path)


def test_test_root_without_the_file_is_skipped_with_a_note(tmp_path: pathlib.Path) -> None:
    boot = make_boot(tmp_path)
    lockdown.run_lockdown(boot)
    assert isinstance(boot.effects, DryEffects) and boot.effects.calls == []
    assert "modules_disabled not set" in kmsg_text(tmp_path)


def test_refused_write_fails_the_stage(tmp_path: pathlib.Path) -> None:
    fake_proc(tmp_path)
    boot = make_boot(tmp_path, effects=DryEffects(fail=["write"]))
    with pytest.raises(BootError, match="disable module loading: write"):
        lockdown.run_lockdown(boot)


def test_unknown_readonly_target_fails_the_stage(tmp_path: pathlib.Path) -> None:
    fake_proc(tmp_path)
    with pytest.raises(BootError, match="is not a mount point"):
        lockdown.run_lockdown(make_boot(tmp_path, cmdline="guestinit.readonly=/srv"))
