"""guestinit-bench suite: variant selection, console parsing, the interleaved loop on a
stand-in VMM (failed runs counted, never dropped), the exit status and bad input."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench import cli, measure, suite
from bench.image import Image

CONSOLE = b"""[    0.000000] Linux version 6.1.0-56-amd64
[    0.074209] random: crng init done
[    0.200000] initcall pci_subsys_init+0x0/0x90 returned 0 after 51234 usecs
[    0.210000] initcall tiny_init+0x0/0x10 returned 0 after 3 usecs
[    0.300000] initcall acpi_init+0x0/0x4c0 returned 0 after 80000 usecs
[    1.552563] Run /init as init process
[    1.600000] Run /init as init process
"""


def test_console_gives_kernel_marks_and_the_slowest_initcalls() -> None:
    marks, calls = measure.parse_console(CONSOLE)
    assert marks == {"guest_crng_ready_s": 0.074209, "guest_run_init_s": 1.552563}
    assert [c["name"] for c in calls] == ["acpi_init", "pci_subsys_init", "tiny_init"]
    assert calls[0]["usecs"] == 80000


def test_variants_selected_by_name_and_cmdline_variants_built_on_a_base() -> None:
    got = suite.select(["guestinit", "busybox"], ["quiet7=loglevel=7",
                                                  "busybox+calls=initcall_debug"], True)
    names = [v.name for v in got]
    assert names == ["guestinit", "busybox", "quiet7", "busybox+calls", "guestinit@no-rng",
                     "busybox@no-rng", "quiet7@no-rng", "busybox+calls@no-rng"]
    quiet7 = got[2]
    assert quiet7.profile == "cpu" and quiet7.append == "guestinit.agent=none loglevel=7"
    assert got[3].profile == "baseline-busybox" and got[3].append == "initcall_debug"
    assert got[4].entropy == "none" and got[0].entropy is None


def test_another_build_is_a_guestinit_variant(tmp_path: Path) -> None:
    (got,) = suite.select([], [], False, [f"before={tmp_path}"])
    assert (got.name, got.profile, got.init) == ("before", str(tmp_path), "guestinit")
    (bb,) = suite.select([], [], False, [f"busybox+raw={tmp_path}"])
    assert (bb.name, bb.init, bb.append) == ("busybox+raw", "busybox", "")
    with pytest.raises(suite.SuiteError, match="use NAME=DIR"):
        suite.select([], [], False, ["nodir"])


def test_a_cmdline_variant_can_start_from_an_image_variant(tmp_path: Path) -> None:
    gpu, nvrc = suite.select([], ["gpu+nvrc=nvrc.dcgm=on"], False, [f"gpu={tmp_path}"])[::-1]
    assert (gpu.name, gpu.profile) == ("gpu", str(tmp_path))
    assert (nvrc.name, nvrc.profile, nvrc.init) == ("gpu+nvrc", str(tmp_path), "guestinit")
    assert nvrc.append == f"{gpu.append} nvrc.dcgm=on"
    with pytest.raises(suite.SuiteError, match=r"unknown base variant 'gpu' \(known: .*"):
        suite.select([], ["gpu+nvrc=x=1"], False, [])


@pytest.mark.parametrize(("names", "appends", "message"), [
    (["nope"], [], "unknown variant 'nope'"),
    (["guestinit", "guestinit"], [], "given twice"),
    ([], ["novalue"], "use NAME=ARGS"),
    ([], ["zz+x=quiet"], "unknown base variant 'zz'"),
    ([], [], "no variants"),
])
def test_bad_variant_specs_are_named(names: list[str], appends: list[str],
                                     message: str) -> None:
    with pytest.raises(suite.SuiteError, match=message):
        suite.select(names, appends, False)


def _images(tmp_path: Path, paper_image: Image) -> Path:
    images = tmp_path / "images"
    for profile in ("cpu", "baseline-busybox"):
        d = images / profile
        d.mkdir(parents=True)
        for name in ("vmlinuz", "initramfs.img", "cmdline.txt"):
            (d / name).write_bytes(Path(paper_image.directory, name).read_bytes())
        (d / "kernel-release.txt").write_text("6.1.0-test\n")
    return images


def test_suite_interleaves_counts_failures_and_writes_a_valid_document(
        tmp_path: Path, paper_image: Image, fake_vmm: str) -> None:
    from bench.suite_schema import validate

    images = _images(tmp_path, paper_image)
    variants = suite.select(["guestinit", "busybox"], ["stuck=fake.mode=noshutdown"], False)
    loaded = suite.load_images(variants, str(images))
    settings = suite.Settings(runs=2, warmup=1, timeout=10, images=str(images), qemu=fake_vmm)
    order: list[tuple[str, bool]] = []

    def report(done: int, total: int, name: str, rnd: int, rec: dict[str, object]) -> None:
        assert total == 9
        order.append((name, bool(rec.get("warmup"))))

    entries: dict[str, dict[str, object]] = {}
    out = tmp_path / "result"
    suite.run_suite(variants, loaded, settings, str(out), report, entries)
    names = ["guestinit", "busybox", "stuck"]
    rounds = [[n for n, _ in order[i:i + 3]] for i in range(0, 9, 3)]
    assert all(sorted(r) == sorted(names) for r in rounds), rounds  # every variant each round
    expected = []
    shuffle = random.Random(settings.seed).shuffle
    for _ in range(3):  # the order is the seed's, so a suite can be repeated
        expected.append(list(names))
        shuffle(expected[-1])
    assert rounds == expected
    assert [w for _, w in order] == [True] * 3 + [False] * 6
    doc = suite.assemble(entries, suite.machine_for(loaded, settings), settings)
    validate(doc)
    ok, stuck = doc["variants"]["guestinit"], doc["variants"]["stuck"]  # type: ignore[index]
    assert (ok["n_ok"], ok["n_failed"]) == (2, 0)
    assert (stuck["n_ok"], stuck["n_failed"]) == (0, 2)
    assert stuck["failures"][0]["reason"].startswith("the guest was ready but sent no shutdown")
    assert len(stuck["warmup_failures"]) == 1
    run = ok["runs"][0]
    assert run["guest_run_init_s"] == 0.1  # the stand-in's console line
    assert 0 < run["host_first_output_s"] < 10  # the console was read live
    assert ok["ready_s"]["n_ok"] == 2 and ok["ready_s"]["median"] > 0
    assert [s["name"] for s in run["stages"]] == ["early", "ready"]
    assert (out / "logs" / "stuck-run1.console.log").is_file()  # failed runs keep their log
    assert not (out / "logs" / "guestinit-run1.console.log").exists()
    rc, why = suite.verdict(doc)
    assert rc == 2 and why == [f"variant stuck: 0 of 2 runs OK: {stuck['failures'][0]['reason']}"]
    assert doc["ratios"]["p2_ready_vs_busybox"]["value"] is not None  # type: ignore[index]


def test_cli_unknown_variant_and_missing_image_exit_2(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["suite", "--variants", "nope"]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err
    assert cli.main(["suite", "--variants", "busybox", "--images", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "variant busybox: image directory" in err
    assert "guestinit-build image baseline-busybox --out" in err  # the profile that builds it


def test_tuned_kernel_peers_and_their_ratios() -> None:
    from rootfs import profile

    got = suite.select(["guestinit-tuned", "busybox-tuned", "systemd-tuned"], [], False, [])
    assert [(v.profile, v.init) for v in got] == [
        ("cpu-tuned", "guestinit"), ("baseline-busybox-tuned", "busybox"),
        ("baseline-systemd-tuned", "systemd")]
    # the baselines run on cpu-tuned's kernel: the same build, so the same cached kernel
    tuned = profile.load("cpu-tuned").kernel
    for name in ("baseline-busybox-tuned", "baseline-systemd-tuned"):
        kernel = profile.load(name).kernel
        assert (kernel.package, kernel.fragments, kernel.modules, kernel.early) == (
            tuned.package, tuned.fragments, tuned.modules, tuned.early), name

    def variant(ready: float, userspace: float) -> dict[str, object]:
        return {"metrics": {"host_ready_s": {"median": ready},
                            "userspace_s": {"median": userspace}}}

    got_ratios = suite.ratios({"guestinit": variant(5.0, 1.0), "busybox": variant(4.0, 0.2),
                               "guestinit-tuned": variant(1.4, 0.5),
                               "busybox-tuned": variant(1.0, 0.1),
                               "systemd-tuned": variant(1.3, 0.4)})
    assert got_ratios["p2_ready_vs_busybox"]["value"] == 1.25  # type: ignore[index]
    assert got_ratios["p2_ready_vs_busybox_tuned"]["value"] == 1.4  # type: ignore[index]
    assert got_ratios["p3_systemd_vs_guestinit_userspace_tuned"]["value"] == 0.8  # type: ignore[index]
    assert "p3_systemd_vs_guestinit_userspace" not in got_ratios  # no stock systemd run


def test_kata_machine_variants_boot_kata_images(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    got = suite.select(["guestinit", "busybox", "systemd"], ["busybox+bb7=loglevel=7"],
                       True, [f"after={tmp_path}"], machine="kata")
    assert {v.machine for v in got} == {"kata"}
    assert [v.profile for v in got[:3]] == ["kata", "baseline-busybox-kata",
                                            "baseline-systemd-kata"]
    assert (got[3].name, got[3].append) == ("busybox+bb7", "loglevel=7")
    assert (got[4].name, got[4].machine, got[5].name) == ("after", "kata", "guestinit@no-rng")
    with pytest.raises(suite.SuiteError, match="on the kata machine"):
        suite.select(["guestinit-erofs"], [], False, machine="kata")
    # a kata image directory without its drop-in is named with the build command
    assert cli.main(["suite", "--machine", "kata", "--variants", "busybox",
                     "--images", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert ("variant busybox: image directory" in err
            and "guestinit-build image baseline-busybox-kata --out" in err), err
