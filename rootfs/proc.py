"""The one funnel for host-side subprocesses, the image builder's and the bench's
(STYLE.md: every external command goes here).

``run``/``run_bytes`` are for short commands whose output we want; ``complete`` is
their unchecked core, for callers that word a failure themselves (``rootfs.steps.run``
raises BuildError naming the step). ``spawn`` starts a long-lived child in its own
process group and ``stop`` ends that whole group and reaps it, so a VMM never outlives
the harness (timeouts, exceptions and Ctrl-C included). ``stream`` hands a long
command's output over line by line as it comes (a kernel build's progress).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

Argv = Sequence[str | Path]
SETUP_HINT = "install it, e.g. ./build.sh setup"


class RunError(RuntimeError):
    """A command failed: the message names the command, its status and its stderr tail."""


class NotFound(RunError):
    """The program to run does not exist."""

    def __init__(self, verb: str, program: str) -> None:
        super().__init__(f"{verb} {program}: not found ({SETUP_HINT})")
        self.program = program


class TimedOut(RunError):
    """The command was still running after its timeout, and was killed."""


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _call(args: list[str], *, input: str | bytes | None, text: bool, timeout: float | None,
          cwd: str | Path | None,
          env: Mapping[str, str] | None) -> subprocess.CompletedProcess[Any]:
    """The one ``subprocess.run``: output captured, the status left to the caller."""
    try:
        return subprocess.run(
            args, input=input, capture_output=True, text=text,
            errors="replace" if text else None, timeout=timeout, cwd=cwd,
            env=dict(env) if env is not None else None, check=False,
        )
    except FileNotFoundError:
        raise NotFound("run", args[0]) from None
    except subprocess.TimeoutExpired:
        raise TimedOut(f"run {' '.join(args)}: still running after {timeout}s, killed") from None


def complete(
    argv: Argv,
    *,
    input_bytes: bytes | None = None,
    timeout: float | None = 300.0,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion with binary output, whatever its exit status.

    Raises NotFound or TimedOut (both RunError) when it could not run to the end.
    """
    return _call([str(a) for a in argv], input=input_bytes, text=False, timeout=timeout,
                 cwd=cwd, env=env)


def run(
    argv: Argv,
    *,
    timeout: float | None = 300.0,
    check: bool = True,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion, capturing text output; raise RunError on failure."""
    args = [str(a) for a in argv]
    done: subprocess.CompletedProcess[str] = _call(args, input=input_text, text=True,
                                                   timeout=timeout, cwd=cwd, env=env)
    if check and done.returncode != 0:
        raise RunError(f"run {' '.join(args)}: exit status {done.returncode}\n"
                       f"{_tail(done.stderr)}")
    return done


def run_bytes(
    argv: Argv,
    *,
    input_bytes: bytes | None = None,
    timeout: float | None = 300.0,
    cwd: str | None = None,
) -> bytes:
    """Like ``run`` for binary stdout (e.g. ``cpio -o``); raise RunError on failure."""
    done = complete(argv, input_bytes=input_bytes, timeout=timeout, cwd=cwd)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace")
        raise RunError(f"run {' '.join(map(str, argv))}: exit status {done.returncode}\n"
                       f"{_tail(err)}")
    return done.stdout


def spawn(
    argv: Argv,
    *,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.PIPE,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as the leader of a new process group (see ``stop``)."""
    args = [str(a) for a in argv]
    try:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=cwd,
            env=dict(env) if env is not None else None, start_new_session=True,
        )
    except FileNotFoundError:
        raise NotFound("spawn", args[0]) from None


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
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    assert proc.returncode is not None
    return proc.returncode


def stream(argv: Argv, on_line: Callable[[bytes], None], *,
           env: Mapping[str, str] | None = None) -> int:
    """Run ``argv`` to the end, handing each line of its stdout and stderr (merged, in
    order) to ``on_line`` as it arrives; its exit status.

    The command runs in its own process group (``spawn``): should ``on_line`` raise or
    Ctrl-C arrive, ``stop`` ends it and whatever it started (a make and its compilers).
    """
    child = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            on_line(line)
        return child.wait()
    finally:
        stop(child)


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
