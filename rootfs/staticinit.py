"""The static init (profile key ``static_init``): ``staticinit.c`` + frozen.c + cffi's
``_cffi_backend.c`` linked against Debian's ``libpython3.11.a``, cached by hash.

One static executable: no ld.so, no PIC libc, no stdlib files on the boot path (issue
#24). Like the launcher it is built with ``-s``, no build id and the build directory
mapped to ``.``, so equal inputs give equal bytes. ``_cffi_backend`` comes from the cffi
sdist of the version the lock pins for the wheel (cached under ``<cache>/sdist/``), with
libffi's static library; guestinit keeps cffi's ABI mode (``ffi.dlopen(None)``), answered
from a generated table of the libc functions it declares (staticinit.c, ``gi_dlopen``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from rootfs import fetch, freeze, launcher
from rootfs.steps import BuildError, run

SOURCE = Path(__file__).with_name("staticinit.c")
PY_CONFIG = Path("/usr/lib/python3.11/config-3.11-x86_64-linux-gnu")
PY_INCLUDE = Path("/usr/include/python3.11")
LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
# what must exist on the builder -> the package that brings it
NEEDS = {
    PY_INCLUDE / "Python.h": "libpython3.11-dev",
    PY_CONFIG / "libpython3.11.a": "libpython3.11-dev",
    PY_CONFIG / "config.c": "libpython3.11-dev",
    Path("/usr/include/x86_64-linux-gnu/ffi.h"): "libffi-dev",
    LIBDIR / "libffi.a": "libffi-dev",
    LIBDIR / "libz.a": "zlib1g-dev",
    LIBDIR / "libexpat.a": "libexpat1-dev",
}
CFLAGS = ("-static", "-O2", "-s", "-std=gnu11", "-w", "-fwrapv", "-Wl,--build-id=none")
LIBS = ("-lffi", "-lexpat", "-lz", "-lm", "-ldl", "-lpthread", "-lutil")
# cffi's setup.py macros for a static libffi on Linux; its dl* calls renamed to the init's
CFFI_DEFINES = ("-DFFI_BUILDING=1", "-DUSE__THREAD", "-DHAVE_SYNC_SYNCHRONIZE",
                "-Ddlopen=gi_dlopen", "-Ddlsym=gi_dlsym", "-Ddlerror=gi_dlerror",
                "-Ddlclose=gi_dlclose")


def check_builder(needs: dict[Path, str] | None = None) -> None:
    """BuildError naming the package to install for each missing header or library."""
    missing = sorted({f"{path} ({pkg})" for path, pkg in (needs or NEEDS).items()
                      if not path.exists()})
    if missing:
        pkgs = sorted({pkg for path, pkg in (needs or NEEDS).items() if not path.exists()})
        raise BuildError(f"static init: missing {', '.join(missing)}; "
                         f"apt-get install {' '.join(pkgs)}")


def cffi_sdist(version: str, cache: Path | None = None) -> Path:
    """cffi-<version>.tar.gz, downloaded once with pip into ``<cache>/sdist/``."""
    dest = (cache or fetch.cache_dir()) / "sdist"
    path = dest / f"cffi-{version}.tar.gz"
    if path.is_file():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
         "--no-build-isolation", "-d", dest, f"cffi=={version}"],
        what=f"download sdist cffi=={version}")
    if not path.is_file():
        raise BuildError(f"download sdist cffi=={version}: pip saved no {path.name} in {dest}")
    return path


def extract_backend(sdist: Path, dest: Path) -> Path:
    """cffi's ``src/c`` and ``src/cffi`` (``_cffi_backend.c`` and what it includes)."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()  # plain files under src/c/, nothing outside
                   if ("/src/c/" in m.name or "/src/cffi/" in m.name) and m.isfile()
                   and ".." not in m.name.split("/") and not m.name.startswith("/")]
        if not members:
            raise BuildError(f"extract {sdist.name}: no src/c/ in the sdist")
        tar.extractall(dest, members=members)
    return next(dest.glob("*/src/c"))


def compile_argv(dest: Path, build: Path, backend: Path, cc: str = "gcc") -> list[str]:
    return [cc, *CFLAGS, f"-ffile-prefix-map={build}=.", f"-ffile-prefix-map={SOURCE.parent}=.",
            f"-I{PY_INCLUDE}", f"-I{backend}", *CFFI_DEFINES, "-o", str(dest),
            str(SOURCE), str(build / "frozen.c"), str(build / "libc.c"),
            str(backend / "_cffi_backend.c"),
            str(PY_CONFIG / "libpython3.11.a"), *LIBS]


def static_init_binary(stdlib: Path, python_version: str, cffi_version: str,
                       cache: Path | None = None,
                       guest_src: Path | None = None) -> tuple[Path, list[str]]:
    """The static init from ``<cache>/staticinit/`` (built there on a miss) and the names of
    the modules frozen into it. ``stdlib`` is the image's stdlib directory (the sources
    frozen), ``python_version`` the image's python3.11 package version; ``guest_src`` a
    guestinit package directory other than the installed one (tests)."""
    check_builder()
    freeze.check_version(python_version)
    generated, names = freeze.generate(stdlib, PY_CONFIG / "config.c", guest_src=guest_src)
    sdist = cffi_sdist(cffi_version, cache)
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), launcher.COMMON.read_bytes(),
                 *(generated[n].encode() for n in sorted(generated)),
                 fetch.sha256_file(sdist).encode(),
                 " ".join((*CFLAGS, *LIBS, *CFFI_DEFINES)).encode(),
                 fetch.sha256_file(PY_CONFIG / "libpython3.11.a").encode(),
                 launcher.toolchain_id("gcc").encode()):
        key.update(part + b"\0")
    cache_dir = (cache or fetch.cache_dir()) / "staticinit"
    cached = cache_dir / f"init-{key.hexdigest()[:20]}"
    if cached.is_file():
        return cached, names
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staticinit-", dir=cache_dir) as tmp:
        build = Path(tmp)
        for name, text in generated.items():
            (build / name).write_text(text)
        backend = extract_backend(sdist, build / "cffi")
        if shutil.which("gcc") is None:
            raise BuildError("compile staticinit.c: gcc not found; apt-get install gcc")
        run(compile_argv(build / "init", build, backend), what="compile the static init")
        os.replace(build / "init", cached)  # atomic: concurrent builds never see half a binary
    return cached, names
