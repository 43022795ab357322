"""``pip install .`` (not editable) gives a working ``guestinit-build`` (DESIGN.md,
"Installable"): a copy of the project installed into a fresh venv builds the cpu image
from a directory outside the source tree, and ``guestinit-build verify`` passes.

The venv borrows the dependencies of the environment running the tests (a ``.pth`` line,
like ``--system-site-packages`` for a venv), so nothing is downloaded: the build's Debian
packages come from the builder's cache (``~/.cache/guestinit``) as in the other image
tests. Only the project itself is installed, ``--no-deps --no-build-isolation``: the
environment needs the build system's requirements (the ``test`` extra has them). In the
vm tier, beside the tests that build images with the installed ``guestinit-build``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from rootfs import proc, profile

REPO = Path(__file__).resolve().parents[2]
# what a checkout may hold beyond the sources: never part of an install
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "out", "results", "__pycache__",
                                   "*.egg-info", "build", ".*_cache")
OUTPUTS = ("vmlinuz", "initramfs.img", "rootfs.erofs", "rootfs.verity", "roothash.txt",
           "cmdline.txt", "manifest.json", "sbom.spdx.json")

pytestmark = pytest.mark.vm


def fresh_venv(where: Path) -> Path:
    """A venv without pip of its own that sees this environment's packages (not ours:
    the ``.pth`` adds a plain path, so an editable install's finder there stays off)."""
    proc.run([sys.executable, "-m", "venv", "--without-pip", str(where)], timeout=120)
    python = where / "bin" / "python"
    purelib = proc.run([str(python), "-c", "import sysconfig; "
                        "print(sysconfig.get_path('purelib'))"]).stdout.strip()
    borrowed = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (Path(purelib) / "borrowed-deps.pth").write_text("".join(f"{p}\n" for p in borrowed))
    return python


def clean_env() -> dict[str, str]:
    # nothing may lead the installed commands back to this checkout
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_an_installed_copy_builds_and_verifies_the_cpu_image(tmp_path: Path) -> None:
    if importlib.util.find_spec("wheel") is None:
        pytest.fail("the build without isolation needs the build system's requirements "
                    "(setuptools>=68, wheel) here: pip install -e '.[test]' brings them")
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=NOT_COPIED)
    python = fresh_venv(tmp_path / "venv")
    proc.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
              "--no-build-isolation", "--no-cache-dir", "."], cwd=str(src), timeout=300,
             env=clean_env())
    shutil.rmtree(src)  # the installed copy must stand on its own
    bin_dir = python.parent
    where = proc.run([str(python), "-c", "import rootfs.profile as p, bench, guestinit; "
                      "print(p.__file__, bench.__file__, guestinit.__file__)"],
                     cwd=str(tmp_path), env=clean_env()).stdout.split()
    assert all(path.startswith(str(tmp_path / "venv")) for path in where), where
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "image"
    proc.run([str(bin_dir / "guestinit-build"), "image", "cpu", "--out", str(out),
              "--locked", "-q"], cwd=str(elsewhere), timeout=1200, env=clean_env())
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    # the installed copy found its cmdline presets (kernel-config/cmdline/fast.txt)
    assert set(profile.load("cpu").cmdline()) <= set((out / "cmdline.txt").read_text().split())
    said = proc.run([str(bin_dir / "guestinit-build"), "verify", str(out),
                     "--allow-unsigned"], cwd=str(elsewhere), env=clean_env()).stdout
    assert said.startswith("ok: "), said
    guest = {row["path"] for row in json.loads((out / "manifest.json").read_text())["files"]}
    assert "/usr/sbin/init" in guest and "/usr/lib/guestinit/guestinit/__main__.py" in guest
    # bench's data files: the installed guestinit-bench checks results against its schemas
    proc.run([str(bin_dir / "guestinit-bench"), "--help"], cwd=str(elsewhere), env=clean_env())
    schema = proc.run([str(python), "-c", "from bench import suite_schema as s; "
                       "print(s.SCHEMA_PATH.is_file())"], cwd=str(elsewhere),
                      env=clean_env()).stdout
    assert schema.strip() == "True"
