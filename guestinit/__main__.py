"""guestinit: PID 1 of a Kata (GPU) microVM. This file is the boot sequence."""

from __future__ import annotations

import gc
import os
import sys

from guestinit import agent, early, wire
from guestinit.boot import Boot
from guestinit.effects import Effects
from guestinit.kmsg import Kmsg
from guestinit.pid1 import Init
from guestinit.process import ProcessTable
from guestinit.report import VERSION, Reporter
from guestinit.stages import Stage, Timeline, finish_start
from guestinit.supervisor import Supervisor
from guestinit.sysfs import read_text
from guestinit.values import Mode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence


def run_discover(boot: Boot) -> None:
    from guestinit import discover

    discover.run_discover(boot)


def run_bench(boot: Boot) -> None:
    from guestinit import barmap

    barmap.run_bench(boot)


def run_modules(boot: Boot) -> None:
    facts = boot.facts
    if not boot.config().words("modules") and not facts.inventory:
        facts.modules = []  # nothing to load: the loader (and mmap) is not imported
        return
    from guestinit import kmod

    accel: tuple[list[str], list[str]] = ([], [])
    if facts.inventory:
        from guestinit.nvidia import modules

        accel = modules.plan(facts, boot.config())
    kmod.run_modules(boot, *accel)


# cpu mode has no NVIDIA work: its stages then skip importing their modules


def run_devices(boot: Boot) -> None:
    if boot.facts.mode == Mode.CPU:
        return
    from guestinit.nvidia import devices

    devices.run_devices(boot)


def run_daemons(boot: Boot) -> None:
    if boot.facts.mode == Mode.CPU:
        return
    from guestinit.nvidia import daemons

    daemons.run_daemons(boot)


def run_cdi(boot: Boot) -> None:
    if not boot.facts.gpus:  # a spec describes GPUs (gpu mode, assigned by devices)
        return
    from guestinit.nvidia import cdi, daemons

    cdi.run_cdi(boot)
    daemons.set_ready_state(boot)  # smi.srs: the last step of GPU bring-up (NVRC's order)


def run_lockdown(boot: Boot) -> None:
    from guestinit import lockdown

    lockdown.run_lockdown(boot)


def run_extensions(boot: Boot) -> None:
    from guestinit import extensions

    extensions.run_extensions(boot)


STAGES: tuple[tuple[Stage, Callable[[Boot], None]], ...] = (
    (Stage.EARLY, early.run_early),
    (Stage.LOG, early.run_log),
    (Stage.CONFIG, early.run_config),
    (Stage.DISCOVER, run_discover),
    (Stage.MODULES, run_modules),
    (Stage.DEVICES, run_devices),
    (Stage.DAEMONS, run_daemons),
    (Stage.CDI, run_cdi),
    (Stage.LOCKDOWN, run_lockdown),
    (Stage.AGENT, agent.run_agent),
)  # then Stage.READY: the init's own (Init.run_ready: power button, control socket, frame)


def boot_stages(boot: Boot, ready: Callable[[Boot], None]
                ) -> Iterator[tuple[Stage, Callable[[Boot], None]]]:
    """STAGES, plus ``extensions`` after ``config`` when Kata names extension images on
    the cmdline, and ``bench`` after ``discover`` when the config (read by then) asks;
    ``ready`` last."""
    for stage, fn in STAGES:
        yield stage, fn
        if stage == Stage.CONFIG and "kata.extension." in boot.cmdline:
            yield Stage.EXTENSIONS, run_extensions
        if stage == Stage.DISCOVER and boot.config().str("bench.bar"):
            yield Stage.BENCH, run_bench
    yield Stage.READY, ready


def new_boot_id() -> str:
    try:
        return os.getrandom(16, os.GRND_NONBLOCK).hex()
    except OSError:  # entropy not ready this early: still unique enough per boot
        import time

        return f"{time.time_ns():x}{os.getpid():x}"


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("--help", "-h", "--help-config", "status"):
        finish_start("cli")  # first: the commands print, and argparse reads sys.base_prefix
        from guestinit import cli

        cli.main(args)
        return
    # no automatic garbage collection until ready (the one executable turns it off before
    # the first import; pid1.Init.main_loop turns it back on): see docs/guest.md
    gc.disable()
    root, cmdline = "/", None
    while args:
        flag = args.pop(0)
        if flag == "--root" and args:
            root = os.path.abspath(args.pop(0))
        elif flag == "--cmdline" and args:
            cmdline = args.pop(0)
        # the kernel passes unknown cmdline words as init arguments: ignore them
    from_proc = cmdline is None
    if cmdline is None:
        cmdline = read_text(os.path.join(root, "proc/cmdline")) or ""
    kmsg = Kmsg(os.path.join(root, "dev/kmsg"))
    procs = ProcessTable()
    boot = Boot(root, Effects(), Timeline(), Reporter(root, new_boot_id(), kmsg), kmsg, procs,
                Supervisor(procs), cmdline)
    boot.cmdline_from_proc = from_proc
    stamps = getattr(sys.modules["guestinit"], "_start_ns", None)
    if stamps:  # the image's one executable says where its start-up went (rootfs/staticinit.c)
        exec_ns, python_ns, imported_ns = stamps
        boot.timeline.add("start:python", exec_ns, python_ns)
        boot.timeline.add("start:imports", python_ns, imported_ns)
    if "GUESTINIT_SPANS" in os.environ:  # we were exec'ed from the initramfs onto a verity root
        from guestinit.verity import inherited_spans

        for name, start, end in inherited_spans(os.environ):
            boot.timeline.add(name, start, end)
    init = Init(boot)
    boot.reporter.send(wire.FrameType.HELLO, version=VERSION, pid=os.getpid())
    init.run(boot_stages(boot, init.run_ready))


if __name__ == "__main__":
    main()
