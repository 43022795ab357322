"""The last step before unmounting: every process PID 1 did not stop itself.

The supervisor stops the agent and the daemons it started; anything they forked (a
daemon's helper, the agent's containers, an orphan) would live on until poweroff and
keep files open under the mounts. ``sweep`` sends ``kill(-1, SIGTERM)``, waits up to
``grace`` for them to exit (woken by SIGCHLD, reaping as they go), then
``kill(-1, SIGKILL)`` for what is left, and says in audit lines who was signalled.
"""

from __future__ import annotations

import os
import select
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal

    from guestinit.boot import Boot
    from guestinit.effects import Effects
else:  # signal.py imports enum; the C module has the numbers
    import _signal as signal

KILL_WAIT = 2.0  # after SIGKILL: the kernel ends them; this only bounds a stuck exit
MAX_NAMED = 10


def others(proc: str) -> list[tuple[int, str]]:
    """(pid, comm) of every process in ``proc`` but this one and kernel threads."""
    me = os.getpid()
    out: list[tuple[int, str]] = []
    try:
        names = os.listdir(proc)
    except OSError:
        return out
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(os.path.join(proc, name, "cmdline"), "rb") as fh:
                if not fh.read(1):
                    continue  # kernel thread (or a zombie): kill(-1) does not reach it
            with open(os.path.join(proc, name, "comm")) as fh:
                out.append((int(name), fh.read().strip()))
        except OSError:
            continue  # gone while we looked
    return sorted(out)


def _named(procs: list[tuple[int, str]]) -> str:
    shown = ", ".join(f"{comm}[{pid}]" for pid, comm in procs[:MAX_NAMED])
    return shown + (f" and {len(procs) - MAX_NAMED} more" if len(procs) > MAX_NAMED else "")


def _wait_gone(boot: Boot, proc: str, seconds: float) -> list[tuple[int, str]]:
    """Reap until nobody else is left or ``seconds`` pass; who is left."""
    deadline = time.monotonic() + seconds
    while True:
        boot.procs.reap()
        left = others(proc)
        remaining = deadline - time.monotonic()
        if not left or remaining <= 0:
            return left
        if boot.wake_fd >= 0:  # SIGCHLD (and every other watched signal) wakes us
            ready, _, _ = select.select([boot.wake_fd], [], [], min(remaining, 0.1))
            if ready:
                try:
                    os.read(boot.wake_fd, 256)
                except BlockingIOError:
                    pass
        else:
            time.sleep(min(remaining, 0.02))


def sweep(boot: Boot, grace: float, effects: Effects | None = None) -> list[str]:
    """SIGTERM everyone else, SIGKILL who outlives ``grace``; the audit lines."""
    eff = effects if effects is not None else boot.effects
    proc = os.path.join(boot.root, "proc")
    targets = others(proc)
    if not targets:
        return ["sweep: no other processes"]
    try:
        eff.kill_all(signal.SIGTERM)
    except OSError as exc:
        return [f"sweep: {exc}"]
    lines = [f"sweep: SIGTERM to {len(targets)}: {_named(targets)}"]
    left = _wait_gone(boot, proc, grace)
    if not left:
        return [*lines, "sweep: all exited"]
    eff.kill_all(signal.SIGKILL)
    lines.append(f"sweep: SIGKILL to {len(left)} left after {grace:g}s: {_named(left)}")
    still = _wait_gone(boot, proc, KILL_WAIT)
    if still:
        lines.append(f"sweep: {len(still)} still there: {_named(still)}")
    return lines
