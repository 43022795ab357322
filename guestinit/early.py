"""The early, log and config stages: filesystems, console, logging, configuration."""

from __future__ import annotations

import os

from guestinit import config, mounts
from guestinit.effects import RB_DISABLE_CAD
from guestinit.stages import BootError, Stage
from guestinit.sysfs import read_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from guestinit.boot import Boot
    from guestinit.config import Config

CONF = "etc/guestinit.conf"
DEVKMSG = "proc/sys/kernel/printk_devkmsg"


def lenient_config(boot: Boot) -> Config:
    """The baked file overlaid by the cmdline, bad entries skipped: for what must work
    before (or despite) the config stage, which reports bad values under its own name.

    Read once and kept on the boot; the verity switch forgets it (the verified tree has
    its own file), so the next caller reads that one."""
    if boot.draft_cfg is None:
        boot.draft_cfg = config.build(read_text(boot.path(CONF)) or "", boot.cmdline,
                                      strict=False)
    return boot.draft_cfg


def run_early(boot: Boot) -> None:
    """API filesystems, the verity switch when asked, then what runs on the final root:
    the deferred mounts (beside the boot), the console, kernel settings, loopback."""
    later = mount_filesystems(boot)
    if boot.cmdline_from_proc and not boot.cmdline:
        boot.cmdline = (read_text(boot.path("proc/cmdline")) or "").strip()
    if "guestinit.verity.roothash=" in boot.cmdline:  # verity.py is imported only then
        switch_to_verity_root(boot)
    if later:
        boot.background("mounts", lambda: mounts.apply_mounts(later, boot.effects))
    if boot.root == "/":
        _console_stdio(boot.path("dev/console"))
        kernel_settings(boot)
    t_lo = boot.timeline.now()
    try:
        boot.effects.link_up("lo")
    except OSError as exc:
        boot.kmsg.log(4, f"loopback not up: {exc}")
    boot.timeline.add("early:lo", t_lo, boot.timeline.now())


def mount_filesystems(boot: Boot) -> list[mounts.Mount]:
    """Bind libc (the first effect), mount what the boot needs now; the deferred rest."""
    tl = boot.timeline
    try:
        t0 = tl.now()
        boot.effects.set_child_subreaper()  # the first effect: binds libc (cffi)
        t1 = tl.now()
        plan = mounts.plan_mounts(boot.root, read_text("/proc/self/mountinfo") or "")
        boot.facts.mounts = mounts.apply_mounts([m for m in plan if not m.deferred],
                                                boot.effects)
        # sub-spans: where this stage's time goes (under TCG: libc ~23 ms, mounts ~10
        # ms, lo ~26 ms of ~66 ms, the last with the deferred cgroup2 mount beside it)
        tl.add("early:libc", t0, t1)
        tl.add("early:mounts", t1, tl.now())
    except OSError as exc:
        raise BootError(Stage.EARLY, str(exc)) from None
    return [m for m in plan if m.deferred]


def switch_to_verity_root(boot: Boot) -> None:
    """The initramfs's step (``verity.roothash``): set up the dm-verity root and switch
    to it; returns rooted in the verified tree (or execs its init: ``verity.reexec``)."""
    from guestinit import verity

    draft = lenient_config(boot)
    roothash = verity.wanted(boot, draft)
    if roothash is not None:
        verity.switch_to_verity_root(boot, roothash, draft)
        boot.draft_cfg = None  # the verified tree's /etc/guestinit.conf from now on


def kernel_settings(boot: Boot) -> None:
    if "printk.devkmsg=" not in boot.cmdline:
        # Kata passes no printk.devkmsg=on: without it the kernel keeps 10 of our
        # lines per 5 s and drops the rest (kmsg.py)
        try:
            boot.effects.write(boot.path(DEVKMSG), "on\n")
        except OSError as exc:
            boot.kmsg.log(4, f"{DEVKMSG} not set: {exc}")
    try:
        # ctrl-alt-del becomes SIGINT to PID 1 instead of an immediate reboot
        boot.effects.reboot(RB_DISABLE_CAD)
    except OSError as exc:
        boot.kmsg.log(4, f"ctrl-alt-del stays a hard reboot: {exc}")


def _console_stdio(console: str) -> None:
    try:
        fd = os.open(console, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return  # no console: keep what the kernel gave us
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


def run_log(boot: Boot) -> None:
    """kmsg logging is up from the start; here the syslog server comes up."""
    # a lenient read is enough to pick the log level and the syslog limits
    lenient = lenient_config(boot)
    boot.kmsg.set_level(lenient.log_level())
    from guestinit.syslog import SyslogServer

    store = boot.path("run/guestinit/syslog")
    os.makedirs(os.path.dirname(store), mode=0o755, exist_ok=True)
    if not lenient.bool("syslog"):
        return
    try:
        boot.syslog = SyslogServer(
            boot.path("dev/log"), boot.kmsg, store, lenient.int("syslog.file_max"),
            lenient.int("syslog.kmsg_rate"), lenient.bool("syslog.forward"),
            tick=boot.procs.reap,
        )
    except OSError as exc:
        raise BootError(Stage.LOG, f"syslog server on {boot.path('dev/log')}: {exc}") from None


def run_config(boot: Boot) -> None:
    conf = boot.path(CONF)
    try:
        draft = lenient_config(boot)  # read once, by the log stage; here every problem counts
    except OSError as exc:
        raise BootError(Stage.CONFIG, f"read {conf}: {exc}") from None
    if draft.problems:
        raise BootError(Stage.CONFIG, f"bad setting{'s' * (len(draft.problems) > 1)} "
                        + "; ".join(map(str, draft.problems)))
    boot.cfg = draft
    cfg = boot.cfg
    boot.kmsg.set_level(cfg.log_level())
    boot.reporter.configure(cfg.str("report"))
    if cfg.ignored:  # NVRC ignores unknown keys too; say so instead of failing the boot
        words = " ".join(cfg.ignored)[:1024]
        boot.kmsg.log(4, f"config: ignored (unknown key, or no value): {words}")
        boot.reporter.progress("config", "warning", f"ignored cmdline words (unknown key, "
                               f"or no value): {words}", ignored=len(cfg.ignored))
    boot.supervisor.max_restarts = cfg.int("restart.max")
    boot.supervisor.backoff = cfg.float("restart.backoff")
    boot.supervisor.backoff_max = cfg.float("restart.backoff_max")
    boot.supervisor.stable_after = cfg.float("restart.reset")
    try:
        boot.effects.sethostname(cfg.str("hostname"))
    except OSError as exc:
        boot.kmsg.log(4, f"hostname not set: {exc}")
