"""Kernel module metadata: ``.modinfo`` reader and a depmod-compatible generator.

Debian's kernel package ships no ``modules.dep`` (depmod makes it at install
time), and the guest image runs no depmod, so the image builder writes
``modules.dep``, ``modules.alias`` and ``modules.softdep`` from each ``.ko``'s
``.modinfo`` section. The guest imports this module only as a fallback when
``modules.dep`` is missing, so pyelftools is imported inside the functions.

Formats follow depmod: in ``modules.dep`` each line is ``path: dep dep ...``
with paths relative to ``/lib/modules/<release>``, and the dependencies are
ordered so that loading them from the end of the list backwards satisfies every
module before its users (what modprobe does).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class ModinfoError(ValueError):
    """A module file or its metadata is unusable; the message names the file."""


def module_name(path_or_name: str) -> str:
    """The kernel's name for a module: basename without suffix, ``-`` as ``_``."""
    base = os.path.basename(path_or_name)
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modinfo(data: bytes) -> dict[str, list[str]]:
    """Split a raw ``.modinfo`` section (NUL separated ``key=value``) into lists."""
    info: dict[str, list[str]] = {}
    for raw in data.split(b"\0"):
        if not raw:
            continue
        key, sep, value = raw.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def read_modinfo(path: str) -> dict[str, list[str]]:
    """The ``.modinfo`` of one uncompressed ``.ko`` as ``key -> [values]``."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    if not path.endswith(".ko"):
        raise ModinfoError(f"read modinfo {path}: only uncompressed .ko files are supported "
                           "(decompress the module tree first)")
    try:
        with open(path, "rb") as f:
            section = ELFFile(f).get_section_by_name(".modinfo")
            if section is None:
                raise ModinfoError(f"read modinfo {path}: no .modinfo section "
                                   "(not a kernel module?)")
            data = section.data()
    except ELFError as exc:
        raise ModinfoError(f"read modinfo {path}: not an ELF file ({exc})") from None
    return parse_modinfo(data)


def dependencies(info: Mapping[str, list[str]]) -> list[str]:
    """Module names from ``depends=`` (normalized to ``_``), in the order given."""
    out: list[str] = []
    for value in info.get("depends", []):
        out.extend(module_name(d) for d in value.split(",") if d)
    return out


def find_modules(release_dir: str) -> dict[str, str]:
    """Module name -> path relative to ``release_dir`` for every module below it."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(release_dir):
        dirnames.sort()
        for fn in sorted(filenames):
            if fn.endswith(MODULE_SUFFIXES):
                rel = os.path.relpath(os.path.join(dirpath, fn), release_dir)
                found.setdefault(module_name(fn), rel)
    return found


def load_order(
    names: Iterable[str], depends: Mapping[str, list[str]], what: str = "modules"
) -> list[str]:
    """Names plus their transitive dependencies, each after all of its dependencies.

    ``depends`` maps a module name to its direct dependencies. A name without an
    entry is an error naming the module that needs it; so is a cycle.
    """
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, needed_by: str) -> None:
        mark = state.get(name)
        if mark == 2:
            return
        if mark == 1:
            raise ModinfoError(f"resolve {what}: dependency cycle through {name}")
        if name not in depends:
            raise ModinfoError(f"resolve {what}: module {name} (needed by {needed_by}) "
                               "is not in the module tree")
        state[name] = 1
        for dep in depends[name]:
            visit(dep, name)
        state[name] = 2
        order.append(name)

    for name in names:
        visit(module_name(name), "the request")
    return order


def _release_dir(modules_dir: str, kernel_release: str) -> str:
    candidate = os.path.join(modules_dir, kernel_release)
    if os.path.isdir(candidate):
        return candidate
    if os.path.basename(os.path.normpath(modules_dir)) == kernel_release:
        return modules_dir
    raise ModinfoError(f"generate module index: {candidate} is not a directory "
                       f"(pass the lib/modules directory holding {kernel_release}/)")


def generate(modules_dir: str, kernel_release: str) -> dict[str, str]:
    """Text of ``modules.dep``, ``modules.alias`` and ``modules.softdep``.

    ``modules_dir`` is the ``lib/modules`` directory (or the release directory
    itself); every ``.ko`` below ``<modules_dir>/<kernel_release>`` is read.
    """
    release_dir = _release_dir(modules_dir, kernel_release)
    paths = find_modules(release_dir)
    infos = {name: read_modinfo(os.path.join(release_dir, rel)) for name, rel in paths.items()}
    deps = {name: dependencies(info) for name, info in infos.items()}

    dep_lines = []
    for name, rel in sorted(paths.items(), key=lambda item: item[1]):
        order = load_order([name], deps, what=f"modules.dep for {rel}")
        # depmod lists users before their dependencies: modprobe loads from the end
        chain = [paths[d] for d in reversed(order[:-1])]
        dep_lines.append(f"{rel}: {' '.join(chain)}".rstrip() + "\n")

    alias_lines = ["# Aliases extracted from modules themselves.\n"]
    softdep_lines = ["# Soft dependencies extracted from modules themselves.\n"]
    for name in sorted(infos):
        for alias in infos[name].get("alias", []):
            alias_lines.append(f"alias {alias} {name}\n")
        for soft in infos[name].get("softdep", []):
            softdep_lines.append(f"softdep {name} {soft}\n")
    return {
        "modules.dep": "".join(dep_lines),
        "modules.alias": "".join(alias_lines),
        "modules.softdep": "".join(softdep_lines),
    }


def read_vermagic(path: str) -> str:
    """The ``vermagic=`` string of an uncompressed module, without parsing its ELF."""
    import mmap  # only when a load failed: not on the boot path

    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            return ""  # empty file
        with mm:
            at = mm.find(b"\0vermagic=")
            if at < 0:
                return ""
            end = mm.find(b"\0", at + 1)
            return mm[at + 10:end].decode("utf-8", "replace")


def check_vermagic(name: str, path: str, kernel_release: str) -> None:
    if not path.endswith(".ko"):
        return  # compressed: the kernel decompresses and checks it
    magic = read_vermagic(path)
    if not magic:
        raise ModinfoError(f"module {name}: {path} has no vermagic (not a kernel module?)")
    built_for = magic.split()[0]
    if built_for != kernel_release:
        raise ModinfoError(f"module {name}: built for kernel {built_for}, running {kernel_release} "
                          f"({path}; rebuild the image for this kernel)")
