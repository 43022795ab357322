"""manifest.json (every file and output, with its source package) and the SPDX SBOM."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rootfs import cpio
from rootfs.closure import Origin, Tree, canonical
from rootfs.fetch import Lock, Pin, sha256_file
from rootfs.pack import SPECIAL_NODES

SCHEMA = 1
MANIFEST = "manifest.json"
SBOM = "sbom.spdx.json"
TOOL = "guestinit-build-0.1.0"


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


def _file_entries(tree: Tree) -> list[dict[str, Any]]:
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
            row.update(type="file", size=e.source.stat().st_size, sha256=sha256_file(e.source),
                       package=origin.package, version=origin.version)
        files.append(row)
    for node in SPECIAL_NODES:
        files.append({"path": "/" + node.path, "type": "chardev",
                      "mode": f"{stat.S_IMODE(node.mode):04o}", "rdev": list(node.rdev)})
    return sorted(files, key=lambda r: cpio.sort_key(r["path"].lstrip("/")))


def build(profile: str, release: str, epoch: int, tree: Tree, outputs: dict[str, Path],
          lock: Lock, pins: dict[str, Pin], driver: Origin | None,
          roothash: str | None) -> Manifest:
    files = _file_entries(tree)
    packages = []
    for key, pin in sorted(pins.items()):
        kind, _, name = key.rpartition(":")
        packages.append({"name": name, "version": pin.version, "kind": kind or "deb",
                         "file": pin.filename, "sha256": pin.sha256})
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
        "files": files,
    }
    return Manifest(data, spdx(data, lock))


def _purl(pkg: dict[str, Any]) -> str:
    if pkg["kind"] == "deb":
        return f"pkg:deb/debian/{pkg['name']}@{pkg['version']}?arch=amd64&distro=bookworm"
    if pkg["kind"] == "wheel":
        return f"pkg:pypi/{pkg['name']}@{pkg['version']}"
    return f"pkg:generic/{pkg['name']}@{pkg['version']}"


def spdx(data: dict[str, Any], lock: Lock) -> dict[str, Any]:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(data["source_date_epoch"]))
    digest = hashlib.sha256(dumps(data["outputs"]).encode()).hexdigest()[:16]
    pkgs = [{
        "SPDXID": "SPDXRef-image",
        "name": f"guestinit-image-{data['profile']}",
        "versionInfo": data["kernel_release"],
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "primaryPackagePurpose": "OPERATING-SYSTEM",
    }]
    rels = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
             "relatedSpdxElement": "SPDXRef-image"}]
    for i, pkg in enumerate(data["packages"], 1):
        ref = f"SPDXRef-Package-{i}"
        entry: dict[str, Any] = {
            "SPDXID": ref,
            "name": pkg["name"],
            "versionInfo": pkg["version"],
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": _purl(pkg)}],
        }
        if pkg["sha256"]:
            entry["checksums"] = [{"algorithm": "SHA256", "checksumValue": pkg["sha256"]}]
        pkgs.append(entry)
        rels.append({"spdxElementId": "SPDXRef-image", "relationshipType": "CONTAINS",
                     "relatedSpdxElement": ref})
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"guestinit-image-{data['profile']}",
        "documentNamespace": f"https://guestinit.invalid/spdx/{data['profile']}-{digest}",
        "creationInfo": {"created": created, "creators": [f"Tool: {TOOL}"]},
        "packages": pkgs,
        "relationships": rels,
    }


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
