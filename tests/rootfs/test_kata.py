"""Kata's disk contract (rootfs/kata.py) on real erofs images, sfdisk and veritysetup:
the layout image_builder.sh makes, verity parameters that verify with exactly the fields
of root_hash.txt and --no-superblock, byte-identical rebuilds, the drop-in's keys."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from rootfs import kata
from rootfs.kata import MIB
from rootfs.steps import BuildError


def erofs_of(tmp: Path, files: int = 40) -> Path:
    tree = tmp / "tree"
    (tree / "sbin").mkdir(parents=True)
    for i in range(files):  # incompressible-ish content so the image has some size
        (tree / "sbin" / f"f{i}").write_bytes(bytes((i * 7919 + j * 31) % 251
                                                     for j in range(64 * 1024)))
    image = tmp / "root.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", "-U", "2b7f3c8e-3d0a-4a52-8e1c-"
                    "67756573746e", "--all-root", str(image), str(tree)], check=True)
    return image


@pytest.mark.parametrize("size", [4096, MIB - 1, MIB, 37 * MIB + 5, 400 * MIB])
def test_layout_is_image_builders(size: int) -> None:
    lay = kata.layout_for(size)
    size_mib = (size + MIB) // MIB + 2
    size_mib = size_mib * 100 // 99 + 1
    assert lay.size == size_mib * MIB
    assert lay.p1_start == MIB and lay.p2_start == size_mib * 99 // 100 * MIB
    assert lay.p1_start + lay.p1_size == lay.p2_start
    assert lay.p2_start + lay.p2_size == lay.size  # p2 runs to the last sector
    assert lay.p1_size >= size  # the erofs fits p1
    assert lay.p2_size >= MIB and lay.p2_start % MIB == 0


def test_disk_partitions_and_verity_match_root_hash_txt(tmp_path: Path) -> None:
    erofs = erofs_of(tmp_path)
    disk = tmp_path / "kata-containers.img"
    params = kata.write_disk(erofs, disk)
    lay = kata.layout_for(erofs.stat().st_size)
    assert disk.stat().st_size == lay.size
    assert kata.partitions(disk) == [(lay.p1_start, lay.p1_size), (lay.p2_start, lay.p2_size)]
    fdisk = subprocess.run(["sfdisk", "-l", str(disk)], capture_output=True, text=True,
                           check=True).stdout
    assert "Disklabel type: dos" in fdisk
    p1_line = next(line for line in fdisk.splitlines() if line.startswith(f"{disk}1"))
    assert "*" in p1_line.split()[1:2] and " 83 " in p1_line  # boot flag, Linux type
    with disk.open("rb") as fh:
        fh.seek(lay.p1_start)
        assert fh.read(erofs.stat().st_size) == erofs.read_bytes()
    # Kata's verity covers all of p1, as veritysetup format over the partition does
    assert params.data_blocks * params.data_block_size == lay.p1_size
    assert params.data_block_size == params.hash_block_size == 4096
    line = params.format()
    assert kata.parse_verity_params(line) == params
    kata.verify_disk(disk, params)  # veritysetup verify --no-superblock with these fields


def test_a_changed_byte_in_p1_or_a_wrong_field_fails_verification(tmp_path: Path) -> None:
    erofs = erofs_of(tmp_path, files=8)
    disk = tmp_path / "d.img"
    params = kata.write_disk(erofs, disk)
    with disk.open("r+b") as fh:
        fh.seek(MIB + 1024)  # the erofs superblock
        byte = fh.read(1)
        fh.seek(MIB + 1024)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BuildError, match="veritysetup verify"):
        kata.verify_disk(disk, params)
    clean = tmp_path / "clean.img"
    kata.write_disk(erofs, clean)
    other_salt = kata.VerityParams(params.root_hash, "00" * 32, params.data_blocks,
                                   params.data_block_size, params.hash_block_size)
    with pytest.raises(BuildError, match="veritysetup verify"):
        kata.verify_disk(clean, other_salt)
    too_long = kata.VerityParams(params.root_hash, params.salt, params.data_blocks + 1,
                                 params.data_block_size, params.hash_block_size)
    with pytest.raises(BuildError, match="reach past p1"):
        kata.verify_disk(clean, too_long)


def test_the_same_erofs_gives_the_same_disk(tmp_path: Path) -> None:
    erofs = erofs_of(tmp_path, files=4)
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    kata.write_disk(erofs, a)
    kata.write_disk(erofs, b)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize(("text", "error"), [
    ("root_hash=abc,data_blocks=1,data_block_size=4096,hash_block_size=4096", "salt"),
    ("root_hash=abc,salt=def,data_block_size=4096,hash_block_size=4096", "data_blocks"),
    ("root_hash=abc,salt=def,data_blocks=foo,data_block_size=4096,hash_block_size=4096",
     "data_blocks 'foo'"),
    ("root_hash=abc,salt=def,data_blocks=1,data_block_size=4096,hash_block_size=4096,"
     "badfield", "entry: 'badfield'"),
    ("salt=def,data_blocks=1,data_block_size=4096,hash_block_size=4096", "root_hash"),
    ("root_hash=abc,salt=def,data_blocks=0,data_block_size=4096,hash_block_size=4096",
     "non-zero"),
    ("root_hash=abc,salt=def,data_blocks=1,data_block_size=1000,hash_block_size=4096",
     "multiple of 512"),
])
def test_verity_params_errors_follow_kata(text: str, error: str) -> None:
    with pytest.raises(kata.VerityParamsError, match=error):
        kata.parse_verity_params(text)


def test_empty_verity_params_mean_no_verity_and_spaces_are_trimmed() -> None:
    assert kata.parse_verity_params("  ") is None
    got = kata.parse_verity_params(" root_hash=abc, salt=def ,data_blocks=1,"
                                   "data_block_size=4096,hash_block_size=4096,")
    assert got == kata.VerityParams("abc", "def", 1, 4096, 4096)


def test_configuration_has_kata_keys_and_reads_back(tmp_path: Path) -> None:
    verity = "root_hash=abc,salt=def,data_blocks=1,data_block_size=4096,hash_block_size=4096"
    drop = kata.Drop(kernel="/opt/g/kata/vmlinuz", image="/opt/g/kata/kata-containers.img",
                     initrd=None, kernel_params=kata.KERNEL_PARAMS_NV,
                     kernel_verity_params=verity, firmware=kata.KATA_FIRMWARE)
    path = tmp_path / "configuration.toml"
    path.write_text(kata.render_configuration(drop, "kata"))
    qemu = tomllib.loads(path.read_text())["hypervisor"]["qemu"]
    assert set(qemu) == {"kernel", "image", "rootfs_type", "disable_image_nvdimm",
                         "kernel_params", "kernel_verity_params", "firmware"}
    assert qemu["rootfs_type"] == "erofs" and qemu["disable_image_nvdimm"] is True
    assert qemu["kernel_params"] == "cgroup_no_v1=all pci=realloc pci=nocrs pci=assign-busses"
    assert kata.read_configuration(path) == drop


def test_image_and_initrd_together_are_refused(tmp_path: Path) -> None:
    both = kata.Drop("/k", "/img", "/rd", (), "", "/fw")
    with pytest.raises(BuildError, match="conflictingAssets"):
        kata.render_configuration(both, "kata")
    path = tmp_path / "c.toml"
    path.write_text('[hypervisor.qemu]\nkernel = "/k"\nimage = "/i"\ninitrd = "/r"\n')
    with pytest.raises(BuildError, match="both image and initrd"):
        kata.read_configuration(path)
    path.write_text('[hypervisor.qemu]\nkernel = "/k"\nimage = "/i"\n'
                    'kernel_verity_params = "root_hash=abc"\n')
    with pytest.raises(BuildError, match="kernel_verity_params: missing"):
        kata.read_configuration(path)


def test_kernel_check_names_each_missing_builtin() -> None:
    config = {o: "y" for o in kata.BUILTIN}
    kata.check_kernel(config, True, "kata")
    config.update(CONFIG_VIRTIO_BLK="m")
    del config["CONFIG_EFI_STUB"]
    with pytest.raises(BuildError) as err:
        kata.check_kernel(config, True, "kata")
    assert "CONFIG_VIRTIO_BLK (module)" in str(err.value)
    assert "CONFIG_EFI_STUB (not set)" in str(err.value)
    with pytest.raises(BuildError, match=r"kernel\.build = true"):
        kata.check_kernel({o: "y" for o in kata.BUILTIN}, False, "cpu")


def test_extension_split_moves_the_bundles_files_and_restore_puts_them_back(
        tmp_path: Path) -> None:
    from rootfs import extension
    from rootfs.closure import Origin, Tree

    tree = Tree(tmp_path / "tree")
    bundle, deb = Origin("nvidia-driver", "580"), Origin("libc6", "2.36")
    tree.add_bytes("usr/bin/nvidia-smi", b"smi", bundle, 0o755)
    tree.add_bytes("usr/lib/modules/R/kernel/drivers/video/nvidia.ko", b"ko", bundle)
    tree.add_bytes("usr/lib/x86_64-linux-gnu/libc.so.6", b"libc", deb)
    ext = tmp_path / "ext"
    moved = extension.split(tree, bundle, ext)
    assert sorted(moved) == ["usr/bin/nvidia-smi",
                             "usr/lib/modules/R/kernel/drivers/video/nvidia.ko"]
    assert (ext / "usr/bin/nvidia-smi").read_bytes() == b"smi"
    assert not tree.host("usr/bin/nvidia-smi").exists()
    assert tree.host("usr/lib/x86_64-linux-gnu/libc.so.6").exists()  # not the bundle's
    extension.restore(tree, ext, moved)
    assert tree.host("usr/bin/nvidia-smi").read_bytes() == b"smi" and not ext.exists()
    with pytest.raises(BuildError, match="nothing to move"):
        extension.split(tree, Origin("other", "1"), ext)
    with pytest.raises(BuildError, match="only ASCII letters"):
        extension.check_name("gpu/x")


def test_the_drop_in_lists_extension_images_as_runtime_rs_does(tmp_path: Path) -> None:
    from rootfs import extension

    verity = "root_hash=abc,salt=def,data_blocks=1,data_block_size=4096,hash_block_size=4096"
    drop = kata.Drop(kernel="/k", image="/i", initrd=None, kernel_params=(),
                     kernel_verity_params=verity, firmware="/fw")
    ext = extension.Extension("gpu", "/opt/guestinit/x/extension-gpu.img", verity)
    path = tmp_path / "configuration.toml"
    path.write_text(kata.render_configuration(drop, "x", extension.render([ext])))
    entries = tomllib.loads(path.read_text())["hypervisor"]["qemu"]["guest_extension_images"]
    assert entries == [{"name": "gpu", "path": ext.path, "verity_params": verity}]
    assert kata.read_configuration(path).extensions == (("gpu", ext.path, verity),)
    text = path.read_text()
    head, tail = text.split("[[hypervisor.qemu.guest_extension_images]]")
    path.write_text(head + "[[hypervisor.qemu.guest_extension_images]]" +
                    tail.replace(verity, "root_hash=abc"))
    with pytest.raises(BuildError, match="guest_extension_images 'gpu': invalid verity_params"):
        kata.read_configuration(path)


def test_the_agent_and_pause_bundle_go_where_kata_agent_looks(tmp_path: Path) -> None:
    from rootfs import tree_extras
    from rootfs.closure import Tree

    tree = Tree(tmp_path / "tree")
    with pytest.raises(BuildError, match="no such file"):
        tree_extras.install_agent(tree, tmp_path / "missing")
    script = tmp_path / "agent.sh"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(BuildError, match="not executable"):
        tree_extras.install_agent(tree, script)
    script.chmod(0o755)
    with pytest.raises(BuildError, match="not an ELF"):
        tree_extras.install_agent(tree, script)
    elf = tmp_path / "kata-agent"
    elf.write_bytes(Path("/bin/true").read_bytes())
    elf.chmod(0o755)
    origin = tree_extras.install_agent(tree, elf)
    assert tree.host("usr/bin/kata-agent").read_bytes() == elf.read_bytes()
    assert origin.package == "kata-agent" and origin.version.startswith("sha256-")
    bundle = tmp_path / "bundle"
    with pytest.raises(BuildError, match="not an OCI bundle"):
        tree_extras.install_pause_bundle(tree, bundle)
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text("{}")
    (bundle / "rootfs/pause").write_bytes(b"\x7fELF")
    assert tree_extras.install_pause_bundle(tree, bundle) == 2
    assert tree.host("pause_bundle/rootfs/pause").read_bytes() == b"\x7fELF"
    tree_extras.write_agent_files(tree, "gpu-vm")
    assert tree.host("etc/resolv.conf").read_text() == ""
    assert tree.host("etc/hostname").read_text() == "gpu-vm\n"


def test_extension_without_a_bundle_fails_before_any_fetch_or_kernel_build(
        tmp_path: Path) -> None:
    from rootfs import profile
    from rootfs.build import build_image

    with pytest.raises(BuildError, match="needs --driver DIR and the kata format"):
        build_image(profile.load("kata"), tmp_path / "out", extension_name="gpu")
    with pytest.raises(BuildError, match="only ASCII letters"):
        build_image(profile.load("kata"), tmp_path / "out", extension_name="g/x")
    assert not (tmp_path / "out").exists()  # nothing fetched, built or written
