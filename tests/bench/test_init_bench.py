"""``guestinit-bench init`` for real: the init as PID 1 of a PID namespace (needs root)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from bench import init_bench, init_report


def _init_pids() -> set[int]:
    """PIDs of any ``python -m guestinit --root`` still running (none may be left behind)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"guestinit" in argv and b"--root" in argv:
            pids.add(int(entry.name))
    return pids


def test_two_runs_write_samples_medians_ratio_and_stages(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _init_pids()
    out_json = tmp_path / "x.json"
    assert init_bench.main(["--runs", "2", "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    inits, pythons = data["samples_ms"]["init"], data["samples_ms"]["python"]
    assert len(inits) == 2 and all(v > 0 for v in inits)
    assert len(pythons) == 2 and all(v > 0 for v in pythons)
    assert data["median_ms"]["init"] == statistics.median(inits)
    assert data["ratio"] == statistics.median(inits) / statistics.median(pythons)
    assert data["target_met"] == (data["ratio"] <= 3)
    stages = data["stage_median_ms"]
    assert "early" in stages and "ready" in stages
    assert all(len(v) == 2 for v in data["stage_samples_ms"].values())
    assert data["host_median_ms"]["exec -> early"] > 0
    for key in ("python_version", "cpu_count", "kernel", "date"):
        assert data[key]
    out, err = capsys.readouterr()
    assert "run 2/2: init " in err and "warm-up 2/2" in err
    assert "python3 -I -S -c pass" in out and "guestinit exec -> ready" in out
    assert "ratio (median)" in out and "target <= 3:" in out
    assert _init_pids() <= before


def test_the_one_executable_runs_as_the_init_and_as_the_baseline(tmp_path: Path) -> None:
    """--executable build: the image's executable as PID 1 (its start-up split into
    start:python and start:imports on the timeline) next to itself run as python3.11."""
    out_json = tmp_path / "x.json"
    assert init_bench.main(["--runs", "2", "--executable", "build",
                            "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    assert data["executable"] == "build"
    stages = data["stage_median_ms"]
    assert stages["start:python"] > 0 and stages["start:imports"] > 0 and "ready" in stages
    # exec -> early counts up to the first stage, the start-up spans included
    assert data["host_median_ms"]["exec -> early"] >= stages["start:python"]


def test_an_executable_that_is_not_one_is_refused(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert init_bench.main(["--runs", "1", "--executable", str(tmp_path / "nope")]) == 1
    assert "not an executable file" in capsys.readouterr().err


def test_failed_frame_stops_the_bench_with_its_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _init_pids()
    out_json = tmp_path / "x.json"
    rc = init_bench.main(["--runs", "2", "--append", "guestinit.log=loud", "--json", str(out_json)])
    assert rc == 1
    _, err = capsys.readouterr()
    assert "warm-up 1/2:" in err and "failed frame (stage config)" in err
    assert "guestinit.log" in err and "loud" in err
    assert "init output (last lines):" in err
    assert not out_json.exists()
    assert _init_pids() <= before


def test_a_leading_double_dash_from_the_top_level_parser_is_dropped(
        capsys: pytest.CaptureFixture[str]) -> None:
    # ``guestinit-bench init -- --runs 0`` reaches main as ["--", "--runs", "0"]: the
    # option must still be read (and here rejected), not taken as a stray word.
    with pytest.raises(SystemExit):
        init_bench.main(["--", "--runs", "0"])
    assert "0 is not a positive count" in capsys.readouterr().err


def test_the_gate_fails_only_a_ratio_above_it() -> None:
    assert init_report.gate_line(2.4, None) == (True, None)
    passed, line = init_report.gate_line(2.4, 3.0)
    assert passed and line == "gate: median ratio 2.400 within the gate 3: passed"
    assert init_report.gate_line(3.0, 3.0)[0]  # "exceeds": equal passes
    passed, line = init_report.gate_line(3.2, 3.0)
    assert not passed and line == "gate: median ratio 3.200 exceeds the gate 3: FAILED"


@pytest.mark.parametrize("text", ["0", "-1", "inf", "nan", "three"])
def test_the_gate_must_be_a_positive_ratio(text: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        init_bench.main(["--gate", text])
    assert f"{text} is not a positive ratio" in capsys.readouterr().err


def test_a_real_run_above_the_gate_exits_1_after_the_table(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No ratio is below 0.001 (the init cannot start faster than a bare interpreter
    # a thousandfold), so the outcome does not depend on the machine's speed.
    before = _init_pids()
    out_json = tmp_path / "x.json"
    assert init_bench.main(["--runs", "1", "--gate", "0.001", "--json", str(out_json)]) == 1
    out, _ = capsys.readouterr()
    assert "ratio (median)" in out
    ratio = json.loads(out_json.read_text())["ratio"]
    assert f"gate: median ratio {ratio:.3f} exceeds the gate 0.001: FAILED" in out
    assert _init_pids() <= before
