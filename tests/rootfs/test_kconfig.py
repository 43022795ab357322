"""kconfig fragments and `guestinit-build kconfig check` on the Debian kernel's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from rootfs import kconfig
from rootfs.cli import main
from rootfs.kernel import KernelTree
from rootfs.profile import KCONFIG_DIR
from rootfs.steps import BuildError

EARLY = ["virtio_mmio", "virtio_console", "vsock", "vmw_vsock_virtio_transport"]


def results_for(config: Path, *fragments: str) -> list[kconfig.Result]:
    wants = [w for f in fragments for w in kconfig.read_fragment(KCONFIG_DIR / f)]
    return kconfig.check(kconfig.read_config(config), wants)


def test_debian_config_satisfies_base_with_modules(kernel_tree: KernelTree) -> None:
    results = results_for(kernel_tree.config, "base.conf")
    assert not [r for r in results if r.fails]
    mods = kconfig.modules_needed(results)
    assert set(EARLY) <= set(mods)
    assert {"virtio_blk", "erofs", "dm_mod", "dm_verity"} <= set(mods)
    by_option = {r.want.option: r for r in results}
    assert by_option["CONFIG_VIRTIO_MMIO"].status is kconfig.Status.MODULE
    assert by_option["CONFIG_DEVTMPFS"].status is kconfig.Status.OK


def test_missing_and_wrong_options_fail(kernel_tree: KernelTree, tmp_path: Path) -> None:
    text = kernel_tree.config.read_text()
    text = text.replace("CONFIG_VIRTIO_MMIO=m", "# CONFIG_VIRTIO_MMIO is not set")
    text = text.replace("CONFIG_DEVTMPFS=y", "CONFIG_DEVTMPFS=m")
    bad = tmp_path / "config"
    bad.write_text(text)
    failing = {r.want.option: r.status for r in results_for(bad, "base.conf") if r.fails}
    assert failing == {"CONFIG_VIRTIO_MMIO": kconfig.Status.MISSING,
                       "CONFIG_DEVTMPFS": kconfig.Status.WRONG}


def test_cli_check_exit_codes(kernel_tree: KernelTree, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kconfig", "check", "--config", str(kernel_tree.config),
                 "--fragment", "base.conf", "--fragment", "gpu.conf",
                 "--fragment", "fastboot.conf"]) == 0
    out = capsys.readouterr().out
    assert "CONFIG_VIRTIO_MMIO" in out and "module virtio_mmio" in out
    assert "wrong (optional)" in out  # fastboot.conf is advisory on a distro kernel
    bad = tmp_path / "config"
    bad.write_text(kernel_tree.config.read_text().replace("CONFIG_VSOCKETS=m", ""))
    assert main(["kconfig", "check", "--config", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "CONFIG_VSOCKETS" in captured.err
    assert "missing" in captured.out


def test_fragment_syntax_error_names_line() -> None:
    with pytest.raises(BuildError, match=r"x\.conf:3: expected CONFIG_X=value"):
        kconfig.parse_fragment("# ok\nCONFIG_A=y\nVIRTIO=y\n", "x.conf")


def test_fragment_tags() -> None:
    wants = kconfig.parse_fragment(
        "# why it is here [module: foo]\nCONFIG_FOO=y\n# [optional]\n# CONFIG_BAR is not set\n",
        "t.conf")
    assert wants[0].module == "foo" and wants[0].required and wants[0].why == "why it is here"
    assert wants[1].value == "n" and not wants[1].required
    results = kconfig.check({"CONFIG_FOO": "m", "CONFIG_BAR": "y"}, wants)
    assert [r.status for r in results] == [kconfig.Status.MODULE, kconfig.Status.WRONG]
    assert not any(r.fails for r in results)


def test_all_fragments_and_presets_parse() -> None:
    for frag in KCONFIG_DIR.glob("*.conf"):
        assert kconfig.read_fragment(frag), frag
    for preset in (KCONFIG_DIR / "cmdline").glob("*.txt"):
        for line in preset.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert "#" in line, f"{preset.name}: every option says why: {line!r}"
