"""bench.suite_schema and bench.suite_report: validation, Markdown, OpenMetrics, charts."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from bench import cli, suite_report
from bench.suite_charts import median_spans
from bench.suite_schema import SuiteError, load_suite, validate
from tests.bench.suitedoc import FAIL_REASON, suite_doc, write_suite

SVG = "{http://www.w3.org/2000/svg}"


def test_the_crafted_doc_is_valid_and_loads_from_a_dir_or_the_file(tmp_path: Path) -> None:
    doc = suite_doc()
    assert validate(doc) is doc
    path = write_suite(tmp_path / "r", doc)
    assert load_suite(tmp_path / "r") == doc
    assert load_suite(path) == doc


def test_a_missing_machine_key_is_named_with_its_json_path(tmp_path: Path) -> None:
    doc = suite_doc()
    del doc["machine"]["accel"]
    path = write_suite(tmp_path, doc)
    with pytest.raises(SuiteError, match=r"suite\.json: schema mismatch at \$\.machine: "
                       r"'accel' is a required property"):
        load_suite(path)


def test_a_bad_nested_value_names_its_path() -> None:
    doc = suite_doc()
    doc["variants"]["busybox"]["ready_s"]["median"] = "fast"
    with pytest.raises(SuiteError, match=r"\$\.variants\.busybox\.ready_s\.median"):
        validate(doc, "x")


def test_missing_truncated_and_other_version_files_say_so(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match=r"nope: no such file or directory$"):
        load_suite(tmp_path / "nope")
    with pytest.raises(SuiteError, match=r"/suite\.json: no such file$"):
        load_suite(tmp_path)
    text = json.dumps(suite_doc())
    (tmp_path / "t.json").write_text(text[: len(text) // 2])
    with pytest.raises(SuiteError, match=r"t\.json: not JSON \(truncated\?\)"):
        load_suite(tmp_path / "t.json")
    (tmp_path / "v.json").write_text(json.dumps({**suite_doc(), "schema": 2}))
    with pytest.raises(SuiteError, match=r"v\.json: schema version 2; .* reads version 1"):
        load_suite(tmp_path / "v.json")


def test_markdown_has_a_row_per_variant_with_its_numbers() -> None:
    doc = suite_doc()
    md = suite_report.markdown(doc)
    for name, v in doc["variants"].items():
        r = v["ready_s"]
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {r['median']:.3f} |" in row
        assert f"| {r['min']:.3f}\u2013{r['max']:.3f} |" in row
        assert f"| {v['n_ok']}/{v['n_failed']} |" in row
        assert f"| {v['metrics']['userspace_s']['median']:.3f} |" in row
    assert "| p2_ready_vs_busybox | guestinit / busybox | 1.08 | <= 1.15 | PASS |" in md
    # P3 is an at-least goal: systemd's userspace is 3.38x ours, more than the 3x asked for
    assert "| p3_systemd_vs_guestinit_userspace | systemd / guestinit | 3.38 | >= 3 | PASS |" in md
    assert f"- busybox run 3: {FAIL_REASON}" in md
    assert "accel tcg, -cpu max, entropy rdrand+virtio-rng" in md
    assert "| modules | 120.0 |" in md
    assert "- pci_subsys_init: 41.0" in md


def test_a_host_that_changed_speed_between_boots_is_named() -> None:
    """Run /init is kernel time: a spread over 20% within one variant is the host, and the
    report says so; the crafted suite's steady runs get no such line."""
    doc = suite_doc()
    assert "Host speed" not in suite_report.markdown(doc)
    runs = doc["variants"]["guestinit"]["runs"]
    runs[1]["guest_run_init_s"] = runs[0]["guest_run_init_s"] * 1.4
    md = suite_report.markdown(doc)
    line = next(x for x in md.splitlines() if x.startswith("Host speed"))
    assert "guestinit " in line and "busybox" not in line and "Compare userspace" in line


def test_pass_if_overrides_the_default_goal() -> None:
    assert suite_report.ratio_verdict("p2_x", {"value": 1.2, "target": 1.15}) == "MISS"
    assert suite_report.ratio_verdict("p3_x", {"value": 2.9, "target": 3.0}) == "MISS"
    assert suite_report.ratio_verdict("p2_x", {"value": 1.2, "target": 1.15,
                                               "pass_if": ">="}) == "PASS"
    assert suite_report.ratio_verdict("p3_x", {"value": None, "target": 3.0}) == "NO DATA"
    doc = suite_doc()
    doc["ratios"]["p2_ready_vs_busybox"]["pass_if"] = "=="
    with pytest.raises(SuiteError, match=r"\$\.ratios\.p2_ready_vs_busybox\.pass_if"):
        validate(doc)


