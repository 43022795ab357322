"""frozen.c for the image's Python executable (static_init): guestinit and the stdlib
modules its boot imports, marshal-frozen.

Each module is compiled with its path in the image as the file name (tracebacks and
linecache name the real ``/usr/lib/guestinit/guestinit/x.py``) by the builder's own
interpreter, which must be the image's python3.11 version: marshal data is only read by
the version that wrote it. One fresh interpreter with a fixed hash seed marshals every
module in sorted order, so the bytes are the same on every build (set constants are
marshalled in hash order, and marshal's reference flags follow refcounts).

What is frozen: every ``guestinit`` module but ``guestinit.testing`` (and the build-time
``_libc_build``), the stdlib modules of docs/guest.md's import table (``BOOT_STDLIB``) and
of a bare interpreter's start (``START_STDLIB``), and every stdlib module those import at
module level. A module-level import that is none of frozen, built into the binary or
Python's own frozen set fails the build naming it: never a guest that dies on import.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import guestinit
from rootfs.steps import BuildError

GUEST_SITE = "/usr/lib/guestinit"
IMAGE_STDLIB = "/usr/lib/python3.11"
SKIP_GUEST = ("testing",)  # guestinit.testing: stand-ins started as their own processes
BUILD_ONLY = ("_libc_build.py",)
# the stdlib rows of docs/guest.md's import table that are Python source (the unit test
# keeps this equal to the table); all but __future__ and struct are in Python's own frozen set
BOOT_STDLIB = ("__future__", "_collections_abc", "genericpath", "os", "posixpath", "stat", "struct")
# what a bare `python3.11 -I -S -c pass` imports from files (UTF-8 mode: utf_8 only)
START_STDLIB = ("encodings", "encodings.aliases", "encodings.utf_8")
# CPython 3.11's own frozen modules (Python/frozen.c): importlib's bootstrap and stdlib
PYTHON_FROZEN = frozenset({
    "_frozen_importlib", "_frozen_importlib_external", "zipimport", "abc", "codecs", "io",
    "_collections_abc", "_sitebuiltins", "genericpath", "ntpath", "posixpath", "os.path",
    "os", "site", "stat", "importlib.util", "importlib.machinery", "runpy"})
# imported at module level by a frozen module but left on disk (extension modules in
# lib-dynload, loaded as under python3.11), each with the reason it may be
ON_DISK = {
    "mmap": "guestinit.barmap only (NVIDIA BAR mapping); kmod imports it on a failure path",
}
# compiled into the binary besides libpython's inittab (config.c)
EXTRA_BUILTINS = frozenset({"_cffi_backend", "_guestinit_libc", "_guestinit_start"})
_INITTAB = re.compile(r'^\s*\{"(\w+)", PyInit_\w+\},', re.M)


# built-in modules the interpreter needs to start or that C code imports by name (_io from
# _cffi_backend); the rest of config.c's Modules/Setup block is linked only when the image's
# Python code imports it (closure.python_closure's ``builtins``)
CORE_BUILTINS = frozenset({
    "posix", "_signal", "_codecs", "_io", "_thread", "time", "_weakref", "_abc", "errno",
    "itertools", "_collections", "_functools", "_operator", "_sre", "_stat", "_locale",
    "atexit", "faulthandler", "_tracemalloc"})
_SETUP_BLOCK = re.compile(
    r"(/\* -- ADDMODULE MARKER 1 -- \*/)(.*?)(/\* -- ADDMODULE MARKER 2 -- \*/)", re.S)


def trim_config(config_text: str, wanted: Iterable[str]) -> tuple[str, list[str]]:
    """libpython's config.c with the Modules/Setup modules neither in ``CORE_BUILTINS`` nor
    ``wanted`` taken out of the inittab (their objects are then not linked), and the names
    taken out. BuildError when the markers CPython's makesetup writes are missing."""
    keep = CORE_BUILTINS | frozenset(wanted)
    m = _SETUP_BLOCK.search(config_text)
    if m is None:
        raise BuildError("trim config.c: no ADDMODULE MARKER 1/2 block (not CPython's "
                         "makesetup output?)")
    dropped = sorted(set(_INITTAB.findall(m.group(2))) - keep)
    lines = [line for line in m.group(2).splitlines(keepends=True)
             if not any(f'"{n}", PyInit_' in line for n in dropped)]
    text = config_text[:m.start(2)] + "".join(lines) + config_text[m.end(2):]
    for name in dropped:  # the extern declarations above the table
        text = text.replace(f"extern PyObject* PyInit_{name}(void);\n", "")
    return text, dropped


