"""What goes into the tree: the package pool, ELF DT_NEEDED closure and the Python import graph.

The staging tree is usr-merged (``/lib``, ``/bin``, ``/sbin``, ``/lib64`` are links
into ``/usr``), so pool paths from bookworm's packages are canonicalized the same
way before lookup.
"""

from __future__ import annotations

import modulefinder
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rootfs.steps import BuildError

MERGED = {"lib": "usr/lib", "lib64": "usr/lib64", "bin": "usr/bin", "sbin": "usr/sbin"}
LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib", "usr/lib64")
PY_STDLIB = "usr/lib/python3.11"
# Imported by the interpreter itself before any of our code (not seen by modulefinder).
PY_STARTUP = ("encodings", "encodings.aliases", "encodings.utf_8", "encodings.ascii",
              "encodings.latin_1", "os", "codecs", "io", "abc", "stat", "posixpath",
              "genericpath", "_collections_abc")
# Never part of a guest: reached only through optional code paths of other stdlib modules
# (asyncio and http via inspect/pprint chains, tarfile/bz2/lzma via shutil's archive
# helpers, ssl/_hashlib via http.client and hashlib's OpenSSL backend: Debian builds the
# hash functions in, so hashlib works without libcrypto). guestinit's own code importing
# one of these is a build error (python_closure), so nothing can silently go missing.
PY_EXCLUDES = ["tkinter", "_tkinter", "idlelib", "lib2to3", "pydoc", "pydoc_data", "doctest",
               "unittest", "test", "ensurepip", "venv", "distutils", "turtle", "turtledemo",
               "_pyrepl", "pdb", "curses", "readline", "sqlite3", "_sqlite3", "dbm",
               "asyncio", "multiprocessing", "concurrent", "xmlrpc", "http", "email", "ssl",
               "_ssl", "_hashlib", "tarfile", "lzma", "_lzma", "bz2", "_bz2", "decimal",
               "_decimal", "_pydecimal", "statistics", "xml", "pyexpat", "mailbox", "smtplib",
               "ftplib", "imaplib", "poplib", "nntplib", "webbrowser", "cgi"]


def canonical(image_path: str) -> str:
    """``/lib/x/y`` -> ``usr/lib/x/y`` (relative, usr-merged)."""
    rel = image_path.lstrip("/")
    head, _, rest = rel.partition("/")
    if head in MERGED:
        return f"{MERGED[head]}/{rest}" if rest else MERGED[head]
    return rel


@dataclass(frozen=True)
class Origin:
    package: str
    version: str


@dataclass
class Pool:
    """Files of the profile's unpacked debs, by canonical path."""

    files: dict[str, tuple[Path, Origin]] = field(default_factory=dict)

    def add_package(self, root: Path, origin: Origin) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                host = Path(dirpath, name)
                rel = canonical(str(host.relative_to(root)))
                self.files.setdefault(rel, (host, origin))

    def get(self, image_path: str) -> tuple[Path, Origin] | None:
        return self.files.get(canonical(image_path))


