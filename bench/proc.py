"""The one funnel for host-side subprocesses (STYLE.md: every external command goes here).

``run`` is for short commands whose output we want; ``spawn`` starts a long-lived
child in its own process group and ``stop`` ends that whole group and reaps it, so
a VMM never outlives the harness (timeouts, exceptions and Ctrl-C included).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence


class RunError(RuntimeError):
    """A command failed: the message names the command, its status and its stderr tail."""


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(
    argv: Sequence[str],
    *,
    timeout: float | None = 300.0,
    check: bool = True,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion, capturing text output; raise RunError on failure."""
    argv = [str(a) for a in argv]
    try:
        done = subprocess.run(
            argv,
            input=input_text,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except FileNotFoundError:
        raise RunError(f"run {argv[0]}: not found (install it, e.g. ./build.sh setup)") from None
    except subprocess.TimeoutExpired:
        raise RunError(f"run {' '.join(argv)}: still running after {timeout}s, killed") from None
    if check and done.returncode != 0:
        raise RunError(
            f"run {' '.join(argv)}: exit status {done.returncode}\n{_tail(done.stderr)}"
        )
    return done


def run_bytes(
    argv: Sequence[str],
    *,
    input_bytes: bytes | None = None,
    timeout: float | None = 300.0,
    cwd: str | None = None,
) -> bytes:
    """Like ``run`` for binary stdout (e.g. ``cpio -o``); raise RunError on failure."""
    argv = [str(a) for a in argv]
    try:
        done = subprocess.run(
            argv, input=input_bytes, capture_output=True, timeout=timeout, cwd=cwd, check=False
        )
    except FileNotFoundError:
        raise RunError(f"run {argv[0]}: not found (install it, e.g. ./build.sh setup)") from None
    except subprocess.TimeoutExpired:
        raise RunError(f"run {' '.join(argv)}: still running after {timeout}s, killed") from None
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace")
        raise RunError(f"run {' '.join(argv)}: exit status {done.returncode}\n{_tail(err)}")
    return done.stdout


def spawn(
    argv: Sequence[str],
    *,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.PIPE,
    cwd: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as the leader of a new process group (see ``stop``)."""
    argv = [str(a) for a in argv]
    try:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise RunError(f"spawn {argv[0]}: not found (install it, e.g. ./build.sh setup)") from None


def stop(proc: subprocess.Popen[bytes], grace: float = 2.0) -> int:
    """End ``proc``'s process group: SIGTERM, then SIGKILL after ``grace`` s; reap it.

    Returns the exit status (negative: killed by that signal). Safe to call twice.
    """
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # The leader is gone; anything it left in its group goes too.
    _signal_group(proc.pid, signal.SIGKILL)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    assert proc.returncode is not None
    return proc.returncode


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # group already empty
        os.killpg(pgid, sig)


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll ``pred`` until it is true (True) or ``timeout`` s pass (False)."""
    end = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(step)
