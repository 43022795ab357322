"""The NVIDIA driver's userspace in the image, as the CDI spec hands it to containers.

What ``nvidia-ctk cdi generate`` mounts, found the way it finds them but without NVML:
the libraries ``lib*.so.<driver version>`` of the library directory (the version from
``/proc/driver/nvidia/version``), the utility binaries, the GSP firmware of that version
and the daemons' sockets; and the ``nvidia-cdi-hook`` hooks that give a container the
libraries' soname links and an ld cache entry, when the hook binary is in the image.
Readers take the root; ``mounts`` and ``hooks`` are pure. ``read_soname`` reads
DT_SONAME itself: importing pyelftools costs ~50 ms on the 2-core build host (10-20x that
under TCG) for one field per library; a test checks the reader against pyelftools.
"""

from __future__ import annotations

import os

from guestinit.sysfs import read_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

LIBDIR = "/usr/lib/x86_64-linux-gnu"
HOOK = "/usr/bin/nvidia-cdi-hook"
BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
            "nvidia-cuda-mps-server")
# each socket where it may be; the first that exists is mounted (/var/run is usually /run)
SOCKETS = (("/run/nvidia-persistenced/socket", "/var/run/nvidia-persistenced/socket"),
           ("/run/nvidia-fabricmanager/socket", "/var/run/nvidia-fabricmanager/socket"))
FILE_OPTIONS = ("ro", "nosuid", "nodev", "bind")
SOCKET_OPTIONS = ("nosuid", "nodev", "bind", "noexec")  # writable: clients connect to it
# the unversioned names nvidia-ctk links (programs dlopen "libcuda.so"; the rest use sonames)
DEV_LINKS = ("libcuda", "libnvidia-opticalflow")
MAX_DYNAMIC = 1 << 16  # bytes of PT_DYNAMIC read: a few hundred entries at most in practice


def parse_driver_version(text: str) -> str:
    """The version of the ``NVRM version:`` line of ``/proc/driver/nvidia/version``
    (proprietary "... Kernel Module  550.54.15  Tue ..." and "... Open Kernel Module for
    x86_64  550.54.15  Release Build ..." alike); "" if there is none."""
    for line in text.splitlines():
        if not line.startswith("NVRM version:"):
            continue
        for token in line.split():
            parts = token.split(".")
            if len(parts) >= 2 and all(p.isdigit() for p in parts):
                return token
    return ""


def _u(data: bytes, at: int, size: int) -> int:
    return int.from_bytes(data[at:at + size], "little")


def read_soname(path: str) -> str:
    """DT_SONAME of a 64-bit little-endian ELF object (x86_64, aarch64), as ldconfig reads
    it; "" for other files or an object without one. OSError if it cannot be read."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return ""
        phoff, phentsize, phnum = _u(head, 32, 8), _u(head, 54, 2), _u(head, 56, 2)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        loads, dynamic = [], None
        for at in range(0, len(table) - 55, phentsize):
            kind, offset, vaddr, filesz = (_u(table, at, 4), _u(table, at + 8, 8),
                                           _u(table, at + 16, 8), _u(table, at + 32, 8))
            if kind == 1:  # PT_LOAD: how the string table's address maps to the file
                loads.append((vaddr, offset, filesz))
            elif kind == 2:  # PT_DYNAMIC
                dynamic = (offset, min(filesz, MAX_DYNAMIC))
        if dynamic is None:
            return ""
        f.seek(dynamic[0])
        entries = f.read(dynamic[1])
        strtab = soname = -1
        for at in range(0, len(entries) - 15, 16):
            tag, value = _u(entries, at, 8), _u(entries, at + 8, 8)
            if tag == 0:  # DT_NULL
                break
            if tag == 5:  # DT_STRTAB
                strtab = value
            elif tag == 14:  # DT_SONAME
                soname = value
        if strtab < 0 or soname < 0:
            return ""
        for vaddr, offset, filesz in loads:
            if vaddr <= strtab < vaddr + filesz:
                f.seek(offset + strtab - vaddr + soname)
                return os.fsdecode(f.read(256).split(b"\0", 1)[0])
        return ""


class Library:
    __slots__ = ("path", "soname")

    def __init__(self, path: str, soname: str) -> None:
        self.path = path  # in the image, e.g. /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15
        self.soname = soname  # "libcuda.so.1"; "" if the file has none

    def __repr__(self) -> str:
        return f"Library({self.path} soname {self.soname or '-'})"


class Userspace:
    """What the image holds of the driver's userspace; paths as the guest sees them."""

    __slots__ = ("binaries", "firmware", "hook", "libdir", "libraries", "sockets", "version")

    def __init__(self, version: str, libdir: str, libraries: Sequence[Library],
                 binaries: Sequence[str] = (), firmware: Sequence[str] = (),
                 sockets: Sequence[str] = (), hook: str = "") -> None:
        self.version = version  # "" when the driver did not say
        self.libdir = libdir
        self.libraries = list(libraries)
        self.binaries = list(binaries)
        self.firmware = list(firmware)
        self.sockets = list(sockets)
        self.hook = hook  # the nvidia-cdi-hook path when the image has it, else ""


