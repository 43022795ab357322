"""``guestinit-bench compare``: exit codes, verdicts, machine checks, JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import cli
from bench.cli_reports import compare_docs
from bench.stats import Verdict
from tests.bench.suitedoc import suite_doc, write_suite


def _compare(tmp_path: Path, old: dict[str, Any], new: dict[str, Any],
             *extra: str) -> int:
    a = write_suite(tmp_path / "old", old)
    b = write_suite(tmp_path / "new", new)
    return cli.main(["compare", str(a.parent), str(b), *extra])


def test_identical_suites_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _compare(tmp_path, suite_doc(), suite_doc()) == 0
    out = capsys.readouterr().out
    assert "result: no regression" in out
    assert "REGRESSION" not in out and "UNCHANGED" in out


def test_a_variant_20_percent_slower_exits_1_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _compare(tmp_path, suite_doc(), suite_doc({"busybox": 1.2})) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("busybox") and " ready_s " in x)
    assert "+20.0%" in line and line.endswith("REGRESSION")
    guestinit = next(x for x in out.splitlines()
                     if x.startswith("guestinit") and " ready_s " in x)
    assert "UNCHANGED" in guestinit
    assert "busybox ready_s" in out.splitlines()[-1]


def test_a_faster_new_suite_is_an_improvement_and_exits_0(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _compare(tmp_path, suite_doc(), suite_doc({"guestinit": 0.8})) == 0
    assert "IMPROVEMENT" in capsys.readouterr().out


def test_the_threshold_is_in_percent(tmp_path: Path) -> None:
    assert _compare(tmp_path, suite_doc(), suite_doc({"systemd": 1.2}), "--threshold", "25") == 0


def test_a_truncated_suite_exits_2_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_suite(tmp_path / "old", suite_doc())
    bad = tmp_path / "new.json"
    bad.write_text(good.read_text()[:500])
    assert cli.main(["compare", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"guestinit-bench compare: {bad}: not JSON (truncated?)")


def test_a_missing_suite_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_suite(tmp_path / "old", suite_doc())
    assert cli.main(["compare", str(good), str(tmp_path / "none")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_schema_version_2_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _compare(tmp_path, suite_doc(), {**suite_doc(), "schema": 2}) == 2
    assert "schema version 2" in capsys.readouterr().err


def test_another_machine_exits_2_naming_the_keys_unless_allowed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = suite_doc()
    other["machine"].update(accel="kvm", cores=16)
    other["machine"]["name"] = "kvm-16c"  # the label alone does not count
    assert _compare(tmp_path, suite_doc(), other) == 2
    err = capsys.readouterr().err
    assert err.startswith("guestinit-bench compare: different machines (cores: 2 vs 16; "
                          "accel: 'tcg' vs 'kvm')")
    assert _compare(tmp_path, suite_doc(), other, "--allow-other-machine") == 0
    assert "machines differ in cores, accel" in capsys.readouterr().out
    slower = suite_doc({"guestinit": 1.2})
    slower["machine"].update(accel="kvm")
    assert _compare(tmp_path, suite_doc(), slower, "--allow-other-machine") == 1


def test_a_variant_on_one_side_is_reported_and_none_in_common_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = suite_doc()
    new["variants"]["guestinit-erofs"] = new["variants"].pop("systemd")
    assert _compare(tmp_path, suite_doc(), new) == 0
    out = capsys.readouterr().out
    assert "only in OLD: systemd" in out and "only in NEW: guestinit-erofs" in out
    alone = suite_doc()
    alone["variants"] = {"x": alone["variants"]["busybox"]}
    alone["ratios"] = {}
    assert _compare(tmp_path, suite_doc(), alone) == 2
    assert "no common variant" in capsys.readouterr().err


def test_json_output_carries_every_row(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert _compare(tmp_path, suite_doc(), suite_doc({"guestinit": 1.2}), "--json") == 1
    data = json.loads(capsys.readouterr().out)
    assert data["regression"] is True and data["threshold"] == 0.05
    rows = {(r["variant"], r["metric"]): r for r in data["rows"]}
    assert rows[("guestinit", "ready_s")]["verdict"] == "regression"
    assert rows[("guestinit", "stage:modules")]["change"] == pytest.approx(0.2)
    assert rows[("busybox", "ready_s")]["n_old"] == 4
    assert ("busybox", "stage:early") not in rows  # busybox has no stages


def test_compare_docs_covers_ready_userspace_and_each_stage() -> None:
    cmp = compare_docs(suite_doc(), suite_doc({"guestinit": 1.2}), 0.05, floor=0.0)
    metrics = [r.metric for r in cmp.rows if r.variant == "guestinit"]
    assert metrics == ["ready_s", "userspace_s", "stage:early", "stage:config",
                       "stage:mounts", "stage:modules", "stage:devices", "stage:ready"]
    assert all(r.change is not None and r.change.verdict is Verdict.REGRESSION
               for r in cmp.rows if r.variant == "guestinit")


def test_changes_below_the_absolute_floor_are_no_change() -> None:
    # every guestinit number 20% slower: seconds-long ready_s regresses, a stage whose
    # median moves by less than the 2 ms floor does not, whatever its percent
    cmp = compare_docs(suite_doc(), suite_doc({"guestinit": 1.2}), 0.05)
    rows = {r.metric: r.change for r in cmp.rows if r.variant == "guestinit"}
    ready = rows["ready_s"]
    assert ready is not None and ready.verdict is Verdict.REGRESSION
    small = [c for c in rows.values()
             if c is not None and abs(c.new_median - c.old_median) < 0.002]
    assert small and all(c.verdict is Verdict.UNCHANGED and "floor" in c.note for c in small)


def test_a_metric_with_values_on_one_side_only_has_no_verdict() -> None:
    old = suite_doc()
    for run in old["variants"]["systemd"]["runs"]:
        run["userspace_s"] = None
    cmp = compare_docs(old, suite_doc(), 0.05)
    row = next(r for r in cmp.rows if (r.variant, r.metric) == ("systemd", "userspace_s"))
    assert row.change is None and (row.n_old, row.n_new) == (0, 5)
