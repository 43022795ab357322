"""initramfs compression: every format the builder writes reads back to the same cpio."""

from __future__ import annotations

from pathlib import Path

import pytest

from rootfs import cpio, pack
from rootfs.steps import BuildError


@pytest.mark.parametrize("compression", pack.COMPRESSION)
def test_initramfs_round_trips_in_every_compression(tmp_path: Path, compression: str) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("guest\n")
    out = tmp_path / compression
    out.mkdir()
    image = pack.initramfs(root, out, 1700000000, level=1, compression=compression)
    assert pack.compression_of(image) == compression
    assert pack.decompress(image) == pack.cpio_bytes(root, 1700000000)
    paths = {e.path for e in cpio.read(pack.decompress(image))}
    assert {"etc/hostname", "dev/console"} <= paths
    again = tmp_path / "again"
    again.mkdir()
    # same input, same bytes: lz4 -l and zstd write no timestamps or names
    assert pack.initramfs(root, again, 1700000000, level=1,
                          compression=compression).read_bytes() == image.read_bytes()


def test_unknown_compression_and_foreign_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="compression 'xz': use one of lz4, zstd, none"):
        pack.initramfs(tmp_path, tmp_path, 0, compression="xz")
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"\x1f\x8b\x08\x00 gzip")
    with pytest.raises(BuildError, match=r"odd.img: not an initramfs this builder writes"):
        pack.decompress(odd)
