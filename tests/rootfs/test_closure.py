"""ELF closure against real Debian packages; a missing library is an error naming both."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rootfs import closure, fetch, profile
from rootfs.build import pin_inputs
from rootfs.closure import Origin, Pool, Tree
from rootfs.steps import BuildError, Progress


@pytest.fixture(scope="module")
def libc_pool() -> Pool:
    inputs = pin_inputs(profile.load("cpu"), Progress(quiet=True), locked=False)
    pool = Pool()
    for name in ("libc6", "zlib1g", "libexpat1", "python3.11-minimal"):
        pool.add_package(fetch.extract_deb(inputs.debs[name]), Origin(name, "x"))
    return pool


def test_closure_pulls_libraries_from_the_pool(libc_pool: Pool, tmp_path: Path) -> None:
    tree = Tree(tmp_path / "t")
    tree.take(libc_pool, "/usr/bin/python3.11", "test")
    added = closure.elf_closure(tree, libc_pool)
    assert "usr/lib/x86_64-linux-gnu/libz.so.1" in added
    assert "usr/lib/x86_64-linux-gnu/libc.so.6" in added
    assert "usr/lib64/ld-linux-x86-64.so.2" in added  # PT_INTERP
    assert tree.origins["usr/lib/x86_64-linux-gnu/libz.so.1"].package == "zlib1g"
    assert closure.elf_closure(tree, libc_pool) == []  # a fixed point


def test_missing_library_names_binary_and_library(libc_pool: Pool, tmp_path: Path) -> None:
    tree = Tree(tmp_path / "t")
    # a real binary whose zlib is not among the pool's packages
    python = libc_pool.get("/usr/bin/python3.11")
    assert python is not None
    small = Pool({k: v for k, v in libc_pool.files.items() if "libz." not in k})
    tree.add_file("usr/bin/tool", python[0], Origin("x", "1"))
    with pytest.raises(BuildError, match=r"/usr/bin/tool needs libz\.so\.1"):
        closure.elf_closure(tree, small)


def test_tree_take_unknown_path(libc_pool: Pool, tmp_path: Path) -> None:
    tree = Tree(tmp_path / "t")
    with pytest.raises(BuildError, match=r"/usr/bin/nope .*needed by me"):
        tree.take(libc_pool, "/usr/bin/nope", "me")


def test_canonical_paths() -> None:
    assert closure.canonical("/lib64/ld-linux-x86-64.so.2") == "usr/lib64/ld-linux-x86-64.so.2"
    assert closure.canonical("/sbin/ldconfig") == "usr/sbin/ldconfig"
    assert closure.canonical("/etc/passwd") == "etc/passwd"


def test_python_scripts_found(tmp_path: Path) -> None:
    tree = Tree(tmp_path / "t")
    tree.add_bytes("usr/bin/tool", b"#!/usr/bin/python3 -IS\nimport json\n", Origin("x", "1"))
    tree.add_bytes("usr/bin/sh-tool", b"#!/bin/sh\n", Origin("x", "1"))
    assert [p.name for p in closure.python_scripts(tree)] == ["tool"]
    shutil.rmtree(tmp_path / "t")


def test_guest_code_importing_an_excluded_module_is_an_error(tmp_path: Path) -> None:
    inputs = pin_inputs(profile.load("cpu"), Progress(quiet=True), locked=False)
    pool = Pool()
    for name in ("libpython3.11-minimal", "libpython3.11-stdlib", "python3.11-minimal"):
        pool.add_package(fetch.extract_deb(inputs.debs[name]), Origin(name, "x"))
    tree = Tree(tmp_path / "t")
    site = "usr/lib/guestinit"
    tree.add_bytes(f"{site}/guestinit/__init__.py", b"", Origin("guestinit", "0"))
    tree.add_bytes(f"{site}/guestinit/ok.py", b"def f():\n    import json\n",
                   Origin("guestinit", "0"))
    found = closure.python_closure(tree, pool, ["guestinit", "guestinit.ok"], site)
    assert "usr/lib/python3.11/json/__init__.py" in found.files  # lazy import in a function
    # json -> re -> _sre, built into Debian's python3.11; _json is a lib-dynload file
    assert "_sre" in found.builtins and "_json" not in found.builtins
    tree.add_bytes(f"{site}/guestinit/bad.py", b"def f():\n    import asyncio\n",
                   Origin("guestinit", "0"))
    with pytest.raises(BuildError, match=r"guestinit\.bad imports asyncio"):
        closure.python_closure(tree, pool, ["guestinit", "guestinit.bad"], site)
