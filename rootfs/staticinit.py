"""The image's Python executable (profile key ``static_init``): ``staticinit.c`` + frozen.c
+ cffi's ``_cffi_backend.c`` linked with Debian's ``libpython3.11.a``, cached by hash.

One executable is both ``/usr/bin/python3.11`` and, through the ``/usr/sbin/init`` link,
the init with guestinit frozen in (issue #24): no launcher exec, no module search on the
boot path, and no second interpreter in the image. libpython, libffi, zlib and expat are
linked from their static libraries; glibc stays shared and the executable exports its
symbols (``-Wl,-E``, non-PIE as Debian's python3.11), so extension modules (lib-dynload,
psutil's) load as under Debian's python3.11. Like the launcher it is built with ``-s``, no
build id and the build directory mapped to ``.``, so equal inputs give equal bytes.
``_cffi_backend`` comes from the cffi sdist of the version the lock pins for the wheel
(cached under ``<cache>/sdist/``, sha256 checked against the lock's ``sdists`` table).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from guestinit import _libc_build
from rootfs import closure, fetch, freeze, launcher
from rootfs.steps import BuildError, run

SOURCE = Path(__file__).with_name("staticinit.c")
PYTHON = "usr/bin/python3.11"  # where the image has it; /sbin/init links to it
BUILT_IN = ("_cffi_backend.",)  # wheel files compiled into the executable (not installed)
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
# the Debian packages on the builder whose static libraries the executable links in
LINKED_DEBS = tuple(dict.fromkeys(NEEDS.values()))
# non-PIE (Debian's libpython3.11.a is not PIC) with every symbol exported for the
# extension modules it loads
CFLAGS = ("-no-pie", "-O2", "-s", "-std=gnu11", "-w", "-fwrapv", "-Wl,--build-id=none",
          "-Wl,-E")
# libffi, expat, zlib linked in: the image carries no copy of them for the interpreter
LIBS = (str(LIBDIR / "libffi.a"), str(LIBDIR / "libexpat.a"), str(LIBDIR / "libz.a"),
        "-lm", "-ldl", "-lpthread", "-lutil")
# cffi's setup.py macros for a static libffi on Linux
CFFI_DEFINES = ("-DFFI_BUILDING=1", "-DUSE__THREAD", "-DHAVE_SYNC_SYNCHRONIZE")


def check_builder(needs: dict[Path, str] | None = None) -> None:
    """BuildError naming the package to install for each missing header or library."""
    missing = sorted({f"{path} ({pkg})" for path, pkg in (needs or NEEDS).items()
                      if not path.exists()})
    if missing:
        pkgs = sorted({pkg for path, pkg in (needs or NEEDS).items() if not path.exists()})
        raise BuildError(f"the image's python3.11 executable (static_init): missing "
                         f"{', '.join(missing)}; apt-get install {' '.join(pkgs)}")


def cffi_sdist(version: str, cache: Path | None = None, pin: fetch.Pin | None = None) -> Path:
    """cffi-<version>.tar.gz, downloaded once with pip into ``<cache>/sdist/``; with a
    ``pin`` (the lock's ``sdists.cffi``) its sha256 must match."""
    dest = (cache or fetch.cache_dir()) / "sdist"
    path = dest / f"cffi-{version}.tar.gz"
    if not path.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "--no-build-isolation", "-d", dest, f"cffi=={version}"],
            what=f"download sdist cffi=={version}")
        if not path.is_file():
            raise BuildError(f"download sdist cffi=={version}: pip saved no {path.name} in {dest}")
    if pin is not None:
        have = fetch.sha256_file(path)
        if pin.version != version or have != pin.sha256:
            path.unlink()  # the next build downloads it again
            raise BuildError(f"sdist {path.name}: sha256 {have} (version {version}) but the "
                             f"lock pins {pin.filename} sha256 {pin.sha256}; if cffi was "
                             "re-locked on purpose, run `guestinit-build lock PROFILE`")
    return path


