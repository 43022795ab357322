"""manifest.json (every file and output, with its source package) and the SPDX SBOM."""

from __future__ import annotations

import json
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rootfs import cpio, sbom
from rootfs.closure import Origin, Tree, canonical
from rootfs.fetch import Pin, file_digests, sha256_file
from rootfs.pack import SPECIAL_NODES
from rootfs.staticinit import LINKED_DEBS
from rootfs.steps import BuildError, run

SCHEMA = 1
MANIFEST = "manifest.json"
SBOM = "sbom.spdx.json"


def dumps(obj: object) -> str:
    """Canonical JSON: sorted keys, fixed separators, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


@dataclass
class Manifest:
    data: dict[str, Any]
    sbom: dict[str, Any]

    def write(self, out: Path) -> None:
        """The SBOM, then the manifest, which lists the SBOM among the outputs it covers
        (and so the signature over the manifest covers the SBOM too)."""
        path = out / SBOM
        path.write_text(dumps(self.sbom))
        self.data["outputs"][SBOM] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        self.data["outputs"] = dict(sorted(self.data["outputs"].items()))
        (out / MANIFEST).write_text(dumps(self.data))

    @classmethod
    def read(cls, out: Path) -> Manifest:
        return cls(json.loads((out / MANIFEST).read_text()), {})


def _file_entries(tree: Tree, sha1: dict[str, str]) -> list[dict[str, Any]]:
    """The manifest's rows; fills ``sha1`` (path -> SHA-1) for the SBOM's file entries."""
    files: list[dict[str, Any]] = []
    unknown = Origin("unknown", "")
    for e in cpio.entries_from_dir(tree.root):
        origin = tree.origins.get(canonical(e.path), unknown)
        row: dict[str, Any] = {"path": "/" + e.path, "mode": f"{stat.S_IMODE(e.mode):04o}"}
        if stat.S_ISDIR(e.mode):
            row["type"] = "dir"
        elif stat.S_ISLNK(e.mode):
            row.update(type="symlink", target=e.data.decode())
        else:
            assert e.source is not None
            digest, sha1[row["path"]] = file_digests(e.source, "sha256", "sha1")
            row.update(type="file", size=e.source.stat().st_size, sha256=digest,
                       package=origin.package, version=origin.version)
        files.append(row)
    for node in SPECIAL_NODES:
        files.append({"path": "/" + node.path, "type": "chardev",
                      "mode": f"{stat.S_IMODE(node.mode):04o}", "rdev": list(node.rdev)})
    return sorted(files, key=lambda r: cpio.sort_key(r["path"].lstrip("/")))


def build(profile: str, release: str, epoch: int, tree: Tree, outputs: dict[str, Path],
          pins: dict[str, Pin], driver: Origin | None,
          roothash: str | None, source: str = "",
          tools: dict[str, str] | None = None,
          licenses: dict[str, str] | None = None,
          static_links: dict[str, list[dict[str, str]]] | None = None) -> Manifest:
    """The manifest and its SBOM (rootfs.sbom); ``source`` says what guestinit was built
    from (its git commit); ``static_links``: image path -> the components (name, version,
    kind, file, sha256) compiled into that file (the static_init executable)."""
    sha1: dict[str, str] = {}
    files = _file_entries(tree, sha1)
    packages = []
    for key, pin in sorted(pins.items()):
        kind, _, name = key.rpartition(":")
        packages.append({"name": name, "version": pin.version, "kind": kind or "deb",
                         "file": pin.filename, "sha256": pin.sha256,
                         "license": (licenses or {}).get(name, "")})
    if driver is not None:
        packages.append({"name": driver.package, "version": driver.version, "kind": "bundle",
                         "file": "", "sha256": ""})
    data = {
        "schema": SCHEMA,
        "profile": profile,
        "kernel_release": release,
        "source_date_epoch": epoch,
        "roothash": roothash,
        "outputs": {name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                    for name, p in sorted(outputs.items())},
        "packages": packages,
        "tools": dict(sorted((tools or {}).items())),
        "static_links": dict(sorted((static_links or {}).items())),
        "files": files,
    }
    return Manifest(data, sbom.document(data, sha1, source or "no git checkout"))


# --- inspect -----------------------------------------------------------------------------

COMPONENTS = ("kernel", "modules", "python", "wheels", "guestinit", "driver", "libraries",
              "other")


def component_of(row: dict[str, Any]) -> str:
    path, pkg = row["path"], row.get("package", "")
    if pkg == "nvidia-driver":
        return "driver"
    if path.startswith("/usr/lib/modules/"):
        return "modules"
    if path.startswith("/usr/lib/guestinit/guestinit/") or path in ("/init", "/usr/sbin/init"):
        return "guestinit"
    if path.startswith("/usr/lib/guestinit/"):
        return "wheels"
    if path.startswith("/usr/lib/python3.11/") or path == "/usr/bin/python3.11":
        return "python"
    if ".so" in os.path.basename(path):
        return "libraries"
    return "other"


def inspect_table(out: Path) -> str:
    man = Manifest.read(out).data
    sizes = {c: [0, 0, 0] for c in COMPONENTS}  # files, bytes, zlib-compressed bytes
    kernel = out / "vmlinuz"
    if kernel.exists():
        sizes["kernel"] = [1, kernel.stat().st_size, kernel.stat().st_size]
    blobs: dict[str, dict[str, bytes]] = {c: {} for c in COMPONENTS}
    initramfs = out / "initramfs.img"
    if initramfs.exists():
        from rootfs.pack import decompress

        for e in cpio.read(decompress(initramfs)):
            if stat.S_ISREG(e.mode):
                blobs[component_of({"path": "/" + e.path})][e.path] = e.data
    for row in man["files"]:
        if row["type"] != "file":
            continue
        comp = component_of(row)
        sizes[comp][0] += 1
        sizes[comp][1] += row["size"]
    for comp, files in blobs.items():
        if files:
            sizes[comp][2] = len(zlib.compress(b"".join(files[k] for k in sorted(files)), 9))
    total = sum(v[1] for k, v in sizes.items() if k != "kernel")
    lines = [f"{'component':<10} {'files':>6} {'bytes':>12} {'MiB':>7} {'~zlib MiB':>9} "
             f"{'share':>6}"]
    for comp in COMPONENTS:
        n, size, packed = sizes[comp]
        if n == 0:
            continue
        share = "" if comp == "kernel" else f"{100 * size / max(total, 1):5.1f}%"
        lines.append(f"{comp:<10} {n:>6} {size:>12} {size / 2**20:>7.2f} "
                     f"{packed / 2**20:>9.2f} {share:>6}")
    lines.append(f"{'tree':<10} {sum(v[0] for k, v in sizes.items() if k != 'kernel'):>6} "
                 f"{total:>12} {total / 2**20:>7.2f}")
    for name in ("initramfs.img", "rootfs.erofs", "rootfs.verity", "vmlinuz"):
        if name in man["outputs"]:
            size = man["outputs"][name]["size"]
            lines.append(f"output {name:<20} {size:>12} bytes ({size / 2**20:.2f} MiB)")
    return "\n".join(lines)


def guestinit_source() -> str:
    """What guestinit was built from, for the SBOM: the git commit of its checkout."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = run(["git", "-C", repo, "rev-parse", "HEAD"], what="git rev-parse").decode()
    except BuildError:
        return "no git checkout"
    return f"git commit {commit.strip()}"


# The Debian packages of the host tools whose output is in the image (manifest ``tools``)
# the static libraries the static_init executable links in count as tools (their code is in
# the image's /usr/bin/python3.11); cffi's sdist is pinned in the lock (sdists)
TOOL_PACKAGES = ("erofs-utils", "cryptsetup-bin", "lz4", "zstd", "gcc", "musl-tools",
                 *LINKED_DEBS)


def host_tools() -> dict[str, str]:
    """The versions of the host tools the image's bytes depend on; the cpio writer is
    ours (rootfs/cpio.py), so Python's version stands for it."""
    import platform

    out = {"python": platform.python_version()}
    for pkg in TOOL_PACKAGES:
        try:
            out[pkg] = run(["dpkg-query", "-W", "-f", "${Version}", pkg],
                           what=f"{pkg} version").decode().strip() or "unknown"
        except BuildError:
            out[pkg] = "not installed"
    return out
