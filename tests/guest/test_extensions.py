"""The extensions stage (guestinit/extensions.py) on real sysfs-like trees in tmp_path and
the recording effects: which extensions the cmdline names, finding each disk by its
virtio serial, Kata's fail-closed rules, the verity table, the /usr overlay."""

from __future__ import annotations

from pathlib import Path

import pytest

from guestinit import extensions
from guestinit.effects import MS_RDONLY, DryEffects
from guestinit.stages import BootError
from tests.fixtures.accel import make_boot

PARAMS = ("root_hash=ab12,salt=cd34,data_blocks=512,data_block_size=4096,"
          "hash_block_size=4096")


def disk(root: Path, name: str, serial: str, parts: int, major: int = 254) -> None:
    """/sys/class/block as the kernel has it: the disk with its serial, each partition
    beside it with its dev and no serial."""
    base = root / "sys/class/block"
    (base / name).mkdir(parents=True)
    (base / name / "serial").write_text(serial + "\n")
    for i in range(1, parts + 1):
        (base / f"{name}{i}").mkdir()
        (base / f"{name}{i}" / "dev").write_text(f"{major}:{16 + i}\n")


def test_the_cmdline_names_extensions_in_order_last_value_wins() -> None:
    line = (f"quiet kata.extension.gpu.verity_params={PARAMS} "
            "kata.extension.coco.verity_params= kata.extension.gpu.verity_params=x=1 "
            "kata.extension..verity_params=y other.verity_params=z")
    assert extensions.wanted(line) == [("coco", ""), ("gpu", "x=1")]
    with pytest.raises(ValueError, match="only letters, digits"):
        extensions.wanted("kata.extension.a/b.verity_params=x")


def test_verity_params_and_table() -> None:
    fields = extensions.verity_fields(PARAMS)
    assert extensions.plan_table("254:17", "254:18", fields) == (
        4096, "1 254:17 254:18 4096 4096 512 0 sha256 ab12 cd34")
    with pytest.raises(ValueError, match="no salt"):
        extensions.verity_fields("root_hash=a,data_blocks=1")
    with pytest.raises(ValueError, match="has no '='"):
        extensions.verity_fields("root_hash=a,salt")


def test_a_disk_is_found_by_its_serial(tmp_path: Path) -> None:
    disk(tmp_path, "vda", "image", 2)
    disk(tmp_path, "vdb", "extension-gpu", 2)
    assert extensions.find_disk(str(tmp_path), "gpu", wait=0) == "vdb"
    assert extensions.find_disk(str(tmp_path), "coco", wait=0) is None
    assert extensions.partition(str(tmp_path), "vdb", 2) == ("vdb2", "254:18")


@pytest.mark.parametrize(("parts", "params", "error"), [
    (2, "", "has a hash partition but the cmdline gives no verity params"),
    (1, PARAMS, "verity params given but /dev/vdb has no hash partition"),
    (0, PARAMS, "has no partition 1"),
])
def test_katas_fail_closed_rules(tmp_path: Path, parts: int, params: str, error: str) -> None:
    disk(tmp_path, "vdb", "extension-gpu", parts)
    fx = DryEffects()
    boot = make_boot(tmp_path, effects=fx)
    with pytest.raises(BootError, match=error):
        extensions.mount_one(boot, "gpu", params)
    assert not [c for c in fx.calls if c[0] == "mount"]  # nothing half-mounted


def test_a_named_extension_without_its_disk_fails_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sys/class/block").mkdir(parents=True)
    boot = make_boot(tmp_path, cmdline=f"kata.extension.gpu.verity_params={PARAMS}")
    monkeypatch.setattr(extensions, "DISK_WAIT", 0.0)
    with pytest.raises(BootError, match="no disk with serial extension-gpu"):
        extensions.run_extensions(boot)


def test_an_unmeasured_extension_mounts_p1_and_its_usr_goes_over_usr(tmp_path: Path) -> None:
    disk(tmp_path, "vdb", "extension-tools", 1)
    fx = DryEffects()
    boot = make_boot(tmp_path, cmdline="kata.extension.tools.verity_params=", effects=fx)
    (tmp_path / "run/kata-extensions/tools/usr").mkdir(parents=True)  # as mounted
    (tmp_path / "usr").mkdir()
    extensions.run_extensions(boot)
    mounts = [c for c in fx.calls if c[0] == "mount"]
    assert mounts[0] == ("mount", f"{tmp_path}/dev/vdb1",
                         f"{tmp_path}/run/kata-extensions/tools", "erofs", MS_RDONLY, "")
    assert mounts[1] == ("mount", "overlay", f"{tmp_path}/usr", "overlay", MS_RDONLY,
                         f"lowerdir={tmp_path}/run/kata-extensions/tools/usr:{tmp_path}/usr")
    facts = boot.facts.extensions
    assert isinstance(facts, dict) and facts["mounted"][0]["verity"] is False  # type: ignore[index]
    assert boot.audit[-1].startswith("extension tools: /dev/vdb at /run/kata-extensions/tools")