@dataclass
class Tree:
    """The staging directory plus where each file came from."""

    root: Path
    origins: dict[str, Origin] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for link, target in MERGED.items():
            (self.root / target).mkdir(parents=True, exist_ok=True)
            if not (self.root / link).is_symlink():
                (self.root / link).symlink_to(target)

    def host(self, image_path: str) -> Path:
        return self.root / canonical(image_path)

    def has(self, image_path: str) -> bool:
        return self.host(image_path).exists()

    def add_file(self, image_path: str, src: Path, origin: Origin, mode: int | None = None) -> None:
        dst = self.host(image_path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)  # follows links: the image gets the real bytes
        st_mode = mode if mode is not None else stat.S_IMODE(src.stat().st_mode)
        os.chmod(dst, st_mode & 0o7777)
        self.origins[canonical(image_path)] = origin

    def add_bytes(self, image_path: str, data: bytes, origin: Origin, mode: int = 0o644) -> None:
        dst = self.host(image_path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        os.chmod(dst, mode)
        self.origins[canonical(image_path)] = origin

    def add_symlink(self, image_path: str, target: str) -> None:
        dst = self.host(image_path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(target)

    def mkdir(self, image_path: str, mode: int = 0o755) -> None:
        dst = self.host(image_path)
        dst.mkdir(parents=True, exist_ok=True)
        os.chmod(dst, mode)

    def remove(self, image_path: str) -> None:
        """Take a file back out of the tree (it must be there)."""
        self.host(image_path).unlink()
        self.origins.pop(canonical(image_path), None)

    def take(self, pool: Pool, image_path: str, needed_by: str) -> None:
        found = pool.get(image_path)
        if found is None:
            raise BuildError(f"assemble tree: {image_path} (needed by {needed_by}) is in none "
                             "of the profile's Debian packages; add the package to `debs`")
        self.add_file(image_path, found[0], found[1])


# --- ELF closure -------------------------------------------------------------------------

def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def elf_needs(path: Path) -> tuple[list[str], list[str], str | None]:
    """(DT_NEEDED, RUNPATH/RPATH entries, PT_INTERP) of an ELF file."""
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile
    from elftools.elf.segments import InterpSegment

    needed: list[str] = []
    runpath: list[str] = []
    interp = None
    with path.open("rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            if isinstance(seg, InterpSegment):
                interp = seg.get_interp_name()
        for sec in elf.iter_sections():
            if not isinstance(sec, DynamicSection):
                continue
            for tag in sec.iter_tags():
                if tag.entry.d_tag == "DT_NEEDED":
                    needed.append(tag.needed)  # type: ignore[attr-defined]
                elif tag.entry.d_tag == "DT_RUNPATH":
                    runpath.extend(tag.runpath.split(":"))  # type: ignore[attr-defined]
                elif tag.entry.d_tag == "DT_RPATH":
                    runpath.extend(tag.rpath.split(":"))  # type: ignore[attr-defined]
    return needed, runpath, interp


def _loaded_elsewhere(tree: Tree, lib: str) -> bool:
    """A library in a private dir (e.g. lib/x86_64-linux-gnu/systemd/) that an executable
    loads through its own RUNPATH; the dynamic loader then matches it by soname for
    every later object, which is how libsystemd-core finds libsystemd-shared."""
    return any(tree.host("usr/lib").glob(f"*/*/{lib}"))


def elf_closure(tree: Tree, pool: Pool) -> list[str]:
    """Add every library the tree's ELF files need; returns the image paths added.

    A library found neither in the tree nor in the pool is a BuildError naming the
    binary and the library.
    """
    added: list[str] = []
    done: set[str] = set()
    while True:
        pending = []
        for dirpath, dirnames, filenames in os.walk(tree.root):
            dirnames.sort()
            for name in sorted(filenames):
                host = Path(dirpath, name)
                rel = str(host.relative_to(tree.root))
                if rel not in done and not host.is_symlink() and is_elf(host):
                    pending.append((rel, host))
        if not pending:
            return added
        for rel, host in pending:
            done.add(rel)
            needed, runpath, interp = elf_needs(host)
            if interp is not None and not tree.has(interp):
                tree.take(pool, interp, f"/{rel}")
                added.append(canonical(interp))
            origin_dir = "/" + str(Path(rel).parent)
            search = [p.replace("$ORIGIN", origin_dir).replace("${ORIGIN}", origin_dir)
                      for p in runpath if p] + ["/" + d for d in LIB_DIRS]
            for lib in needed:
                candidates = [os.path.normpath(f"{d}/{lib}") for d in search]
                if any(tree.has(c) for c in candidates) or _loaded_elsewhere(tree, lib):
                    continue
                for cand in candidates:
                    if pool.get(cand) is not None:
                        tree.take(pool, cand, f"/{rel}")
                        added.append(canonical(cand))
                        break
                else:
                    raise BuildError(f"ELF closure: /{rel} needs {lib}, which is in none of "
                                     f"the profile's packages (searched {', '.join(search)}); "
                                     "add the Debian package that ships it to `debs`")


# --- Python import graph -----------------------------------------------------------------

def python_scripts(tree: Tree) -> list[Path]:
    """Executables in the tree that are Python scripts (e.g. from a driver bundle)."""
    out = []
    for d in ("usr/bin", "usr/sbin"):
        for path in sorted(tree.host(d).glob("*")):
            if path.is_file() and not path.is_symlink():
                with path.open("rb") as f:
                    first = f.readline(200)
                if first.startswith(b"#!") and b"python" in first:
                    out.append(path)
    return out


def stdlib_view(pool: Pool, dest: Path) -> Path:
    """``dest`` filled with links to the pool's ``usr/lib/python3.11`` files: the stdlib of
    the profile's packages as one directory (the closure's search path, the executable's
    frozen sources)."""
    prefix = PY_STDLIB + "/"
    for rel, (host, _origin) in pool.files.items():
        if rel.startswith(prefix):
            link = dest / rel[len(prefix):]
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(host.resolve())
    if not (dest / "os.py").exists():
        raise BuildError("python closure: no usr/lib/python3.11/os.py in the profile's "
                         "packages; add libpython3.11-minimal and libpython3.11-stdlib")
    return dest


@dataclass(frozen=True)
class PythonClosure:
    files: list[str]  # stdlib files added (image paths)
    builtins: frozenset[str]  # built-in modules imported (the builder's python3.11 has them)


def python_closure(tree: Tree, pool: Pool, roots: list[str], site_dir: str,
                   scripts: list[Path] | None = None) -> PythonClosure:
    """Stdlib files (image paths) for the modules ``roots`` import, transitively, and the
    built-in modules among those imports.

    ``roots`` are module names importable from ``site_dir`` (an image path already
    filled with guestinit and the wheels) or the stdlib; ``scripts`` are Python
    programs in the tree. Uses modulefinder over a merged view of the pool's stdlib,
    so lazy imports inside functions count too.
    """
    with tempfile.TemporaryDirectory(prefix="guestinit-stdlib-") as tmp:
        merged = stdlib_view(pool, Path(tmp) / "stdlib")
        script = Path(tmp) / "roots.py"  # outside the merged stdlib view
        script.write_text("".join(f"import {m}\n" for m in (*PY_STARTUP, *roots)))
        finder = modulefinder.ModuleFinder(
            path=[str(tree.host(site_dir)), str(merged), str(merged / "lib-dynload")],
            excludes=PY_EXCLUDES,
        )
        finder.run_script(str(script))
        for extra in scripts or []:
            finder.run_script(str(extra))
        ours = [(name, sorted(callers)) for name, callers in sorted(finder.badmodules.items())
                if name.split(".")[0] in PY_EXCLUDES
                and any(c.startswith("guestinit") for c in callers)]
        if ours:
            name, callers = ours[0]
            raise BuildError(f"python closure: {callers[0]} imports {name}, which the image "
                             "leaves out (rootfs/closure.py PY_EXCLUDES); remove the import or "
                             "take it off that list")
        missing = [name for name in roots if name not in finder.modules]
        if missing:
            raise BuildError(f"python closure: module {missing[0]} not found in {site_dir} "
                             "or the stdlib of the profile's packages")
        files: set[str] = set()
        builtins = frozenset(n for n in finder.modules if n in sys.builtin_module_names)
        for mod in finder.modules.values():
            path = getattr(mod, "__file__", None)
            if not path:
                continue
            real = Path(path)
            if real.is_relative_to(merged):
                files.add(f"{PY_STDLIB}/{real.relative_to(merged)}")
    out = sorted(files)
    for rel in out:
        if not tree.has(rel):
            tree.take(pool, rel, "the Python import graph")
    if sys.version_info[:2] != (3, 11):
        raise BuildError(f"python closure: run guestinit-build with Python 3.11 (the guest's), "
                         f"not {sys.version.split()[0]}")
    return PythonClosure(out, builtins)