def sdist_pin(version: str, cache: Path | None = None) -> fetch.Pin:
    """The lock entry for the cffi sdist of ``version`` (downloaded if needed)."""
    path = cffi_sdist(version, cache)
    return fetch.Pin("cffi", version, fetch.sha256_file(path), path.name)


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
    """gcc's argv; a generated ``config.c`` in ``build`` (the trimmed inittab) is linked
    before libpython, whose own config.o is then left out."""
    config = [str(build / "config.c")] if (build / "config.c").is_file() else []
    return [cc, *CFLAGS, f"-ffile-prefix-map={build}=.", f"-ffile-prefix-map={SOURCE.parent}=.",
            f"-I{PY_INCLUDE}", f"-I{backend}", *CFFI_DEFINES, "-o", str(dest),
            str(SOURCE), str(build / "frozen.c"), str(build / "libc.c"), *config,
            str(backend / "_cffi_backend.c"),
            str(PY_CONFIG / "libpython3.11.a"), *LIBS]


def static_init_binary(stdlib: Path, python_version: str, cffi_version: str,
                       cache: Path | None = None, guest_src: Path | None = None,
                       pin: fetch.Pin | None = None,
                       builtins: Iterable[str] | None = None) -> tuple[Path, list[str]]:
    """The executable from ``<cache>/staticinit/`` (built there on a miss) and the names of
    the modules frozen into it. ``stdlib`` is the image's stdlib directory (the sources
    frozen), ``python_version`` the image's python3.11 package version; ``guest_src`` a
    guestinit package directory other than the installed one (tests); ``pin`` the lock's
    cffi sdist; ``builtins`` the built-in modules the image's Python code imports
    (closure.python_closure): the others of libpython's Modules/Setup block are left out
    (all are linked when None)."""
    check_builder()
    freeze.check_version(python_version)
    generated, names = freeze.generate(stdlib, PY_CONFIG / "config.c", guest_src=guest_src,
                                       builtins=builtins)
    generated["libc.c"] = _libc_build.api_c_code()  # cffi's API mode (needs pycparser)
    sdist = cffi_sdist(cffi_version, cache, pin)
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
        run(compile_argv(build / "init", build, backend),
            what="compile the image's python3.11 executable")
        os.replace(build / "init", cached)  # atomic: concurrent builds never see half a binary
    return cached, names


def install(tree: closure.Tree, pool: closure.Pool, lock: fetch.Lock, builtins: Iterable[str],
            origin: closure.Origin) -> str:
    """Build the executable for the image (``builtins``: what its Python code imports, from
    the Python closure), add it at ``/usr/bin/python3.11`` and take the frozen stdlib
    modules' files back out of the tree; a progress line saying what it did."""
    if "cffi" not in lock.sdists:
        raise BuildError(f"lock file {lock.path}: no [sdists.\"cffi\"] (the static_init "
                         "executable compiles it in); run `guestinit-build lock PROFILE`")
    with tempfile.TemporaryDirectory(prefix="guestinit-freeze-") as tmp:
        stdlib = closure.stdlib_view(pool, Path(tmp) / "stdlib")
        binary, frozen = static_init_binary(
            stdlib, lock.debs["python3.11-minimal"].version, lock.wheels["cffi"].version,
            pin=lock.sdists["cffi"], builtins=builtins)
        removed = 0
        for name in frozen:
            found = None if name.startswith("guestinit") else freeze.stdlib_source(name, stdlib)
            if found is not None:
                path = f"{closure.PY_STDLIB}/{found[0].relative_to(stdlib)}"
                if tree.has(path):
                    tree.remove(path)
                    removed += 1
    tree.add_file(PYTHON, binary, origin, 0o755)
    _, left_out = freeze.trim_config(freeze.read_config(PY_CONFIG / "config.c"), builtins)
    return (f"python3.11 + init: {binary.stat().st_size} bytes, {len(frozen)} modules frozen "
            f"({removed} stdlib files left out), built-ins not imported left out: "
            f"{', '.join(left_out) or 'none'}")




def static_links(lock: fetch.Lock, tools: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """The manifest's ``static_links`` for the executable: cffi's sdist (the lock's pin) and
    the builder's Debian packages it links (their versions from ``tools``)."""
    pin = lock.sdists["cffi"]
    comps = [{"name": "cffi", "version": pin.version, "kind": "sdist", "file": pin.filename,
              "sha256": pin.sha256}]
    comps += [{"name": deb, "version": tools.get(deb, ""), "kind": "deb", "file": "",
               "sha256": ""} for deb in LINKED_DEBS]
    return {f"/{PYTHON}": comps}
