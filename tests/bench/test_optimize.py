"""guestinit-bench optimize: candidate specs, acceptance on synthetic measurements,
composition, the replaced cmdline, the report, and the command on the stand-in VMM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import cli, optimize, optimize_report
from bench.boot import BootOptions, prepare
from bench.image import kernel_words, load
from bench.optimize import Candidate, Decision, Kind, OptimizeError, decide
from bench.stats import Verdict
from bench.suite_schema import load_suite

ROOTHASH = "ab" * 32
TABLE = ('dm-mod.create="vroot,,,ro,0 8 verity 1 /dev/vda /dev/vdb 4096 4096 1 1 sha256 '
         f'{ROOTHASH} 00"')


def image_dir(path: Path, cmdline: str = "console=ttyS0 quiet", erofs: bool = False) -> Path:
    """Files laid out like guestinit-build output; the stand-in VMM reads none of them."""
    path.mkdir(parents=True)
    for name in ("vmlinuz", "initramfs.img"):
        (path / name).write_bytes(b"\0" * 16)
    (path / "cmdline.txt").write_text(cmdline + "\n")
    if erofs:
        (path / "rootfs.erofs").write_bytes(b"\0" * 4096)
        (path / "rootfs.verity").write_bytes(b"\0" * 4096)
        (path / "roothash.txt").write_text(ROOTHASH + "\n")
        (path / "cmdline-erofs.txt").write_text(
            f"{cmdline} {TABLE} root=/dev/dm-0 rootfstype=erofs ro init=/usr/sbin/init\n")
    return path


# -- acceptance ---------------------------------------------------------------------

BASE = [1.00, 1.02, 0.99, 1.01, 0.98]


def test_a_clearly_faster_candidate_is_accepted() -> None:
    d = decide(BASE, [0.80, 0.81, 0.79, 0.82, 0.80])
    assert d.accepted and d.reason == "faster beyond the noise"
    assert d.change is not None and d.change.verdict is Verdict.IMPROVEMENT
    assert d.change.ci_high is not None and d.change.ci_high < 0
    assert (d.base_median, d.median, d.n_ok, d.n_failed) == (1.00, 0.80, 5, 0)


def test_a_candidate_inside_the_noise_is_rejected() -> None:
    d = decide(BASE, [1.03, 1.01, 1.02, 1.04, 1.00])  # +2%
    assert not d.accepted and d.reason == "no change: within the 5% threshold"
    # beyond the threshold but noisy: the interval includes no change
    noisy = decide([1.0, 1.3, 0.7, 1.2, 0.8], [0.9, 1.25, 0.6, 0.95, 0.7])
    assert noisy.change is not None and noisy.change.verdict is Verdict.NOISE
    assert not noisy.accepted and "rerun with more --runs" in noisy.reason


def test_a_slower_candidate_is_rejected() -> None:
    d = decide(BASE, [1.20, 1.21, 1.19, 1.22, 1.20])
    assert not d.accepted and d.reason == "slower than the base beyond the noise"
    assert d.change is not None and d.change.verdict is Verdict.REGRESSION


def test_a_candidate_with_failed_runs_is_rejected_with_the_first_reason() -> None:
    faster = [0.80, 0.81, 0.79, 0.82]
    d = decide(BASE, faster, failures=["no ready frame after 120s", "other"])
    assert not d.accepted
    assert d.reason == "2 of 6 runs failed: no ready frame after 120s"
    assert d.change is not None and d.change.verdict is Verdict.IMPROVEMENT  # still shown
    none_ok = decide(BASE, [], failures=["guest failed in stage config: x"])
    assert not none_ok.accepted and none_ok.change is None and none_ok.median is None
    assert none_ok.reason == "1 of 1 runs failed: guest failed in stage config: x"


def test_the_threshold_and_floor_are_compares() -> None:
    assert not decide(BASE, [0.97, 0.98, 0.96, 0.97, 0.97]).accepted  # -3% < 5%
    assert decide(BASE, [0.97, 0.98, 0.96, 0.97, 0.97], threshold=0.02).accepted
    tiny = decide([0.010, 0.010, 0.010], [0.009, 0.009, 0.009])  # -10%, but 1 ms
    assert not tiny.accepted and tiny.reason == "no change: change below the absolute floor"
    assert decide([0.010] * 3, [0.009] * 3, floor=0.0).accepted


# -- candidate specs ----------------------------------------------------------------

def test_candidate_specs_parse(tmp_path: Path) -> None:
    quiet = optimize.parse_candidate("quiet=cmdline:quiet loglevel=4")
    assert (quiet.kind, quiet.words) == (Kind.CMDLINE, ("quiet", "loglevel=4"))
    lvl = optimize.parse_candidate("lvl=cmdline:loglevel=4")  # '=' in the words
    assert (lvl.name, lvl.words, lvl.spec) == ("lvl", ("loglevel=4",), "cmdline:loglevel=4")
    img = optimize.parse_candidate(f"zstd=image:{tmp_path}")
    assert (img.kind, img.directory) == (Kind.IMAGE, str(tmp_path))
    assert optimize.parse_candidate("root=erofs") == Candidate("root", Kind.EROFS, "erofs")
    quoted = optimize.parse_candidate('q=cmdline:a="b c" d')
    assert quoted.words == ('a="b c"', "d")


@pytest.mark.parametrize(("spec", "message"), [
    ("quiet", r"candidate 'quiet': use NAME=cmdline:WORDS, NAME=image:DIR or NAME=erofs"),
    ("x=kernel:foo", r"candidate x: unknown kind 'kernel' in 'kernel:foo'; use NAME="),
    ("x=cmdline:", r"candidate x: cmdline: needs WORDS"),
    ("x=image:", r"candidate x: image: needs DIR"),
    ("x=erofs:yes", r"candidate x: erofs takes no value"),
    ("base=cmdline:quiet", r"candidate 'base': the name is reserved"),
    ("a/b=cmdline:quiet", r"candidate 'a/b': a name is"),
])
def test_bad_candidate_specs_name_the_candidate_and_the_fix(spec: str, message: str) -> None:
    with pytest.raises(OptimizeError, match=message):
        optimize.parse_candidate(spec)


def test_candidates_file_and_the_fast_preset(tmp_path: Path) -> None:
    f = tmp_path / "cands"
    f.write_text("# tried on the cpu image\nquiet=cmdline:quiet  # the UART\n\nroot=erofs\n")
    assert [c.name for c in optimize.read_candidates_file(f)] == ["quiet", "root"]
    preset = tmp_path / "fast.txt"
    preset.write_text("# c\nconsole=ttyS0   # harness\nquiet  # x\nloglevel=4\n")
    got = optimize.preset_candidates(preset)
    assert [(c.name, c.words) for c in got] == [("quiet", ("quiet",)),
                                                ("loglevel=4", ("loglevel=4",))]
    real = optimize.preset_candidates(optimize.fast_preset())
    assert "random.trust_cpu=on" in [c.name for c in real]
    assert not any(c.name.startswith("console=") for c in real)
    assert optimize.without_words("console=ttyS0 quiet panic=-1 loglevel=4", got) == (
        "console=ttyS0 panic=-1")


def test_plan_checks_everything_before_a_boot(tmp_path: Path) -> None:
    base = image_dir(tmp_path / "base")
    other = image_dir(tmp_path / "other", cmdline="console=ttyS0 other")
    cands = [optimize.parse_candidate(s) for s in
             ("lvl=cmdline:loglevel=4", f"img=image:{other}")]
    p = optimize.plan(str(base), None, cands)
    assert p.base_cmdline == "console=ttyS0 quiet"
    assert [v.name for v in p.variants] == ["base", "lvl", "img"]
    assert p.variants[1].append == "guestinit.agent=none loglevel=4"
    # an image candidate differs from the base by its files alone: the base's cmdline
    assert p.variants[2].cmdline == "console=ttyS0 quiet"
    assert p.images["img"].directory == str(other)

    def fails(cands: list[str], message: str, base_cmdline: str | None = None) -> None:
        with pytest.raises(OptimizeError, match=message):
            optimize.plan(str(base), base_cmdline,
                          [optimize.parse_candidate(s) for s in cands])

    fails(["a=cmdline:x", "a=cmdline:y"], "candidate a: given twice")
    fails(["q=cmdline:quiet"], r"candidate q: 'quiet' is already in the base cmdline.*"
          "--base-cmdline")
    fails([f"gone=image:{tmp_path / 'none'}"], r"candidate gone: image directory .* "
          "does not exist")
    fails(["root=erofs"], r"candidate root \(the base's erofs root\): .*rootfs.erofs is "
          "missing")
    assert optimize.plan(str(base), "console=ttyS0", [optimize.parse_candidate(
        "q=cmdline:quiet")]).base_cmdline == "console=ttyS0"
    with pytest.raises(OptimizeError, match=r"base .*none: image directory"):
        optimize.plan(str(tmp_path / "none"), None, cands)


# -- the replaced cmdline -------------------------------------------------------------

def test_boot_options_cmdline_replaces_the_image_words_and_keeps_the_verity_root(
        tmp_path: Path) -> None:
    d = image_dir(tmp_path / "img", cmdline="console=ttyS0 quiet loglevel=4", erofs=True)
    opts = BootOptions(accel="kvm", workdir=str(tmp_path / "w"), cmdline="console=ttyS0 x=1")
    res, _ = prepare(load(str(d)), opts)
    assert res.cmdline.split()[:2] == ["console=ttyS0", "x=1"]
    assert "quiet" not in res.cmdline.split()
    res, spec = prepare(load(str(d), erofs=True), opts)
    words = kernel_words(res.cmdline)
    assert words[:2] == ["console=ttyS0", "x=1"] and "quiet" not in words
    assert TABLE in words and "root=/dev/dm-0" in words and "init=/usr/sbin/init" in words
    assert spec.disks == [str(d / "rootfs.erofs"), str(d / "rootfs.verity")]
    res, _ = prepare(load(str(d)), BootOptions(accel="kvm", workdir=str(tmp_path / "w")))
    assert res.cmdline.startswith("console=ttyS0 quiet loglevel=4 ")  # None: the image's


# -- composition ----------------------------------------------------------------------

def _c(spec: str) -> Candidate:
    return optimize.parse_candidate(spec)


def test_composition_joins_words_picks_the_best_image_and_erofs(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    accepted = [(_c("q=cmdline:quiet loglevel=4"), 1.0), (_c(f"ia=image:{a}"), 0.9),
                (_c("lvl=cmdline:loglevel=4 tsc=reliable"), 1.0), (_c("ro=erofs"), 0.95),
                (_c(f"ib=image:{b}"), 0.8)]
    comp = optimize.compose("/base", accepted)
    assert comp.words == ("quiet", "loglevel=4", "tsc=reliable")
    assert (comp.directory, comp.image_from, comp.erofs_from) == (str(b), "ib", "ro")
    assert comp.candidates == ("q", "lvl", "ro", "ib")  # candidate order
    assert comp.notes == ("image candidate ia left out: ib has the lower median "
                          "(0.800 s vs 0.900 s)",)
    v = optimize.composition_variant(comp, "console=ttyS0")
    assert (v.name, v.erofs, v.cmdline) == ("composed", True, "console=ttyS0")
    assert v.append == "guestinit.agent=none quiet loglevel=4 tsc=reliable"
    plain = optimize.compose("/base", [(_c("q=cmdline:quiet"), 1.0)])
    assert (plain.directory, plain.erofs, plain.image_from) == ("/base", False, None)


def test_an_image_without_an_erofs_root_is_composed_on_its_initramfs(tmp_path: Path) -> None:
    img = image_dir(tmp_path / "img")
    comp = optimize.compose(str(tmp_path), [(_c(f"i=image:{img}"), 0.9), (_c("r=erofs"), 1.0)])
    kept, loaded = optimize.load_composition(comp)
    assert (kept.erofs, kept.candidates) == (False, ("i",))
    assert kept.notes[-1].startswith("r left out: the chosen image i has no erofs root")
    assert loaded.erofs is None and loaded.directory == str(img)


# -- the report -------------------------------------------------------------------------

def _measured(median: float, base: float = 1.0) -> Decision:
    return decide([base * f for f in (1.0, 1.01, 0.99)], [median * f for f in (1.0, 1.01, 0.99)])


def _doc(tmp_path: Path, confirmed: Decision | None) -> dict[str, Any]:
    from tests.bench.suitedoc import MACHINE, variant

    base = image_dir(tmp_path / "base")
    cands = [_c("q=cmdline:quiet"), _c("slow=cmdline:x=1")]
    p = optimize.plan(str(base), "console=ttyS0", cands)
    decisions = {"q": _measured(0.8), "slow": _measured(1.3)}
    comp = optimize.compose(p.base_dir, [(cands[0], 0.8)]) if confirmed else None
    return optimize_report.document(
        plan=p, decisions=decisions, base=variant("guestinit"), cmdline_from="--base-cmdline",
        machine=MACHINE, command=["guestinit-bench", "optimize"], comp=comp,
        confirmed=confirmed, why_not="keep the base: no candidate was faster beyond the noise",
        phases={"candidates": "phase1/suite.json",
                "composition": "phase2/suite.json" if confirmed else None},
        settings={"runs": 3, "warmup": 1, "order": "interleaved", "metric": "host_ready_s",
                  "threshold": 0.05, "floor_s": 0.002, "timeout_s": 60.0,
                  "memory_mib": 1024, "entropy": "rdrand"})


def test_the_report_validates_and_names_the_recommended_cmdline(tmp_path: Path) -> None:
    doc = _doc(tmp_path, _measured(0.75))
    optimize_report.validate(doc)
    assert [r["accepted"] for r in doc["candidates"]] == [True, False]
    assert doc["recommended"]["cmdline"] == "console=ttyS0 quiet"
    assert doc["composition"]["accepted"] and doc["composition"]["verdict"] == "improvement"
    md = optimize_report.markdown(doc)
    assert "- cmdline: `console=ttyS0 quiet`" in md
    assert "| q | cmdline | `cmdline:quiet` | 1.000 | 0.800 | -20.0% |" in md
    assert "rejected: slower than the base beyond the noise" in md
    assert "Machine: Intel(R) Xeon(R) CPU @ 2.20GHz, 2 cores, accel tcg" in md
    out = tmp_path / "out"
    written = optimize_report.write_all(doc, out)
    assert [p.name for p in written] == list(optimize_report.OUTPUTS)
    assert optimize_report.load(out)["recommended"] == doc["recommended"]
    svg = (out / "optimize.svg").read_text()
    assert 'id="change-q"' in svg and 'id="change-composed"' in svg
    optimize_report.write_all(doc, tmp_path / "again")  # byte-reproducible
    assert (tmp_path / "again" / "optimize.svg").read_text() == svg


def test_without_a_composition_the_base_is_recommended_and_bad_docs_fail(
        tmp_path: Path) -> None:
    doc = _doc(tmp_path, None)
    assert doc["composition"] is None and doc["recommended"]["candidates"] == []
    assert doc["recommended"]["cmdline"] == "console=ttyS0"
    assert "Not measured: keep the base: no candidate" in optimize_report.markdown(doc)
    not_faster = _doc(tmp_path / "n", _measured(1.0))
    assert not_faster["recommended"]["why"].startswith("keep the base: the composition was "
                                                       "not confirmed in phase 2 (no change")
    bad = {**doc, "candidates": [{**doc["candidates"][0], "kind": "kernel"}]}
    with pytest.raises(OptimizeError, match=r"schema mismatch at \$.candidates\[0\]"):
        optimize_report.validate(bad)


# -- the command on the stand-in VMM ----------------------------------------------------

def _run(tmp_path: Path, fake_vmm: str, *extra: str) -> int:
    return cli.main(["optimize", "--runs", "3", "--warmup", "0", "--accel", "tcg",
                     "--qemu", fake_vmm, "--timeout", "10", "--out", str(tmp_path / "out"),
                     *extra])


def test_optimize_end_to_end_on_the_stand_in_vmm(
        tmp_path: Path, fake_vmm: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = image_dir(tmp_path / "base")
    rc = _run(tmp_path, fake_vmm, "--base", str(base),
              "--base-cmdline", "console=ttyS0 fake.delay=0.25",
              "--candidate", "fast=cmdline:fake.delay=0", "--candidate",
              "slow=cmdline:fake.delay=0.5", "--candidate", "broken=cmdline:fake.mode=noshutdown")
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "[ 12/12] broken             run 3    FAILED" in err  # a progress line per boot
    res = tmp_path / "out"
    doc = optimize_report.load(res)
    rows = {r["name"]: r for r in doc["candidates"]}
    assert rows["fast"]["accepted"] and rows["fast"]["verdict"] == "improvement"
    assert not rows["slow"]["accepted"] and rows["slow"]["verdict"] == "regression"
    assert not rows["broken"]["accepted"] and rows["broken"]["n_failed"] == 3
    assert rows["broken"]["reason"].startswith("3 of 3 runs failed: the guest was ready but")
    comp = doc["composition"]
    assert comp["candidates"] == ["fast"] and comp["accepted"]
    assert doc["recommended"]["cmdline"] == "console=ttyS0 fake.delay=0.25 fake.delay=0"
    assert "- cmdline: `console=ttyS0 fake.delay=0.25 fake.delay=0`" in out
    phase1, phase2 = load_suite(res / "phase1"), load_suite(res / "phase2")
    assert list(phase1["variants"]) == ["base", "fast", "slow", "broken"]
    assert list(phase2["variants"]) == ["base", "composed"]
    composed = phase2["variants"]["composed"]["cmdline"].split()
    assert composed[:2] == ["console=ttyS0", "fake.delay=0.25"] and composed[-1] == "fake.delay=0"
    assert "quiet" not in composed  # --base-cmdline replaced cmdline.txt
    assert (res / "optimize.md").read_text().count("| broken | cmdline |") == 1
    assert (res / "optimize.png").stat().st_size > 0
    assert (res / "phase1" / "logs" / "broken-run1.console.log").is_file()
    assert cli.main(["report", str(res / "phase1")]) == 0  # report/compare read the phases
    # compare reads the phases; the base's own change between them is host noise on a
    # 0.25 s stand-in boot (5.6% once, with the suite's shuffled order), not under test here
    assert cli.main(["compare", "--threshold", "50", str(res / "phase1"),
                     str(res / "phase2")]) == 0


def test_a_base_that_never_boots_exits_2_with_the_reason(
        tmp_path: Path, fake_vmm: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = image_dir(tmp_path / "base")
    rc = cli.main(["optimize", "--base", str(base), "--base-cmdline", "fake.mode=die",
                   "--candidate", "q=cmdline:quiet", "--runs", "1", "--warmup", "0",
                   "--accel", "tcg", "--qemu", fake_vmm, "--timeout", "10",
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines()[-1].startswith(
        "guestinit-bench optimize: the base never booted (0 of 1 runs OK): ")
    doc = json.loads((tmp_path / "out" / "optimize.json").read_text())
    assert doc["composition"] is None and doc["phases"]["composition"] is None
    assert doc["recommended"]["why"].startswith("nothing can be decided: the base never")


def test_bad_input_exits_2_before_anything_boots(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = image_dir(tmp_path / "base")
    no_vmm = str(tmp_path / "no-qemu")  # a boot would fail loudly, not exit 2
    for extra, message in [
        (["--candidate", "x=kernel:1"], "candidate x: unknown kind 'kernel'"),
        (["--candidate", f"i=image:{tmp_path / 'gone'}"], "candidate i: image directory"),
        (["--candidate", "a=cmdline:x", "--candidate", "a=cmdline:y"], "candidate a: given "
         "twice"),
        (["--candidates-file", str(tmp_path / "none")], "candidates file"),
    ]:
        assert cli.main(["optimize", "--base", str(base), "--qemu", no_vmm,
                         "--out", str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_the_default_candidates_are_fast_txt_against_the_image_less_them(
        tmp_path: Path) -> None:
    from bench.cli_optimize import gather

    base = image_dir(tmp_path / "base", cmdline="console=ttyS0 panic=-1 quiet loglevel=4 "
                     "tsc=reliable")
    args = cli.parser().parse_args(["optimize", "--base", str(base)])
    cands, cmdline, source = gather(args)
    assert "quiet" in [c.name for c in cands] and source == "image less the candidates"
    assert cmdline == "console=ttyS0 panic=-1"
    p = optimize.plan(str(base), cmdline, cands)  # none is already in that base
    assert p.variants[0].cmdline == "console=ttyS0 panic=-1"
