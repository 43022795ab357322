"""The bench suite end to end: guestinit and both baselines booted in QEMU, interleaved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import cli
from bench.suite_schema import load_suite
from rootfs import proc
from tests.vm.conftest import REPO, _builder

pytestmark = pytest.mark.vm

BASELINES = ("baseline-busybox", "baseline-systemd")


@pytest.fixture(scope="session")
def images(cpu_image: str) -> Path:
    """out/ with cpu and both baselines (./build.sh test builds them; else built here)."""
    out = Path(cpu_image).parent
    for name in BASELINES:
        if not (out / name / "initramfs.img").is_file():
            try:
                proc.run([_builder(), "image", name, "--out", str(out / name)], timeout=1800,
                         cwd=str(REPO))
            except proc.RunError as exc:
                pytest.fail(f"building {name} for the suite test failed:\n{exc}")
    return out


def test_one_run_suite_of_guestinit_and_both_baselines_passes(
        images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = tmp_path / "result"
    rc = cli.main(["suite", "--runs", "1", "--warmup", "0", "--images", str(images),
                   "--variants", "guestinit,busybox,systemd", "--out", str(result)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err + (result / "suite.md").read_text()
    doc = load_suite(result)  # validates against the schema
    for name in ("guestinit", "busybox", "systemd"):
        entry = doc["variants"][name]
        assert (entry["n_ok"], entry["n_failed"]) == (1, 0), entry["failures"]
        run = entry["runs"][0]
        # the kernel's Run /init mark reaches the host from every init, quiet or not
        assert 0 < run["guest_run_init_s"] < run["guest_ready_s"] < run["host_ready_s"]
        assert run["host_first_output_s"] < run["host_ready_s"] < run["host_exit_s"]
        assert run["spans"][0]["name"] == "vmm+firmware"
    stages = [s["name"] for s in doc["variants"]["guestinit"]["runs"][0]["stages"]]
    assert stages[0] == "early" and stages[-1] == "ready"
    assert doc["machine"]["cpu"] == "qemu64,+rdrand" and doc["machine"]["entropy"] == "rdrand"
    assert doc["ratios"]["p2_ready_vs_busybox"]["value"] > 0
    for name in ("suite.md", "timeline.svg", "timeline.png", "distribution.svg", "suite.prom"):
        assert (result / name).stat().st_size > 0, name
    assert "| guestinit |" in captured.out  # the table is printed too
    assert json.loads((result / "suite.json").read_text())["schema"] == 1
