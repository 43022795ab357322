"""The interpreter's main start phase under the image's executable (rootfs/staticinit.c).

The executable starts CPython's core phase only: built-in and frozen imports, all the boot
needs. The main phase (path imports, the codec registry, sys.stdout, __main__) runs after
the ready frame, or earlier at the first import from the image's files, which the
executable's last finder serves (docs/guest.md, "Two start phases"). Imported after the
boot, by the main loop and the commands; under any other interpreter it does nothing.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from guestinit.boot import Boot


def finish(trigger: str) -> tuple[str, int, int] | None:
    """Run the main phase unless it ran; (what ran it, start ns, end ns) on CLOCK_BOOTTIME,
    or None when this is not the image's executable."""
    try:
        import _guestinit_start  # type: ignore[import-not-found]
    except ImportError:
        return None
    _guestinit_start.finish(trigger)
    done = _guestinit_start.state()
    return None if done is None else (str(done[0]), int(done[1]), int(done[2]))


def after_ready(boot: Boot) -> dict[str, object]:
    """The main phase once the ready frame is out: its span on the timeline (``start:main``),
    a kmsg line when an import ran it before ready, and what ``status`` shows: the modules
    the boot imported and what ran the main phase (``ready``, or that import)."""
    info: dict[str, object] = {"main_phase": None, "boot_modules": sorted(sys.modules)}
    try:
        done = finish("ready")
    except Exception as exc:  # the frozen modules still serve; say what is missing
        boot.kmsg.log(3, f"the interpreter's main start phase: {type(exc).__name__}: {exc}")
        return info
    if done is not None:
        info["main_phase"], start_ns, end_ns = done
        boot.timeline.add("start:main", start_ns, end_ns)
        if done[0] != "ready":
            boot.kmsg.log(6, "the interpreter's main start phase ran before ready, for an "
                          f"import of {done[0]} (not frozen into the init)")
    return info
