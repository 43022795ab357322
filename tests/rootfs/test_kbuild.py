"""The kernel builder: fragments merged by the kernel's own merge_config.sh and conf,
the checker naming what Kconfig dropped, the cache key and the cache lookup.

The synthetic Kconfig tree runs through the real ``merge_config.sh`` and ``conf`` of
Debian's linux-source (tests.fixtures.kernel.kconfig_tools), so the merge order and
Kconfig's silent drops are the kernel's, not a model of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rootfs import fetch, kbuild, kconfig
from rootfs.steps import BuildError, Progress
from tests.fixtures.kernel import kconfig_tools

KCONFIG = """\
mainmenu "synthetic"

config MODULES
	bool "modules"
	modules

config EXPERT
	bool "expert"

config NET
	bool "networking"

config UNIX
	tristate "unix sockets"
	depends on NET

config VSOCK
	tristate "vsock"
	depends on NET && (MODULES || EXPERT)

config FB
	bool "framebuffer" if EXPERT
	default y

choice
	prompt "compression"
	default KERNEL_GZIP

config KERNEL_GZIP
	bool "gzip"

config KERNEL_LZ4
	bool "lz4"

endchoice
"""


@pytest.fixture(scope="module")
def tools() -> tuple[Path, Path, Path]:
    return kconfig_tools()


def synthetic(tmp: Path, tools: tuple[Path, Path, Path], *fragments: str
              ) -> tuple[dict[str, str], list[kconfig.Result]]:
    tree = tmp / "tree"
    tree.mkdir(exist_ok=True)
    (tree / "Kconfig").write_text(KCONFIG)
    paths = []
    for i, text in enumerate(fragments):
        path = tmp / f"f{i}.conf"
        path.write_text(text)
        paths.append(path)
    _, merge_script, conf = tools
    final = kbuild.merge(kbuild.Kconfig(tree, tmp / "work", conf), merge_script, paths)
    wants = [w for p in paths for w in kconfig.read_fragment(p)]
    return final, kconfig.check(final, wants)


def test_options_with_their_dependencies_land(tmp_path: Path,
                                              tools: tuple[Path, Path, Path]) -> None:
    final, results = synthetic(tmp_path, tools, "CONFIG_NET=y\nCONFIG_UNIX=y\n"
                               "CONFIG_MODULES=y\nCONFIG_VSOCK=m\nCONFIG_KERNEL_LZ4=y\n")
    assert [r.status for r in results] == [kconfig.Status.OK] * 5
    assert final["CONFIG_KERNEL_GZIP"] == "n"  # the choice moved to lz4
    assert final["CONFIG_FB"] == "y"  # untouched: its default


def test_unmet_dependency_is_dropped_and_explained(tmp_path: Path,
                                                   tools: tuple[Path, Path, Path]) -> None:
    final, results = synthetic(tmp_path, tools, "# what the test needs\nCONFIG_UNIX=y\n"
                               "CONFIG_VSOCK=y\n")
    assert "CONFIG_UNIX" not in final or final["CONFIG_UNIX"] == "n"
    assert [r.status for r in results] == [kconfig.Status.MISSING] * 2
    assert all(r.fails for r in results)
    why = kbuild.explain(results, tmp_path / "tree", "synthetic")
    assert why[0] == ("f0.conf: CONFIG_UNIX=y: not set; depends on NET: add the options it "
                      "needs to a fragment")
    assert "depends on NET && (MODULES || EXPERT)" in why[1]


def test_unknown_and_forced_options_are_named(tmp_path: Path,
                                              tools: tuple[Path, Path, Path]) -> None:
    _, results = synthetic(tmp_path, tools, "# level: advisory\nCONFIG_NOPE=y\n"
                           "# CONFIG_FB is not set\n")
    by = {r.want.option: r for r in results}
    assert by["CONFIG_NOPE"].status is kconfig.Status.MISSING
    assert by["CONFIG_FB"].status is kconfig.Status.WRONG and by["CONFIG_FB"].found == "y"
    assert not any(r.fails for r in results)  # advisory: reported, never fatal
    why = kbuild.explain(results, tmp_path / "tree", "synthetic")
    assert why[0] == ("f0.conf: CONFIG_NOPE=y (advisory): no such option in synthetic; "
                      "remove it or fix its name")
    assert why[1].startswith("f0.conf: CONFIG_FB=n (advisory): final value y; depends on "
                             "EXPERT")


def test_a_later_fragment_wins(tmp_path: Path, tools: tuple[Path, Path, Path]) -> None:
    final, _ = synthetic(tmp_path, tools, "CONFIG_NET=y\nCONFIG_EXPERT=y\n",
                         "# CONFIG_NET is not set\n")
    assert final["CONFIG_EXPERT"] == "y"
    assert final.get("CONFIG_NET", "n") == "n"


PIN = fetch.Pin("linux-source-6.1", "6.1.192-3", "ab" * 32, "linux-source-6.1_6.1.192-3_all.deb")


def test_cache_key_follows_source_and_fragment_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.conf", tmp_path / "b.conf"
    a.write_text("CONFIG_NET=y\n")
    b.write_text("CONFIG_UNIX=y\n")
    key = kbuild.cache_key(PIN, [a, b])
    assert key == kbuild.cache_key(PIN, [a, b])
    assert key != kbuild.cache_key(PIN, [b, a])  # order matters: a later fragment wins
    assert key != kbuild.cache_key(fetch.Pin(PIN.name, "6.1.193-1", PIN.sha256,
                                             PIN.filename), [a, b])
    a.write_text("CONFIG_NET=y\n# a comment changes the bytes\n")
    assert key != kbuild.cache_key(PIN, [a, b])
    with pytest.raises(BuildError, match=r"kernel fragment .*missing\.conf"):
        kbuild.cache_key(PIN, [tmp_path / "missing.conf"])


def test_a_cached_build_is_read_not_rebuilt(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUESTINIT_CACHE", str(tmp_path / "cache"))
    frag = tmp_path / "net.conf"
    frag.write_text("CONFIG_NET=y\n# [optional]\nCONFIG_FB=y\n")
    entry = kbuild.kernels_dir() / kbuild.cache_key(PIN, [frag])
    release = "6.1.192-guestinit"
    (entry / "boot").mkdir(parents=True)
    (entry / "lib" / "modules" / release).mkdir(parents=True)
    (entry / "boot" / f"vmlinuz-{release}").write_bytes(b"bz")
    (entry / "boot" / f"config-{release}").write_text("CONFIG_NET=y\n")
    (entry / "build.json").write_text(json.dumps({"build_seconds": 321.0, "compiled": 9}))
    deb = tmp_path / "no-such.deb"  # never opened: the cache answers
    built = kbuild.build(deb, PIN, [frag], Progress(quiet=True), epoch=0)
    assert built.cached and built.build_seconds == 321.0
    assert built.tree.release == release
    assert [(r.want.option, r.status) for r in built.results] == [
        ("CONFIG_NET", kconfig.Status.OK), ("CONFIG_FB", kconfig.Status.MISSING)]
    assert kbuild._expected_objects() == 9


def test_compile_reports_progress_and_the_failing_tail(tmp_path: Path) -> None:
    script = tmp_path / "make.py"
    script.write_text("import sys\nfor i in range(5):\n    print(f'  CC      a{i}.o')\n"
                      "print('  LD      vmlinux')\nprint('error: boom')\n"
                      "sys.exit(int(sys.argv[1]))\n")
    notes: list[str] = []

    class Notes(Progress):
        def note(self, text: str) -> None:
            notes.append(text)

    ticks = iter(range(0, 1000, 10))
    n = kbuild._compile([sys.executable, script, "0"], {}, Notes(),
                        clock=lambda: float(next(ticks)))
    assert n == 5
    assert notes and notes[0].startswith("make: ") and "files compiled" in notes[0]
    with pytest.raises(BuildError, match=r"(?s)exited 2:\n.*error: boom"):
        kbuild._compile([sys.executable, script, "2"], {}, Notes(), clock=lambda: 0.0)
    with pytest.raises(BuildError, match=r"^kernel build: command no-such-make not found"):
        kbuild._compile(["no-such-make"], {}, Notes())


def test_a_required_option_the_kernel_drops_fails_before_compiling(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tools: tuple[Path, Path, Path]) -> None:
    """The real linux-source tree: virtio-blk without the block layer cannot land."""
    from rootfs import build, profile

    deb, pin, _ = build.pin_kernel_source(profile.load("cpu-tuned"), Progress(quiet=True))
    monkeypatch.setenv("GUESTINIT_CACHE", str(tmp_path / "cache"))
    src = tools[0]
    (tmp_path / "cache" / "kernels").mkdir(parents=True)
    (tmp_path / "cache" / "kernels" / f"src-{deb.name.removesuffix('.deb')}").symlink_to(src)
    frag = tmp_path / "blk.conf"
    frag.write_text("# the root disk, without the block-device drivers menu it sits in\n"
                    "CONFIG_VIRTIO_BLK=y\n")
    with pytest.raises(BuildError) as err:
        kbuild.build(deb, pin, [frag], Progress(quiet=True), epoch=0)
    text = str(err.value)
    assert "1 required option(s) did not land" in text
    assert ("blk.conf: CONFIG_VIRTIO_BLK=y: not set; depends on BLK_DEV && VIRTIO: add the "
            "options it needs to a fragment") in text
    assert not list((tmp_path / "cache" / "kernels").glob("[0-9a-f]*"))  # nothing cached


def test_help_text_is_not_read_as_kconfig_syntax(tmp_path: Path) -> None:
    """A help line starting with "if" opened a block, and its words became a dependency."""
    (tmp_path / "Kconfig").write_text(
        "config ZONE_DEVICE\n\tbool \"Device memory\"\n\tdepends on MEMORY_HOTPLUG\n"
        "\thelp\n\t  Useful only\n\t  if there are a lot of transient processes.\n\n"
        "config HMM_MIRROR\n\tbool\n\tdepends on MMU\n")
    found = kbuild.kconfig_symbols(tmp_path, ["CONFIG_ZONE_DEVICE", "CONFIG_HMM_MIRROR"])
    assert found == {"CONFIG_ZONE_DEVICE": ["MEMORY_HOTPLUG"], "CONFIG_HMM_MIRROR": ["MMU"]}
