from __future__ import annotations

import errno
import os
import sys
import time

import pytest

from guestinit.process import ProcessTable


def test_exit_codes_and_signals_come_from_our_reaper() -> None:
    procs = ProcessTable()
    ok = procs.spawn([sys.executable, "-c", "raise SystemExit(0)"])
    bad = procs.spawn([sys.executable, "-c", "raise SystemExit(7)"])
    assert procs.wait(ok, 10) == 0
    assert procs.wait(bad, 10) == 7
    sleeper = procs.spawn([sys.executable, "-c", "import time; time.sleep(30)"])
    assert procs.poll(sleeper) is None
    procs.kill(sleeper, 9)
    assert procs.wait(sleeper, 10) == -9


def test_reaper_collects_children_it_did_not_start_without_confusing_ours() -> None:
    procs = ProcessTable()
    foreign = os.fork()
    if foreign == 0:
        os._exit(0)
    ours = procs.spawn([sys.executable, "-c", "raise SystemExit(4)"])
    deadline = time.monotonic() + 10
    while procs.poll(ours) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    procs.reap()
    assert procs.poll(ours) == 4
    assert procs.orphans_reaped == 1


def test_spawn_failure_names_the_program() -> None:
    procs = ProcessTable()
    with pytest.raises(OSError) as err:
        procs.spawn(["/nonexistent/daemon", "--x"])
    assert err.value.errno == errno.ENOENT
    assert "/nonexistent/daemon" in str(err.value)
    assert procs.running() == []


def test_run_captures_output_and_times_out() -> None:
    procs = ProcessTable()
    code, out = procs.run([sys.executable, "-c", "print('hi'); import sys; "
                           "print('err', file=sys.stderr); raise SystemExit(3)"], timeout=10)
    assert code == 3 and "hi" in out and "err" in out
    with pytest.raises(TimeoutError, match=r"did not finish within 0\.3s"):
        procs.run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.3)
    assert procs.running() == []


def test_spawn_applies_limits(tmp_path: object) -> None:
    procs = ProcessTable()
    code, out = procs.run(
        [sys.executable, "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE))"
         "; print(open('/proc/self/oom_score_adj').read())"],
        timeout=10, nofile=4096, oom_score_adj=500)
    assert code == 0
    assert "(4096, 4096)" in out and "500" in out


def test_on_exit_callback() -> None:
    procs = ProcessTable()
    seen: list[tuple[int, int]] = []
    pid = procs.spawn([sys.executable, "-c", "raise SystemExit(2)"],
                      on_exit=lambda p, c: seen.append((p, c)))
    procs.wait(pid, 10)
    assert seen == [(pid, 2)]


def test_finished_children_are_forgotten_beyond_the_last_few() -> None:
    from guestinit import process

    table = process.ProcessTable()
    pids = [table.spawn(["/bin/true"]) for _ in range(process.MAX_FINISHED + 20)]
    deadline = time.monotonic() + 30
    while table.running() and time.monotonic() < deadline:
        table.reap()
        time.sleep(0.01)
    assert not table.running()
    assert len(table._status) <= process.MAX_FINISHED
    assert table.poll(pids[-1]) == 0  # the newest are still there to be asked
    try:
        table.poll(pids[0])
    except KeyError:
        pass  # the oldest were dropped: the table is bounded
    else:
        raise AssertionError("the oldest finished child should have been forgotten")
