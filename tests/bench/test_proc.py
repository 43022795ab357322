from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench import proc


def test_run_failure_names_the_command_and_its_stderr() -> None:
    with pytest.raises(proc.RunError, match=r"run sh -c .*exit status 3\nboom"):
        proc.run(["sh", "-c", "echo boom >&2; exit 3"])


def test_run_missing_program_says_not_found() -> None:
    with pytest.raises(proc.RunError, match="no-such-tool-x: not found"):
        proc.run(["no-such-tool-x"])


def _gone(pid: int) -> bool:
    """Exited: no /proc entry, or a zombie waiting for its (re)parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_stop_ends_the_whole_group_even_when_term_is_ignored(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    child = proc.spawn(["sh", "-c", f"trap '' TERM; sleep 300 & echo $! > {pidfile}; wait"])
    assert proc.wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", 5)
    grandchild = int(pidfile.read_text())
    started = time.monotonic()
    rc = proc.stop(child, grace=0.3)
    assert rc == -9
    assert time.monotonic() - started < 5
    assert proc.wait_until(lambda: _gone(grandchild), 5)
    assert proc.stop(child) == -9  # a second stop is harmless
