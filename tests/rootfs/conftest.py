"""Shared fixtures: the cached Debian kernel package and the cpu image built twice.

Downloads go to the builder's cache (``~/.cache/guestinit``) on first use, so
later runs and CI reruns with a warm cache are fast.
"""

from __future__ import annotations

import shutil
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
    """The cpu image built twice from the same lock file into two directories."""
    base = tmp_path_factory.mktemp("images")
    prof = profile.load("cpu")
    outs = (base / "a" / "cpu", base / "b" / "cpu")
    for out in outs:
        build_image(prof, out, locked=True, progress=Progress(quiet=True))
    return outs


@pytest.fixture
def cpu_copy(cpu_images: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the first build, free to tamper with."""
    dst = tmp_path / "cpu"
    shutil.copytree(cpu_images[0], dst)
    return dst
