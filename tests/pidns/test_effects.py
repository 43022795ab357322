"""Effects that reach other processes, tried where only the test's own processes live."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# PID 1 of a fresh PID namespace forks a sleeper and a child; the child (PID 3, not PID 1)
# asks for kill_all. Were the refusal gone, kill(-1) would reach only the sleeper.
PROBE = """
import os, signal, sys, time
from guestinit.effects import Effects
sleeper = os.fork()
if sleeper == 0:
    time.sleep(30)
    os._exit(0)
child = os.fork()
if child == 0:
    try:
        Effects().kill_all(signal.SIGTERM)
    except OSError as exc:
        print("refused:", exc)
        os._exit(0)
    os._exit(1)
_, status = os.waitpid(child, 0)
alive = os.waitpid(sleeper, os.WNOHANG) == (0, 0)
print("child", os.waitstatus_to_exitcode(status), "pid", child, "sleeper alive", alive)
os.kill(sleeper, signal.SIGKILL)
"""


def test_kill_all_is_refused_outside_pid_1() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("the pid-namespace tier needs root and unshare (util-linux)")
    out = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c",
                          PROBE], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "refused: [Errno 1] kill(-1, 15): refused, this is not PID 1" in out.stdout
    assert "child 0 pid 3 sleeper alive True" in out.stdout
