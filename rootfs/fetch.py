"""Fetching inputs: the lock file, ``.deb`` files (apt-get download) and wheels (pip download).

Everything lands in the cache (``$GUESTINIT_CACHE`` or ``~/.cache/guestinit``) and
is checked against the sha256 in the lock file. No package script ever runs:
debs are unpacked with ``dpkg-deb -x`` and wheels with zipfile.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from rootfs.steps import BuildError, run

DEFAULT_EPOCH = 1735689600  # 2025-01-01T00:00:00Z, used when a new lock file is made
WHEEL_PLATFORM = ("--only-binary=:all:", "--platform", "manylinux2014_x86_64",
                  "--python-version", "3.11", "--implementation", "cp")


def cache_dir() -> Path:
    root = os.environ.get("GUESTINIT_CACHE") or os.path.expanduser("~/.cache/guestinit")
    return Path(root)


def file_digests(path: Path, *algorithms: str) -> tuple[str, ...]:
    """Hex digests of ``path`` in each of ``algorithms`` (hashlib names), read once."""
    hashes = [hashlib.new(a) for a in algorithms]
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            for h in hashes:
                h.update(block)
    return tuple(h.hexdigest() for h in hashes)


def sha256_file(path: Path) -> str:
    return file_digests(path, "sha256")[0]


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    sha256: str
    filename: str


@dataclass
class Lock:
    path: Path
    source_date_epoch: int
    kernel: dict[str, str]  # meta package -> ABI package
    debs: dict[str, Pin]
    wheels: dict[str, Pin]
    # source distributions compiled into the image's Python executable (cffi, static_init)
    sdists: dict[str, Pin] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Lock:
        if not path.exists():
            return cls(path, DEFAULT_EPOCH, {}, {}, {})
        try:
            data = tomllib.loads(path.read_text())
            return cls(
                path,
                int(data.get("source_date_epoch", DEFAULT_EPOCH)),
                {k: str(v["package"]) for k, v in data.get("kernel", {}).items()},
                {k: Pin(k, v["version"], v["sha256"], v["filename"])
                 for k, v in data.get("debs", {}).items()},
                {k: Pin(k, v["version"], v["sha256"], v["filename"])
                 for k, v in data.get("wheels", {}).items()},
                {k: Pin(k, v["version"], v["sha256"], v["filename"])
                 for k, v in data.get("sdists", {}).items()},
            )
        except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BuildError(f"lock file {path}: unreadable ({exc!r}); delete it and run "
                             "`guestinit-build lock PROFILE` to make a new one") from None

    def render(self) -> str:
        def q(s: str) -> str:
            return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

        out = ["# Pinned inputs of the guest images; refresh with `guestinit-build lock PROFILE`.",
               f"source_date_epoch = {self.source_date_epoch}", ""]
        for meta in sorted(self.kernel):
            out += [f"[kernel.{q(meta)}]", f"package = {q(self.kernel[meta])}", ""]
        for table, pins in (("debs", self.debs), ("wheels", self.wheels),
                            ("sdists", self.sdists)):
            for name in sorted(pins):
                p = pins[name]
                out += [f"[{table}.{q(name)}]", f"version = {q(p.version)}",
                        f"sha256 = {q(p.sha256)}", f"filename = {q(p.filename)}", ""]
        return "\n".join(out)

    def save(self) -> None:
        self.path.write_text(self.render())


# --- Debian packages -------------------------------------------------------------------

def apt_show(names: list[str]) -> dict[str, dict[str, str]]:
    """Candidate-version stanzas from ``apt-cache show`` (Version, SHA256, Filename, Depends)."""
    out: dict[str, dict[str, str]] = {}
    for name in names:
        try:
            text = run(["apt-cache", "show", "--no-all-versions", name],
                       what=f"resolve Debian package {name}").decode()
        except BuildError as exc:
            raise BuildError(f"resolve Debian package {name}: not known to apt ({exc}); check "
                             "the name in the profile or run `apt-get update`") from None
        stanza: dict[str, str] = {}
        for line in text.splitlines():
            if not line.strip():
                break
            if line[0] != " " and ":" in line:
                key, _, value = line.partition(":")
                stanza[key] = value.strip()
        if "Version" not in stanza:
            raise BuildError(f"resolve Debian package {name}: apt-cache show printed no "
                             "Version (a virtual package? name a real one in the profile)")
        out[name] = stanza
    return out


def kernel_abi_package(meta: str) -> str:
    """``linux-image-amd64`` -> the ABI package it depends on today."""
    if not meta.startswith("linux-image-") or re.search(r"\d+\.\d+\.\d+-\d+", meta):
        return meta  # already an ABI package
    depends = apt_show([meta])[meta].get("Depends", "")
    for dep in depends.split(","):
        name = dep.split("(")[0].strip()
        if name.startswith("linux-image-"):
            return name
    raise BuildError(f"resolve kernel {meta}: no linux-image-* in its Depends ({depends!r})")


def _deb_glob(name: str, version: str) -> str:
    return f"{name}_{version.replace(':', '%3a')}_*.deb"


def fetch_deb(pin: Pin, *, updated: list[bool]) -> Path:
    """The cached .deb for ``pin``, downloading it if needed; sha256 checked."""
    dest = cache_dir() / "debs"
    dest.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        for cand in sorted(dest.glob(_deb_glob(pin.name, pin.version))):
            if sha256_file(cand) == pin.sha256:
                return cand
            cand.unlink()  # a stale or broken download
        try:
            run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                 f"{pin.name}={pin.version}"], cwd=dest, what=f"download {pin.name}")
        except BuildError as exc:
            if attempt == 0 and not updated[0] and os.geteuid() == 0:
                updated[0] = True
                print("    apt-get update (a download failed)", file=sys.stderr)
                run(["apt-get", "update", "-qq"], what="apt-get update")
                continue
            raise BuildError(f"download {pin.name}={pin.version}: {exc}; if Debian dropped "
                             "this version, run `guestinit-build lock PROFILE`") from None
    raise BuildError(f"download {pin.name}={pin.version}: the file does not match sha256 "
                     f"{pin.sha256} from the lock file; run `guestinit-build lock PROFILE`")


def extract_deb(deb: Path) -> Path:
    """Unpacked contents of ``deb`` (dpkg-deb -x, no scripts), cached by file name."""
    target = cache_dir() / "extract" / deb.name.removesuffix(".deb")
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        run(["dpkg-deb", "-x", deb, tmp], what=f"unpack {deb.name}")
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


# --- wheels ------------------------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheel(dest: Path, name: str, version: str | None) -> Path | None:
    want = _norm(name)
    for whl in sorted(dest.glob("*.whl")):
        dist, ver = whl.name.split("-")[:2]
        if _norm(dist) == want and (version is None or ver == version):
            return whl
    return None


def download_wheel(name: str, version: str | None) -> Path:
    dest = cache_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    spec = f"{name}=={version}" if version else name
    out = run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *WHEEL_PLATFORM,
               "-d", dest, spec], what=f"download wheel {spec}").decode()
    if version is None:
        m = re.search(r"(?:Saved|File was already downloaded) \S*?([^/\s]+\.whl)", out)
        if m:
            return dest / m.group(1)
        found = sorted(dest.glob(f"{_norm(name)}-*.whl"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    whl = _find_wheel(dest, name, version)
    if whl is None:
        raise BuildError(f"download wheel {spec}: pip saved no matching .whl in {dest}")
    return whl


def fetch_wheel(pin: Pin) -> Path:
    path = cache_dir() / "wheels" / pin.filename
    if not (path.exists() and sha256_file(path) == pin.sha256):
        path = download_wheel(pin.name, pin.version)
        if sha256_file(path) != pin.sha256:
            raise BuildError(f"wheel {path.name}: sha256 differs from the lock file "
                             f"({pin.sha256}); run `guestinit-build lock PROFILE`")
    return path


def wheel_version(path: Path) -> str:
    return path.name.split("-")[1]


_LICENSE_ID = re.compile(r"^[A-Za-z0-9.+-]+(?: (?:AND|OR|WITH) [A-Za-z0-9.+-]+)*$")


def wheel_license(path: Path) -> str:
    """The wheel's declared license as an SPDX expression (its METADATA's
    ``License-Expression``, or a ``License`` field that is one), else ""."""
    with zipfile.ZipFile(path) as zf:
        meta = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = zf.read(meta).decode("utf-8", "replace") if meta else ""
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():  # the headers, not the description
        key, sep, value = line.partition(": ")
        if sep and key in ("License-Expression", "License"):
            fields.setdefault(key, value.strip())
    for key in ("License-Expression", "License"):
        if _LICENSE_ID.match(fields.get(key, "")):
            return fields[key]
    return ""


# --- resolving (lock refresh) ------------------------------------------------------------

def resolve_debs(names: list[str]) -> dict[str, Pin]:
    stanzas = apt_show(names)
    pins = {}
    for name, st in stanzas.items():
        fn = os.path.basename(st.get("Filename", f"{name}.deb"))
        pins[name] = Pin(name, st["Version"], st.get("SHA256", ""), fn)
    return pins


def resolve_wheel(name: str) -> Pin:
    path = download_wheel(name, None)
    return Pin(name, wheel_version(path), sha256_file(path), path.name)
