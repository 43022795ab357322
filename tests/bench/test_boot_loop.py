"""The harness loop against a stand-in VMM: frame handling, judging, never leaving a VMM."""

from __future__ import annotations

import io
import json
from pathlib import Path

from bench.boot import BootOptions, BootResult, boot
from bench.image import Image
from bench.report import text, to_json
from tests.bench.conftest import still_running, vmm_processes


def _boot(image: Image, vmm: str, tmp_path: Path, mode: str, **kw: object) -> BootResult:
    opts = BootOptions(append=f"fake.mode={mode}", accel="tcg", qemu=vmm,
                       workdir=str(tmp_path / f"run-{mode}"), timeout=10, **kw)  # type: ignore[arg-type]
    before = vmm_processes()
    res = boot(image, opts, progress=io.StringIO())
    assert vmm_processes() - before == set(), "the harness left a VMM process behind"
    return res


def test_ready_then_powerdown_then_shutdown_is_ok(paper_image: Image, fake_vmm: str,
                                                 tmp_path: Path) -> None:
    res = _boot(paper_image, fake_vmm, tmp_path, "ok")
    assert res.ok, res.reason
    assert [r.frame.type.value for r in res.frames] == ["hello", "ready", "shutdown"]
    t = res.timings
    assert t["guest_first_frame_ns"] == 10 and t["guest_init_exec_ns"] == 100
    assert t["guest_ready_ns"] == 300 and 0 < t["host_ready_s"] < 10
    assert "result: OK" in text(res)
    doc = json.loads(json.dumps(to_json(res)))
    assert doc["ok"] is True and [f["type"] for f in doc["frames"]][-1] == "shutdown"


def test_frames_split_into_single_bytes_are_reassembled(paper_image: Image, fake_vmm: str,
                                                        tmp_path: Path) -> None:
    res = _boot(paper_image, fake_vmm, tmp_path, "split")
    assert res.ok, res.reason


def test_malformed_frames_are_reported_and_fail_the_boot(paper_image: Image, fake_vmm: str,
                                                         tmp_path: Path) -> None:
    res = _boot(paper_image, fake_vmm, tmp_path, "junk")
    assert [r.frame.type.value for r in res.frames] == ["hello", "ready", "shutdown"]
    assert len(res.errors) == 2
    assert not res.ok
    assert "2 malformed frame(s)" in res.reason
    assert "bad input from the guest: undecodable frame" in text(res)


def test_a_bad_length_prefix_drops_the_rest_of_the_stream(paper_image: Image, fake_vmm: str,
                                                          tmp_path: Path) -> None:
    res = _boot(paper_image, fake_vmm, tmp_path, "badlength")
    assert [r.frame.type.value for r in res.frames] == ["hello"]
    assert res.errors == ["frame length 4294967295 outside 1..65536"]
    assert res.reason == (
        "the report stream broke (frame length 4294967295 outside 1..65536); "
        "no ready can follow")
    assert "console log: " in text(res)


def test_vmm_dying_before_ready_is_a_failure(paper_image: Image, fake_vmm: str,
                                             tmp_path: Path) -> None:
    res = _boot(paper_image, fake_vmm, tmp_path, "die")
    assert res.qemu_rc == 3
    assert res.reason == ("QEMU exited (status 3) before the guest was ready "
                          "(no frame arrived on the report port or the console)")


def test_no_shutdown_frame_after_powerdown_is_a_failure(paper_image: Image, fake_vmm: str,
                                                        tmp_path: Path) -> None:
    res = _boot(paper_image, fake_vmm, tmp_path, "noshutdown")
    assert res.reason.startswith("the guest was ready but sent no shutdown frame; "
                                 "system_powerdown is an ACPI power button press")


def test_guest_ignoring_powerdown_is_quit_then_killed(paper_image: Image, fake_vmm: str,
                                                      tmp_path: Path) -> None:
    res = _boot(paper_image, fake_vmm, tmp_path, "stubborn", powerdown_grace=1.0)
    assert not res.ok
    assert res.forced == "quit"
    assert res.qemu_rc == -9
    assert "no shutdown frame (QEMU stopped with quit)" in res.reason


def test_qemu_that_cannot_start_is_reported(paper_image: Image, tmp_path: Path) -> None:
    res = _boot(paper_image, "/bin/false", tmp_path, "ok")
    assert res.reason == "QEMU exited (status 1) before connecting the QMP monitor"


def test_hold_until_text_that_never_shows_fails_but_still_shuts_down(
    paper_image: Image, fake_vmm: str, tmp_path: Path
) -> None:
    res = _boot(paper_image, fake_vmm, tmp_path, "ok", hold_until="never printed")
    assert res.reason == "'never printed' did not appear on the console within 10s after ready"
    assert [r.frame.type.value for r in res.frames] == ["hello", "ready", "shutdown"]
    assert res.forced == "" and res.qemu_rc == 0


def test_sigterm_to_the_harness_stops_the_vmm(paper_image: Image, fake_vmm: str,
                                              tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    harness = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "boot", paper_image.directory, "--qemu", fake_vmm,
         "--accel", "tcg", "--append", "fake.mode=stubborn"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the VMM is the harness's child: once the harness is gone it would be re-parented,
    # so it is remembered (pid and start time) while it is still in the harness's tree
    started: set[psutil.Process] = set()
    deadline = time.monotonic() + 10
    while not started and time.monotonic() < deadline:
        time.sleep(0.05)
        started = vmm_processes(psutil.Process(harness.pid))
    assert started, "the stand-in VMM never started"
    time.sleep(1.0)  # ready is in; the harness now waits for a shutdown that never comes
    os.kill(harness.pid, signal.SIGTERM)
    out, _ = harness.communicate(timeout=20)
    assert harness.returncode == 130, out
    assert "interrupted; QEMU stopped" in out
    assert still_running(started) == set()


def test_an_init_that_cannot_start_is_named_from_the_console(paper_image: Image,
                                                             fake_vmm: str,
                                                             tmp_path: Path) -> None:
    res = _boot(paper_image, fake_vmm, tmp_path, "nostart")
    assert not res.ok and not res.frames
    assert res.reason == (
        "QEMU exited (status 0) before the guest was ready (no frame arrived on the report "
        "port or the console); the console says: guestinit: cannot start: "
        "ModuleNotFoundError: No module named 'guestinit.__main__' (the image lacks part of "
        "guestinit or its Python modules); powering off")
