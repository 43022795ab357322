"""The verity root's pure parts: superblock, table, dm ioctl buffers, disk classification.

The superblock comes from a real ``veritysetup format``; the device-mapper
ioctls themselves run only in the VM tier (tests/vm: erofs boot, tampered disk).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from guestinit import verity

VERITYSETUP = shutil.which("veritysetup") or "/usr/sbin/veritysetup"


@pytest.fixture(scope="module")
def formatted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    d = tmp_path_factory.mktemp("verity")
    data, hashes = d / "data.img", d / "hash.img"
    data.write_bytes(os.urandom(1 << 20))
    out = subprocess.run([VERITYSETUP, "format", str(data), str(hashes), "--salt=00112233"],
                         check=True, capture_output=True, text=True).stdout
    root = next(line.split(":")[1].strip() for line in out.splitlines()
                if line.startswith("Root hash"))
    return data, hashes, root


def test_superblock_of_real_veritysetup_output(formatted: tuple[Path, Path, str]) -> None:
    _, hashes, _ = formatted
    sb = verity.Superblock(hashes.read_bytes()[:4096])
    assert (sb.hash_type, sb.algorithm, sb.data_block_size, sb.hash_block_size,
            sb.data_blocks, sb.salt) == (1, "sha256", 4096, 4096, 256, bytes.fromhex("00112233"))


def test_table_matches_what_veritysetup_would_build(formatted: tuple[Path, Path, str]) -> None:
    _, hashes, root = formatted
    sb = verity.Superblock(hashes.read_bytes()[:4096])
    sectors, params = verity.table(sb, "/dev/vda", "/dev/vdb", root)
    assert sectors == (1 << 20) // 512
    assert params == f"1 /dev/vda /dev/vdb 4096 4096 256 1 sha256 {root} 00112233"


@pytest.mark.parametrize(("patch", "message"), [
    ((0, b"VERITY\0\0"), "no verity superblock"),
    ((8, struct.pack("<I", 2)), "version 2"),
    ((64, struct.pack("<I", 3000)), "data block size 3000"),
    ((80, struct.pack("<H", 300)), "salt size 300"),
    ((32, b"sha256; rm -rf /".ljust(32, b"\0")), "not a hash name"),
])
def test_bad_superblocks_are_refused(formatted: tuple[Path, Path, str],
                                     patch: tuple[int, bytes], message: str) -> None:
    raw = bytearray(formatted[1].read_bytes()[:4096])
    offset, data = patch
    raw[offset:offset + len(data)] = data
    with pytest.raises(verity.VerityError, match=message):
        verity.Superblock(bytes(raw))
    with pytest.raises(verity.VerityError, match="need 344"):
        verity.Superblock(b"verity\0\0")


def test_roothash_must_be_hex() -> None:
    assert verity.check_roothash(" ABCDEF0123456789abcdef0123456789 ") == \
        "abcdef0123456789abcdef0123456789"
    for bad in ("", "xyz", "abc", "0" * 31, "g" * 64):
        with pytest.raises(verity.VerityError, match="not a hex digest"):
            verity.check_roothash(bad)


def test_dm_ioctl_layout() -> None:
    assert verity.DM_IOCTL_HEADER.size == 312  # sizeof(struct dm_ioctl)
    assert verity.DM_TARGET_SPEC.size == 40  # sizeof(struct dm_target_spec)
    spec = verity.target_spec(2048, "verity", "1 a b")
    assert len(spec) % 8 == 0
    start, length, status, nxt, ttype = verity.DM_TARGET_SPEC.unpack_from(spec)
    assert (start, length, status, nxt) == (0, 2048, 0, len(spec))
    assert ttype.rstrip(b"\0") == b"verity"
    assert spec[40:].rstrip(b"\0") == b"1 a b"
    buf = verity.dm_ioctl("vroot", verity.DM_READONLY_FLAG, spec, targets=1)
    fields = verity.DM_IOCTL_HEADER.unpack_from(buf)
    assert fields[:3] == verity.DM_VERSION
    assert fields[3] == len(buf) and fields[4] == 312 and fields[5] == 1
    assert fields[7] == verity.DM_READONLY_FLAG
    assert fields[11].rstrip(b"\0") == b"vroot"
    assert bytes(buf[312:312 + len(spec)]) == spec
    # _IOWR(0xfd, 3, struct dm_ioctl): the DM_DEV_CREATE number libdevmapper uses
    assert verity._request(verity.DM_DEV_CREATE) == 0xC138FD03


def test_classify_finds_data_and_hash_disks(tmp_path: Path,
                                            formatted: tuple[Path, Path, str]) -> None:
    (tmp_path / "sys/block/vda").mkdir(parents=True)
    (tmp_path / "sys/block/vdb").mkdir(parents=True)
    (tmp_path / "sys/block/loop0").mkdir(parents=True)
    (tmp_path / "dev").mkdir()
    shutil.copy(formatted[1], tmp_path / "dev/vda")  # the hash tree first, as QEMU may order
    erofs = bytearray(4096)
    struct.pack_into("<I", erofs, 1024, verity.EROFS_MAGIC)
    (tmp_path / "dev/vdb").write_bytes(bytes(erofs))
    assert verity.classify(str(tmp_path), wait=0) == (str(tmp_path / "dev/vdb"),
                                              str(tmp_path / "dev/vda"))
    (tmp_path / "dev/vdb").write_bytes(bytes(4096))
    with pytest.raises(verity.VerityError, match="virtio disks: vda, vdb"):
        verity.classify(str(tmp_path), wait=0)


def test_spans_handed_over_through_exec() -> None:
    env = {verity.ENV_SPANS: "initramfs:10:50;verity:20:40;bad:9:1;x:y:z;;"}
    assert verity.inherited_spans(env) == [("initramfs", 10, 50), ("verity", 20, 40)]
    assert verity.inherited_spans({}) == []


def test_free_initramfs_deletes_files_and_links_but_not_the_new_root(tmp_path: Path) -> None:
    top = tmp_path / "initramfs"
    (top / "usr/lib/python3.11").mkdir(parents=True)
    (top / "usr/lib/python3.11/os.pyc").write_bytes(b"x" * 1000)
    (top / "init").write_bytes(b"y" * 24)
    (top / "lib").symlink_to("usr/lib")
    (top / "sysroot/usr/sbin").mkdir(parents=True)
    (top / "sysroot/usr/sbin/init").write_bytes(b"keep")
    (top / "dev").mkdir()
    freed = verity.free_initramfs(str(top), str(top / "sysroot"))
    assert freed == 1024
    assert not (top / "init").exists() and not (top / "lib").is_symlink()
    assert not (top / "usr/lib/python3.11/os.pyc").exists()
    assert (top / "usr/lib/python3.11").is_dir() and (top / "dev").is_dir()
    assert (top / "sysroot/usr/sbin/init").read_bytes() == b"keep"


def test_wanted_reads_the_root_hash_from_the_config_only_on_the_real_root() -> None:
    from guestinit import config
    from guestinit.boot import Boot

    cfg = config.build("", 'guestinit.verity.roothash="ab12" nvrc.log=debug')
    on_root = Boot("/", None, None, None, None, None, None, "")  # type: ignore[arg-type]
    test_root = Boot("/tmp/x", None, None, None, None, None, None, "")  # type: ignore[arg-type]
    assert verity.wanted(on_root, cfg) == "ab12"
    assert verity.wanted(test_root, cfg) is None
    assert verity.wanted(on_root, config.build("", "")) is None
