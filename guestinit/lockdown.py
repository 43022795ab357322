"""After the last module: no more module loading, and the configured read-only remounts.

``modules_disabled`` is one-way until reboot: written only once every module
the boot needs is in. Read-only remounts keep each mount's other per-mount flags
(a bind remount sets all of them at once), read from ``/proc/self/mountinfo``.
"""

from __future__ import annotations

import os

from guestinit.effects import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REMOUNT
from guestinit.stages import BootError, Stage
from guestinit.sysfs import read_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from guestinit.boot import Boot

MODULES_DISABLED = "proc/sys/kernel/modules_disabled"
_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}


def parse_mountinfo(text: str) -> dict[str, set[str]]:
    """Mount point -> its per-mount options (field 6 of mountinfo), last mount wins."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 6:
            point = fields[4].replace("\\040", " ")
            out[point] = set(fields[5].split(","))
    return out


def plan_readonly(points: tuple[str, ...], mountinfo: dict[str, set[str]],
                  root: str = "/") -> list[tuple[str, int]]:
    """(target, flags) for each read-only remount; an unknown mount point is an error."""
    plan = []
    for point in points:
        target = os.path.normpath(os.path.join(root, point.lstrip("/")))
        opts = mountinfo.get(target)
        if opts is None:
            raise ValueError(f"remount {point} read-only: {target} is not a mount point "
                             "(fix guestinit.readonly)")
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for name, bit in _FLAGS.items():
            if name in opts:
                flags |= bit
        plan.append((target, flags))
    return plan


def run_lockdown(boot: Boot) -> None:
    cfg = boot.config()
    points = cfg.words("readonly")
    if points:
        try:
            info = parse_mountinfo(read_text(boot.path("proc", "self", "mountinfo"), ()) or "")
            plan = plan_readonly(points, info, boot.root)
        except (OSError, ValueError) as exc:
            raise BootError(Stage.LOCKDOWN, str(exc)) from None
        for target, flags in plan:
            try:
                boot.effects.mount("", target, "", flags)
            except OSError as exc:
                raise BootError(Stage.LOCKDOWN,
                                f"remount {target} read-only: {exc.strerror or exc}") from None
            boot.audit_event(f"lockdown: {target} read-only")
    if not cfg.bool("lockdown"):
        boot.kmsg.log(4, "lockdown: disabled by config; modules can still be loaded")
        return
    path = boot.path(MODULES_DISABLED)
    if not os.path.exists(path):
        boot.kmsg.log(4, f"lockdown: {path} missing (test root?); modules_disabled not set")
        return
    if boot.root != "/" and os.path.ismount(boot.path("proc")):
        # a test root with a real procfs: the sysctl is global, it would lock the host
        boot.kmsg.log(4, f"lockdown: {boot.path('proc')} is a real procfs under a test root; "
                      "modules_disabled not set")
        return
    try:
        boot.effects.write(path, "1")
    except OSError as exc:
        raise BootError(Stage.LOCKDOWN, f"disable module loading: {exc.strerror or exc}") from None
    boot.facts.lockdown = True
    boot.audit_event("lockdown: modules_disabled=1")