def test_openmetrics_round_trips_the_medians_and_counts() -> None:
    doc = suite_doc()
    text = suite_report.openmetrics(doc)
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ready = families["guestinit_bench_ready_seconds"]
    assert ready.type == "summary" and ready.unit == "seconds"
    for name, v in doc["variants"].items():
        samples = [s for s in ready.samples if s.labels.get("variant") == name]
        assert all(s.labels["machine"] == "tcg-2c" for s in samples)
        q = {s.labels["quantile"]: s.value for s in samples if "quantile" in s.labels}
        assert q["0.5"] == pytest.approx(v["ready_s"]["median"])
        assert q["0.25"] == pytest.approx(v["ready_s"]["q1"])
        count = next(s.value for s in samples if s.name.endswith("_count"))
        assert count == v["n_ok"]
        ok = next(s for s in families["guestinit_bench_runs_ok"].samples
                  if s.labels["variant"] == name)
        failed = next(s for s in families["guestinit_bench_runs_failed"].samples
                      if s.labels["variant"] == name)
        assert (ok.value, failed.value) == (v["n_ok"], v["n_failed"])
        user = next(s for s in families["guestinit_bench_metric_median_seconds"].samples
                    if s.labels["variant"] == name and s.labels["metric"] == "userspace_s")
        assert user.value == pytest.approx(v["metrics"]["userspace_s"]["median"])
    ratio = next(s for s in families["guestinit_bench_ratio"].samples
                 if s.labels["ratio"] == "p2_ready_vs_busybox")
    assert ratio.value == pytest.approx(doc["ratios"]["p2_ready_vs_busybox"]["value"])


def test_a_variant_without_ok_runs_still_renders() -> None:
    doc = suite_doc()
    v = doc["variants"]["systemd"]
    for run in v["runs"]:
        run["ok"] = False
    v.update(n_ok=0, n_failed=len(v["runs"]))
    v["ready_s"] = dict.fromkeys(v["ready_s"], None) | {"n_ok": 0, "n_failed": 5}
    doc["ratios"]["p3_systemd_vs_guestinit_userspace"]["value"] = None
    validate(doc)
    assert "| systemd | systemd | initramfs | — |" in suite_report.markdown(doc)
    assert "NO DATA" in suite_report.markdown(doc)
    families = {f.name: f for f in text_string_to_metric_families(suite_report.openmetrics(doc))}
    assert not [s for s in families["guestinit_bench_ready_seconds"].samples
                if s.labels.get("variant") == "systemd" and "quantile" in s.labels]


def _gids(path: Path, prefix: str) -> list[str]:
    root = ET.parse(path).getroot()
    return [el.get("id", "") for el in root.iter(f"{SVG}g")
            if el.get("id", "").startswith(prefix)]


def test_write_all_writes_well_formed_reproducible_files(tmp_path: Path) -> None:
    doc = suite_doc()
    written = suite_report.write_all(doc, tmp_path / "a")
    assert [p.name for p in written] == list(suite_report.OUTPUTS)
    assert not (tmp_path / "a" / "suite.json").exists()
    bars = _gids(tmp_path / "a" / "timeline.svg", "span-")
    expected = [f"span-{name}-{span}".replace("+", "_").replace("->", "_")
                for name, v in doc["variants"].items() for span, _, _ in median_spans(v)]
    assert bars == expected
    assert len(bars) == sum(len(median_spans(v)) for v in doc["variants"].values()) == 18
    ET.parse(tmp_path / "a" / "distribution.svg")
    assert (tmp_path / "a" / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    suite_report.write_all(doc, tmp_path / "b")
    for name in ("timeline.svg", "distribution.svg", "suite.md", "suite.prom"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_median_spans_take_the_median_start_and_end_over_ok_runs() -> None:
    v = {"runs": [
        {"ok": True, "spans": [{"name": "k", "start_s": 0.0, "end_s": 1.0}]},
        {"ok": True, "spans": [{"name": "k", "start_s": 0.2, "end_s": 3.0}]},
        {"ok": True, "spans": [{"name": "k", "start_s": 0.1, "end_s": 2.0},
                               {"name": "k", "start_s": 2.0, "end_s": 2.5}]},
        {"ok": False, "spans": [{"name": "k", "start_s": 9.0, "end_s": 99.0}]}]}
    assert median_spans(v) == [("k", 0.1, 2.0), ("k#2", 2.0, 2.5)]


def test_report_command_renders_each_format(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    doc = suite_doc()
    write_suite(tmp_path, doc)
    assert cli.main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out == suite_report.markdown(doc)
    assert cli.main(["report", str(tmp_path / "suite.json"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == doc
    out = tmp_path / "m.prom"
    assert cli.main(["report", str(tmp_path), "--format", "openmetrics", "--out", str(out)]) == 0
    assert out.read_text() == suite_report.openmetrics(doc)
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path), "--format", "svg", "--out",
                     str(tmp_path / "svg")]) == 0
    assert sorted(p.name for p in (tmp_path / "svg").iterdir()) == ["distribution.svg",
                                                                    "timeline.svg"]
    assert cli.main(["report", str(tmp_path), "--format", "all"]) == 0
    assert all((tmp_path / name).exists() for name in suite_report.OUTPUTS)
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("guestinit-bench report: ")


def test_a_kata_machine_suite_is_valid_and_its_table_splits_the_boot(tmp_path: Path) -> None:
    """suite --machine kata writes root "kata"; the table shows VMM + firmware (OVMF under
    Kata's machine), the kernel and the init apart."""
    from bench.suite_report import markdown

    doc = suite_doc()
    for entry in doc["variants"].values():
        entry["root"] = "kata"
    doc["machine"]["machine_type"] = "q35 + OVMF (Kata's machine, bench/kata.py)"
    assert validate(doc) is doc
    doc["variants"]["guestinit"]["root"] = "kata disk"
    with pytest.raises(SuiteError, match=r"\$\.variants\.guestinit\.root"):
        validate(doc)
    doc["variants"]["guestinit"]["root"] = "kata"
    head = next(line for line in markdown(doc).splitlines() if line.startswith("| variant"))
    assert "| VMM + firmware median s | Run /init median s | userspace median s |" in head