def read_config(config_c: Path) -> str:
    try:
        return config_c.read_text()
    except OSError as exc:
        raise BuildError(f"read {config_c}: {exc.strerror} "
                         "(apt-get install libpython3.11-dev)") from None


def builtin_modules(config_text: str) -> frozenset[str]:
    """Names in an inittab (``_PyImport_Inittab`` of config.c) and ours."""
    return frozenset(_INITTAB.findall(config_text)) | EXTRA_BUILTINS | {"builtins", "sys"}


def guest_modules(src: Path, site: str = GUEST_SITE) -> dict[str, tuple[Path, str, bool]]:
    """guestinit module -> (source, path in the image, is package)."""
    out = {}
    for py in sorted(src.rglob("*.py")):
        rel = py.relative_to(src)
        if "__pycache__" in rel.parts or rel.parts[0] in SKIP_GUEST or py.name in BUILD_ONLY:
            continue
        parts = ("guestinit", *rel.with_suffix("").parts)
        pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if pkg else parts)] = (py, f"{site}/guestinit/{rel}", pkg)
    return out


def module_imports(source: str, name: str, is_package: bool) -> list[tuple[str, bool]]:
    """Absolute names a module imports when it runs (module level, ``try`` included, not
    function bodies nor ``if TYPE_CHECKING``), each with whether it sits in a ``try``."""
    found: list[tuple[str, bool]] = []
    package = name if is_package else name.rpartition(".")[0]

    def walk(nodes: Iterable[ast.stmt], in_try: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.extend((a.name, in_try) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                found.append((base, in_try))
                # `from pkg import sub` may import a submodule: listed as optional
                found.extend((f"{base}.{a.name}", True) for a in node.names)
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    walk(node.body, in_try)
                    walk(node.orelse, in_try)
            elif isinstance(node, ast.Try):
                walk(node.body, True)
                for handler in node.handlers:
                    walk(handler.body, True)
                walk(node.orelse, in_try)
                walk(node.finalbody, in_try)
            elif isinstance(node, ast.With):
                walk(node.body, in_try)

    walk(ast.parse(source, name).body, False)
    return found


def stdlib_source(name: str, stdlib: Path) -> tuple[Path, bool] | None:
    base = stdlib.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py"), False
    return None


def plan(guest_src: Path, stdlib: Path, builtins: frozenset[str],
         site: str = GUEST_SITE,
         image_stdlib: str = IMAGE_STDLIB) -> dict[str, tuple[Path, str, bool]]:
    """Every module to freeze: name -> (source on the builder, path in the image, package).
    BuildError names a module-level import that would reach the disk at boot."""
    modules = guest_modules(guest_src, site)
    todo = sorted(modules)
    for name in (*BOOT_STDLIB, *START_STDLIB):
        if name not in PYTHON_FROZEN:
            todo.append(name)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in modules:
            found = stdlib_source(name, stdlib)
            if found is None:
                raise BuildError(f"freeze {name}: no {name.replace('.', '/')}.py in {stdlib}")
            src, pkg = found
            modules[name] = (src, f"{image_stdlib}/{src.relative_to(stdlib)}", pkg)
        src, _, pkg = modules[name]
        for dep, optional in module_imports(src.read_text(), name, pkg):
            if dep in builtins or dep in PYTHON_FROZEN or dep in ON_DISK or dep in seen \
                    or dep in modules:
                continue
            if dep.partition(".")[0] == "guestinit" or stdlib_source(dep, stdlib) is None:
                if optional:
                    continue  # `from pkg import name` (not a module), or inside a try
                raise BuildError(f"freeze {name}: imports {dep} at module level, which is "
                                 "neither frozen, built into the image's executable, nor in the "
                                 "image's stdlib: import it where it is used, or build it in")
            todo.append(dep)
    return dict(sorted(modules.items()))


def check_version(debian_version: str, builder: tuple[int, ...] = sys.version_info[:3],
                  header: Path = Path("/usr/include/python3.11/patchlevel.h")) -> None:
    """The builder interpreter, libpython's headers and the image's python3.11 package
    (``3.11.2-6+deb12u9``) must be one Python version: marshal data is version-bound."""
    want = debian_version.split(":")[-1].split("-")[0]
    have = ".".join(map(str, builder))
    if have != want:
        raise BuildError(f"freeze: the builder runs Python {have} but the image's python3.11 "
                         f"is {debian_version} ({want}): run the build with Python {want}")
    if header.is_file():
        m = re.search(r'#define PY_VERSION\s+"([^"]+)"', header.read_text())
        if m and m.group(1) != want:
            raise BuildError(f"freeze: libpython3.11-dev is Python {m.group(1)} but the "
                             f"image's python3.11 is {debian_version} ({want})")


_MARSHAL = """
import marshal, sys
out = []
for line in sys.stdin.read().splitlines():
    name, src, path = line.split("\\t")
    with open(src, "rb") as f:
        code = compile(f.read(), path, "exec", dont_inherit=True, optimize=0)
    data = marshal.dumps(code)
    out.append(len(data).to_bytes(4, "little") + data)
sys.stdout.buffer.write(b"".join(out))
"""


def marshal_modules(modules: Mapping[str, tuple[Path, str, bool]],
                    python: str = sys.executable) -> dict[str, bytes]:
    """name -> marshalled code, from one fresh interpreter with a fixed hash seed."""
    names = sorted(modules)
    lines = "".join(f"{n}\t{modules[n][0]}\t{modules[n][1]}\n" for n in names)
    env = {"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "/usr/bin")}
    proc = subprocess.run([python, "-S", "-s", "-B", "-c", _MARSHAL], input=lines.encode(),
                          capture_output=True, env=env, check=False)
    if proc.returncode != 0:
        raise BuildError(f"freeze: marshal modules with {python}: "
                         f"{proc.stderr.decode(errors='replace').strip()}")
    out, data = {}, proc.stdout
    for name in names:
        size = int.from_bytes(data[:4], "little")
        out[name], data = data[4:4 + size], data[4 + size:]
    return out


def _c_name(name: str) -> str:
    return "M_" + name.replace(".", "__")


def render(modules: Mapping[str, tuple[Path, str, bool]], code: Mapping[str, bytes]) -> str:
    """frozen.c: one byte array per module and the ``guestinit_frozen`` table."""
    out = ["/* Generated by rootfs/freeze.py: do not edit. */", "#include <Python.h>", ""]
    for name in sorted(modules):
        data = code[name]
        out.append(f"/* {name}: {modules[name][1]} */")
        out.append(f"static const unsigned char {_c_name(name)}[] = {{")
        for i in range(0, len(data), 24):
            out.append("    " + ",".join(str(b) for b in data[i:i + 24]) + ",")
        out.append("};")
    out.append("")
    out.append("const struct _frozen guestinit_frozen[] = {")
    for name in sorted(modules):
        pkg = int(modules[name][2])
        out.append(f'    {{"{name}", {_c_name(name)}, (int)sizeof({_c_name(name)}), {pkg}, '
                   "NULL},")
    out.append("    {NULL, NULL, 0, 0, NULL},")
    out.append("};")
    # the stdlib part alone, for the executable run as python3.11 (the image keeps no
    # files of these modules; guestinit's come from the site directory there)
    out.append("const struct _frozen stdlib_frozen[] = {")
    for name in sorted(n for n in modules if n.partition(".")[0] != "guestinit"):
        pkg = int(modules[name][2])
        out.append(f'    {{"{name}", {_c_name(name)}, (int)sizeof({_c_name(name)}), {pkg}, '
                   "NULL},")
    out.append("    {NULL, NULL, 0, 0, NULL},")
    out.append("};")
    return "\n".join(out) + "\n"


def generate(stdlib: Path, config_c: Path, python: str = sys.executable,
             guest_src: Path | None = None,
             builtins: Iterable[str] | None = None) -> tuple[dict[str, str], list[str]]:
    """The generated C files by name (``frozen.c``; ``config.c`` when ``builtins`` names the
    built-in modules the image imports, libpython's inittab trimmed to those) and the
    frozen modules."""
    src = guest_src or Path(guestinit.__file__).parent
    config = read_config(config_c)
    files = {}
    if builtins is not None:
        config, _ = trim_config(config, builtins)
        files["config.c"] = config
    modules = plan(src, stdlib, builtin_modules(config))
    files["frozen.c"] = render(modules, marshal_modules(modules, python))
    return files, list(modules)
