"""guestinit.modinfo on real Debian modules from the cached kernel package."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from guestinit import modinfo
from rootfs.kernel import KernelTree

DM = ["kernel/drivers/md/dm-verity.ko", "kernel/drivers/md/dm-mod.ko",
      "kernel/drivers/md/dm-bufio.ko", "kernel/lib/reed_solomon/reed_solomon.ko"]
VSOCK = ["kernel/net/vmw_vsock/vsock.ko",
         "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
         "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
         "kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko"]


def subset(kt: KernelTree, dst: Path, rels: list[str]) -> Path:
    release = dst / kt.release
    for rel in rels:
        (release / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kt.modules / rel, release / rel)
    return dst


def parse_dep(text: str) -> dict[str, list[str]]:
    out = {}
    for line in text.splitlines():
        mod, _, deps = line.partition(":")
        out[mod] = deps.split()
    return out


def test_read_modinfo_real_module(kernel_tree: KernelTree) -> None:
    info = modinfo.read_modinfo(str(kernel_tree.modules / DM[0]))
    assert info["name"] == ["dm_verity"]
    assert sorted(modinfo.dependencies(info)) == ["dm_bufio", "dm_mod", "reed_solomon"]
    assert info["vermagic"][0].split()[0] == kernel_tree.release


def test_read_modinfo_rejects_non_module(tmp_path: Path) -> None:
    bogus = tmp_path / "x.ko"
    bogus.write_bytes(b"not an elf")
    with pytest.raises(modinfo.ModinfoError, match=r"x\.ko: not an ELF"):
        modinfo.read_modinfo(str(bogus))


def test_modules_dep_orders_diamond(kernel_tree: KernelTree, tmp_path: Path) -> None:
    # vmw_vsock_virtio_transport needs vsock directly and through
    # vmw_vsock_virtio_transport_common: a diamond; vsock must come after both.
    tree = subset(kernel_tree, tmp_path, VSOCK + DM)
    files = modinfo.generate(str(tree), kernel_tree.release)
    dep = parse_dep(files["modules.dep"])
    transport = dep["kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko"]
    common = "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko"
    vsock = "kernel/net/vmw_vsock/vsock.ko"
    assert common in transport and vsock in transport
    assert transport.index(common) < transport.index(vsock)
    assert transport.count(vsock) == 1
    assert dep[vsock] == []
    # the general rule: every listed module comes before all of its own dependencies
    for chain in dep.values():
        for i, mod in enumerate(chain):
            assert set(dep[mod]) <= set(chain[i + 1:]), (mod, chain)
    assert sorted(dep["kernel/drivers/md/dm-verity.ko"]) == sorted(DM[1:])


def test_modules_alias_and_softdep(kernel_tree: KernelTree, tmp_path: Path) -> None:
    tree = subset(kernel_tree, tmp_path, [*VSOCK, "kernel/lib/libcrc32c.ko"])
    files = modinfo.generate(str(tree / kernel_tree.release), kernel_tree.release)
    assert "alias virtio:d00000013v* vmw_vsock_virtio_transport\n" in files["modules.alias"]
    assert "softdep libcrc32c pre: crc32c\n" in files["modules.softdep"]


def test_missing_dependency_names_both(kernel_tree: KernelTree, tmp_path: Path) -> None:
    tree = subset(kernel_tree, tmp_path, [DM[0], DM[2], DM[3]])  # no dm-mod
    missing = r"module dm_mod \(needed by dm_(bufio|verity)\)"
    with pytest.raises(modinfo.ModinfoError, match=missing):
        modinfo.generate(str(tree), kernel_tree.release)


def test_load_order_diamond_and_cycle() -> None:
    deps = {"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []}
    order = modinfo.load_order(["a"], deps)
    assert order[0] == "d" and order[-1] == "a" and sorted(order) == ["a", "b", "c", "d"]
    with pytest.raises(modinfo.ModinfoError, match="cycle through x"):
        modinfo.load_order(["x"], {"x": ["y"], "y": ["x"]})


def test_generate_wrong_release(tmp_path: Path) -> None:
    with pytest.raises(modinfo.ModinfoError, match=r"6\.1\.0-99-amd64"):
        modinfo.generate(str(tmp_path), "6.1.0-99-amd64")
