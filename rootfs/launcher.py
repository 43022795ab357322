"""The image's /sbin/init: ``launcher.c`` compiled with the host's gcc, cached by hash.

Static, so the first exec of the boot needs no loader, no ld.so.cache and no library
lookups, and an exec failure can still be reported when the interpreter's libraries are
broken. ``-s``, no build id and the source directory mapped to ``.`` keep the bytes the
same on every build with the same compiler and libc. With musl (``musl-gcc``, Debian's
musl-tools) the binary is 17 KiB; with glibc's static libc it is 707 KiB, which every
boot pays for when the kernel unpacks the initramfs; musl is used when installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from rootfs import fetch
from rootfs.steps import BuildError, run

SOURCE = Path(__file__).with_name("launcher.c")
COMMON = Path(__file__).with_name("init_common.h")  # shared with staticinit.c
APT_HINT = "apt-get install musl-tools (or gcc libc6-dev)"
CFLAGS = ("-static", "-Os", "-s", "-std=gnu11", "-Wall", "-Wextra", "-Werror",
          "-Wl,--build-id=none", f"-ffile-prefix-map={SOURCE.parent}=.")


def compile_argv(dest: Path, defines: Mapping[str, str], cc: str = "gcc",
                 source: Path = SOURCE) -> list[str]:
    """gcc's argv; ``defines`` values are C literals (``'"/usr/bin/python3"'``)."""
    return [cc, *CFLAGS, *(f"-D{k}={v}" for k, v in sorted(defines.items())),
            "-o", str(dest), str(source)]


def compile_launcher(dest: Path, defines: Mapping[str, str] | None = None,
                     cc: str | None = None, source: Path = SOURCE) -> Path:
    """Compile the launcher to ``dest`` (with musl-gcc when installed, else gcc);
    BuildError names the packages when the compiler or the static C library is missing."""
    cc = cc or default_cc()
    _need_compiler(cc, source)
    try:
        run(compile_argv(dest, defines or {}, cc, source), what=f"compile {source.name}")
    except BuildError as exc:  # "cannot find -lc", "stdio.h: No such file": libc6-dev
        raise BuildError(f"{exc}\n(the launcher needs gcc and the static C library: "
                         f"{APT_HINT})") from None
    return dest


def toolchain_id(cc: str = "gcc") -> str:
    """What the binary depends on besides the source: compiler version and target."""
    _need_compiler(cc, SOURCE)
    return run([cc, "-dumpfullversion", "-dumpmachine"], what=f"{cc} version").decode()


def _need_compiler(cc: str, source: Path) -> None:
    if shutil.which(cc) is None:
        raise BuildError(f"compile {source.name}: C compiler {cc} not found; "
                         f"install it: {APT_HINT}")


def default_cc() -> str:
    return "musl-gcc" if shutil.which("musl-gcc") else "gcc"


def launcher_binary(cache: Path | None = None, cc: str | None = None) -> Path:
    """The compiled launcher from ``<cache>/launcher/`` (built there on a miss)."""
    cc = cc or default_cc()
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), COMMON.read_bytes(), " ".join(CFLAGS).encode(), cc.encode(),
                 toolchain_id(cc).encode()):
        key.update(part + b"\0")
    cache_dir = (cache or fetch.cache_dir()) / "launcher"
    cached = cache_dir / f"init-{key.hexdigest()[:20]}"
    if cached.is_file():
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".launcher-", dir=cache_dir) as tmp:
        built = compile_launcher(Path(tmp) / "init", cc=cc)
        os.replace(built, cached)  # atomic: concurrent builds never see half a binary
    return cached
