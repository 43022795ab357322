"""The cpio newc writer: deterministic, readable by the real cpio tool, special nodes."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path

from rootfs import cpio
from rootfs.pack import SPECIAL_NODES, cpio_bytes


def make_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "b").write_text("bee\n")
    (root / "etc" / "a").write_text("a")
    (root / "init").write_text("#!/bin/sh\n")
    os.chmod(root / "init", 0o755)
    (root / "bin").symlink_to("usr/bin")


def test_same_tree_same_bytes_regardless_of_order_and_mtime(tmp_path: Path) -> None:
    make_tree(tmp_path / "x")
    make_tree(tmp_path / "y")
    os.utime(tmp_path / "y" / "init", (1, 1))
    entries = cpio.entries_from_dir(tmp_path / "y")
    a = io.BytesIO()
    b = io.BytesIO()
    cpio.write(a, cpio.entries_from_dir(tmp_path / "x"), 1234)
    cpio.write(b, list(reversed(entries)), 1234)
    assert a.getvalue() == b.getvalue()
    c = io.BytesIO()
    cpio.write(c, entries, 1235)
    assert c.getvalue() != a.getvalue()


def test_roundtrip_and_real_cpio_listing(tmp_path: Path) -> None:
    make_tree(tmp_path / "t")
    data = cpio_bytes(tmp_path / "t", 1700000000)
    entries = {e.path: e for e in cpio.read(data)}
    assert entries["etc/b"].data == b"bee\n"
    assert stat.S_IMODE(entries["init"].mode) == 0o755
    assert entries["bin"].data == b"usr/bin" and stat.S_ISLNK(entries["bin"].mode)
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and console.rdev == (5, 1)
    listing = subprocess.run(["cpio", "-tv", "--quiet"], input=data, capture_output=True,
                             check=True).stdout.decode().splitlines()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing]
    assert names == sorted(names, key=cpio.sort_key)
    assert all(" root " in line or " 0 " in line for line in listing)
    assert any(line.startswith("crw") and "dev/console" in line for line in listing)
    assert {e.path for e in SPECIAL_NODES} <= set(names)


def test_parents_before_children() -> None:
    paths = ["usr/bin", "usr-x", "usr", "usr/bin/python3.11", "a"]
    ordered = sorted(paths, key=cpio.sort_key)
    assert ordered.index("usr") < ordered.index("usr/bin") < ordered.index("usr/bin/python3.11")
