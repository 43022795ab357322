"""The guest kernel: unpacked Debian package, config check and the module set the image carries."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from guestinit import modinfo
from rootfs import kconfig
from rootfs.steps import BuildError


@dataclass(frozen=True)
class KernelTree:
    root: Path  # unpacked linux-image-* package
    release: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def config(self) -> Path:
        return self.root / "boot" / f"config-{self.release}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.release


def open_tree(root: Path, package: str) -> KernelTree:
    mods = root / "lib" / "modules"
    releases = sorted(p.name for p in mods.iterdir()) if mods.is_dir() else []
    if len(releases) != 1:
        raise BuildError(f"kernel package {package}: expected one lib/modules/<release> "
                         f"directory, found {releases or 'none'}")
    tree = KernelTree(root, releases[0])
    for path in (tree.vmlinuz, tree.config):
        if not path.is_file():
            raise BuildError(f"kernel package {package}: {path.relative_to(root)} is missing")
    return tree


def check_fragments(config: Path, fragments: list[Path]) -> list[kconfig.Result]:
    wants: list[kconfig.Want] = []
    for frag in fragments:
        wants.extend(kconfig.read_fragment(frag))
    results = kconfig.check(kconfig.read_config(config), wants)
    bad = [r for r in results if r.fails]
    if bad:
        names = ", ".join(f"{r.want.option} (want {r.want.value}, found {r.found or 'unset'})"
                          for r in bad)
        raise BuildError(f"kernel config {config.name}: {names}; this kernel cannot boot the "
                         "profile (see `guestinit-build kconfig check`)")
    return results


@dataclass(frozen=True)
class ModuleSet:
    order: list[str]  # load order: every module after its dependencies
    paths: dict[str, Path]  # name -> host file
    rel: dict[str, str]  # name -> path inside lib/modules/<release>


def softdep_names(info: dict[str, list[str]]) -> list[str]:
    """Module names or aliases from ``softdep=pre: a b post: c`` (pre and post alike)."""
    return [w for value in info.get("softdep", []) for w in value.split()
            if w not in ("pre:", "post:")]


def alias_index(tree: Path) -> dict[str, list[str]]:
    """Plain aliases (no wildcards, e.g. ``crc32c``) -> module names, cached per tree."""
    cache = tree / ".guestinit-aliases.json"
    if cache.is_file():
        cached: dict[str, list[str]] = json.loads(cache.read_text())
        return cached
    out: dict[str, list[str]] = {}
    for name, rel in sorted(modinfo.find_modules(str(tree)).items()):
        for alias in modinfo.read_modinfo(str(tree / rel)).get("alias", []):
            if not any(c in alias for c in "*?[:"):
                out.setdefault(alias, []).append(name)
    with contextlib.suppress(OSError):  # a read-only tree: recomputed next time
        cache.write_text(json.dumps(out, sort_keys=True))
    return out


def select_modules(trees: list[Path], wanted: list[str], release: str) -> ModuleSet:
    """``wanted`` plus dependencies and soft dependencies, found in ``trees``.

    ``trees`` are release dirs; earlier ones win. A wanted or needed module that no
    tree has is a BuildError naming it; so is a module whose vermagic is for another
    kernel release. Soft dependencies (``softdep=pre: crc32c``) are resolved by name
    or alias and carried when found; they also order the load like hard ones.
    """
    index: dict[str, tuple[Path, str]] = {}
    for tree in trees:
        for name, rel in modinfo.find_modules(str(tree)).items():
            index.setdefault(name, (tree / rel, rel))
    aliases: dict[str, list[str]] | None = None
    depends: dict[str, list[str]] = {}
    todo = [modinfo.module_name(w) for w in wanted]
    while todo:
        name = todo.pop()
        if name in depends or name not in index:
            continue
        info = modinfo.read_modinfo(str(index[name][0]))
        vermagic = (info.get("vermagic") or [""])[0]
        if vermagic and vermagic.split()[0] != release:
            raise BuildError(f"kernel module {index[name][0]}: built for {vermagic.split()[0]}, "
                             f"the image kernel is {release}; rebuild it for {release}")
        depends[name] = modinfo.dependencies(info)
        for soft in softdep_names(info):
            if modinfo.module_name(soft) in index:
                found = [modinfo.module_name(soft)]
            else:
                if aliases is None:
                    aliases = {}
                    for tree in trees:
                        for key, names in alias_index(tree).items():
                            aliases.setdefault(key, []).extend(names)
                found = aliases.get(soft, [])
            depends[name].extend(f for f in found if f not in depends[name])
        todo.extend(depends[name])
    try:
        order = modinfo.load_order(wanted, depends, what="image modules")
    except modinfo.ModinfoError as exc:
        raise BuildError(f"{exc} (kernel {release}); fix kernel.modules in the profile") from None
    return ModuleSet(order, {n: index[n][0] for n in order}, {n: index[n][1] for n in order})


def builtin_files(modules_dir: Path) -> list[Path]:
    """Index files that describe built-in modules (the loader skips those names)."""
    return [modules_dir / n for n in ("modules.builtin", "modules.builtin.modinfo")
            if (modules_dir / n).is_file()]
