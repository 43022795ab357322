from __future__ import annotations

import time
from pathlib import Path

import pytest

from rootfs import proc
from rootfs.steps import BuildError, run


def test_run_failure_names_the_command_and_its_stderr() -> None:
    with pytest.raises(proc.RunError, match=r"run sh -c .*exit status 3\nboom"):
        proc.run(["sh", "-c", "echo boom >&2; exit 3"])


def test_run_missing_program_says_not_found() -> None:
    with pytest.raises(proc.RunError, match="no-such-tool-x: not found"):
        proc.run(["no-such-tool-x"])


def test_run_that_outlives_its_timeout_is_killed_and_named() -> None:
    with pytest.raises(proc.TimedOut, match=r"run sleep 5: still running after 0.2s, killed"):
        proc.run(["sleep", "5"], timeout=0.2)


def test_complete_leaves_the_status_to_the_caller() -> None:
    done = proc.complete(["sh", "-c", "cat; echo err >&2; exit 4"], input_bytes=b"in\x00")
    assert (done.returncode, done.stdout, done.stderr) == (4, b"in\x00", b"err\n")


def test_the_builder_names_the_step_the_command_and_its_stderr() -> None:
    assert run(["sh", "-c", "printf out"], what="pack") == b"out"
    with pytest.raises(BuildError, match=r"^pack: `sh -c echo bad >&2; exit 5` exited 5: bad$"):
        run(["sh", "-c", "echo bad >&2; exit 5"], what="pack")
    with pytest.raises(BuildError, match=r"^mkfs: command no-such-tool-x not found \(run "
                       r"./build.sh setup"):
        run(["no-such-tool-x"], what="mkfs")


def test_stream_hands_over_stdout_and_stderr_in_order_and_returns_the_status() -> None:
    lines: list[bytes] = []
    status = proc.stream(["sh", "-c", "echo a; echo b >&2; echo c; exit 3"], lines.append)
    assert (status, lines) == (3, [b"a\n", b"b\n", b"c\n"])
    with pytest.raises(proc.NotFound, match="spawn no-such-tool-x: not found"):
        proc.stream(["no-such-tool-x"], lines.append)


def test_stream_ends_the_whole_group_when_the_reader_gives_up(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    script = f"sleep 300 & echo $! > {pidfile}; echo started; wait"

    def give_up(line: bytes) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        proc.stream(["sh", "-c", script], give_up)
    assert proc.wait_until(lambda: _gone(int(pidfile.read_text())), 5)


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
