"""Fixtures of the guest unit tier."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from guestinit.nvidia import fabric
from guestinit.testing import fake_fabric

STANDIN = Path(fake_fabric.__file__).with_name("libnvfm_standin.c")


@pytest.fixture(scope="session")
def nvfm(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """libnvfm.so.1 built from the stand-in, and the binding compiled against it."""
    root = tmp_path_factory.mktemp("nvfm")
    lib = root / "lib"
    lib.mkdir()
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
                    f"-I{Path(fabric.HEADER).parent}", "-Wl,-soname,libnvfm.so.1",
                    "-o", str(lib / "libnvfm.so.1"), str(STANDIN)], check=True)
    (lib / "libnvfm.so").symlink_to("libnvfm.so.1")
    built = fabric.build(root / "module", lib)
    sys.path.insert(0, str(built.parent))
    try:
        return importlib.import_module(fabric.MODULE)
    finally:
        sys.path.remove(str(built.parent))