def _files(root: str, directory: str, want: str = "") -> list[str]:
    """Regular files (not symlinks) of ``directory`` ending in ``want``, sorted, as paths
    in the image; none if the directory is missing."""
    try:
        entries = list(os.scandir(os.path.join(root, directory.lstrip("/"))))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(f"{directory.rstrip('/')}/{e.name}" for e in entries
                  if e.name.endswith(want) and e.is_file(follow_symlinks=False))


def read_userspace(root: str, libdir: str = LIBDIR, bindir: str = "/usr/bin",
                   hook: str = HOOK) -> Userspace:
    """The driver's files in the image under ``root``; OSError names a library it cannot
    read."""
    def there(path: str) -> bool:
        return os.path.lexists(os.path.join(root, path.lstrip("/")))

    text = read_text(os.path.join(root, "proc/driver/nvidia/version"), (FileNotFoundError,))
    version = "" if text is None else parse_driver_version(text)
    libraries, firmware = [], []
    if version:
        for path in _files(root, libdir, f".so.{version}"):
            if os.path.basename(path).startswith("lib"):
                libraries.append(Library(path, read_soname(os.path.join(root, path.lstrip("/")))))
        firmware = _files(root, f"/lib/firmware/nvidia/{version}")
    binaries = [p for p in (f"{bindir.rstrip('/')}/{b}" for b in BINARIES)
                if os.path.isfile(os.path.join(root, p.lstrip("/")))]
    sockets = [found[0] for found in ([p for p in places if there(p)] for places in SOCKETS)
               if found]
    return Userspace(version, libdir, libraries, binaries, firmware, sockets,
                     hook if os.path.isfile(os.path.join(root, hook.lstrip("/"))) else "")


def mounts(files: Userspace) -> list[dict[str, object]]:
    """Bind mounts at the same path: libraries, binaries, firmware read-only, then the
    sockets. No ``type`` field: bind mounts need none, and it would ask for CDI 0.4.0."""
    paths = [*(lib.path for lib in files.libraries), *files.binaries, *files.firmware]
    out: list[dict[str, object]] = [
        {"hostPath": p, "containerPath": p, "options": list(FILE_OPTIONS)} for p in paths]
    out += [{"hostPath": p, "containerPath": p, "options": list(SOCKET_OPTIONS)}
            for p in files.sockets]
    return out


def symlinks(libraries: Sequence[Library]) -> list[tuple[str, str]]:
    """(target, link) of each library's soname link and, for the DEV_LINKS, its unversioned
    link (``libcuda.so`` -> ``libcuda.so.1``), sorted by link."""
    out = []
    for lib in libraries:
        directory, name = os.path.split(lib.path)
        if lib.soname and lib.soname != name:
            out.append((name, f"{directory}/{lib.soname}"))
        stem = name.split(".so.", 1)[0]
        if stem in DEV_LINKS:
            out.append((lib.soname or name, f"{directory}/{stem}.so"))
    return sorted(out, key=lambda pair: pair[1])


def hooks(files: Userspace) -> list[dict[str, object]]:
    """createContainer hooks: ``create-symlinks`` (nvidia-ctk's ``target::link`` form) and
    ``update-ldcache``; none without the hook binary or without libraries to link."""
    if not files.hook or not files.libraries:
        return []
    out: list[dict[str, object]] = []
    links = symlinks(files.libraries)
    if links:
        args = ["nvidia-cdi-hook", "create-symlinks"]
        for target, link in links:
            args += ["--link", f"{target}::{link}"]
        out.append({"hookName": "createContainer", "path": files.hook, "args": args})
    out.append({"hookName": "createContainer", "path": files.hook,
                "args": ["nvidia-cdi-hook", "update-ldcache", "--folder", files.libdir]})
    return out
