"""Shared fixtures: the cached Debian kernel package and the cpu image built twice.

Downloads go to the builder's cache (``~/.cache/guestinit``) on first use, so
later runs and CI reruns with a warm cache are fast.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from rootfs import fetch, kernel, profile
from rootfs.build import build_image, pin_inputs
from rootfs.steps import Progress


@pytest.fixture(scope="session")
def kernel_tree() -> kernel.KernelTree:
    prof = profile.load("cpu")
    inputs = pin_inputs(prof, Progress(quiet=True), locked=False)
    root = fetch.extract_deb(inputs.debs[inputs.kernel_package])
    return kernel.open_tree(root, inputs.kernel_package)


@pytest.fixture(scope="session")
def cpu_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The cpu image built twice from the same lock file: into two directories, the second
    under another umask, TMPDIR and locale (a rebuild anywhere gives the same bytes)."""
    base = tmp_path_factory.mktemp("images")
    prof = profile.load("cpu")
    outs = (base / "a" / "cpu", base / "other place" / "b" / "cpu")
    build_image(prof, outs[0], locked=True, progress=Progress(quiet=True))
    other_tmp = base / "tmp elsewhere"
    other_tmp.mkdir()
    saved_env = {k: os.environ.get(k) for k in ("TMPDIR", "LC_ALL", "LANG", "TZ")}
    saved_umask = os.umask(0o027)
    os.environ.update(TMPDIR=str(other_tmp), LC_ALL="C", LANG="C", TZ="Pacific/Kiritimati")
    tempfile.tempdir = None  # tempfile caches TMPDIR
    try:
        build_image(prof, outs[1], locked=True, progress=Progress(quiet=True))
    finally:
        os.umask(saved_umask)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        tempfile.tempdir = None
    return outs


@pytest.fixture
def cpu_copy(cpu_images: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the first build, free to tamper with."""
    dst = tmp_path / "cpu"
    shutil.copytree(cpu_images[0], dst)
    return dst
