"""The build error type, the builder's way into the command funnel (``rootfs.proc``)
and step timing."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from rootfs import proc


class BuildError(RuntimeError):
    """A build step failed; the message names the step, the input and what to do."""


def run(
    argv: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    what: str = "",
) -> bytes:
    """Run a command, return its stdout; a failure raises BuildError with its stderr."""
    args = [str(a) for a in argv]
    try:
        done = proc.complete(args, input_bytes=stdin, timeout=None, cwd=cwd, env=env)
    except proc.NotFound:
        raise BuildError(f"{what or args[0]}: command {args[0]} not found "
                         "(run ./build.sh setup to install the Debian packages)") from None
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise BuildError(f"{what or args[0]}: `{' '.join(args)}` exited {done.returncode}: "
                         f"{tail or '(no stderr)'}")
    return done.stdout


class Progress:
    """One line per step with its duration, on stderr."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.started = time.monotonic()
        self.times: dict[str, float] = {}

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"    {text}", file=sys.stderr, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        if not self.quiet:
            print(f"==> {name} ...", file=sys.stderr, flush=True)
        yield
        dt = time.monotonic() - t0
        self.times[name] = dt
        if not self.quiet:
            print(f"    {name}: {dt:.2f} s", file=sys.stderr, flush=True)

    def total(self) -> float:
        return time.monotonic() - self.started
