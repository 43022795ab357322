"""MIG capabilities: which exist, their device minors, and the modes the driver gives them.

``/proc/driver/nvidia-caps/mig-minors`` lists every capability the driver could have, with
its minor (``config 1``, ``monitor 2``, ``gpu0/gi0/access 3``, ``gpu0/gi0/ci0/access 4``,
... for every GPU, GPU instance and compute instance: thousands of lines on a real
driver). The ones that exist have a file under ``/proc/driver/nvidia/capabilities``
(``mig/config``, ``mig/monitor``, ``gpu<minor>/mig/gi<g>/access``,
``gpu<minor>/mig/gi<g>/ci<c>/access``) whose ``DeviceFileMode`` line is the node's mode in
decimal (``256`` = 0400). Only those get a node, with that mode and group 0, as
``nvidia-modprobe -f`` does.
"""

from __future__ import annotations

import os

from guestinit.sysfs import read_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

# the driver's modes when a capability file has no DeviceFileMode line: config lets its
# holder repartition the GPU (root only), monitor and access are for every user
DEFAULT_MODES = {"config": 0o400, "monitor": 0o444}
ACCESS_MODE = 0o444
MIG_MINORS = "proc/driver/nvidia-caps/mig-minors"
CAPABILITIES = "proc/driver/nvidia/capabilities"


class Cap:
    """One capability that exists; ``gpu`` (the GPU's minor), ``gi``, ``ci`` are -1 where
    they do not apply (``config``, ``monitor``; a GI's own access cap has ``ci`` -1)."""

    __slots__ = ("ci", "gi", "gpu", "minor", "mode", "name")

    def __init__(self, name: str, minor: int, mode: int, gpu: int = -1, gi: int = -1,
                 ci: int = -1) -> None:
        self.name = name  # as in mig-minors: "config", "gpu0/gi1/access", "gpu0/gi1/ci0/access"
        self.minor = minor
        self.mode = mode
        self.gpu = gpu
        self.gi = gi
        self.ci = ci

    @property
    def node(self) -> str:
        """The node's path under /dev."""
        return f"nvidia-caps/nvidia-cap{self.minor}"

    def __repr__(self) -> str:
        return f"Cap({self.name} minor {self.minor} 0{self.mode:o})"


def parse_mig_minors(text: str) -> dict[str, int]:
    """``name minor`` lines of ``/proc/driver/nvidia-caps/mig-minors``."""
    out = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit():
            out[fields[0]] = int(fields[1])
    return out


def parse_cap_file(text: str) -> dict[str, int]:
    """``DeviceFileMinor: 1``, ``DeviceFileMode: 256``, ``DeviceFileModify: 1`` lines of a
    capability's procfs file, as integers (the driver prints them in decimal)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip().isdigit():
            out[key.strip()] = int(value)
    return out


def _numbered(path: str, prefix: str) -> list[int]:
    """N of the entries named ``<prefix>N`` in ``path``, sorted; none if it is missing."""
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(n[len(prefix):]) for n in names
                  if n.startswith(prefix) and n[len(prefix):].isdigit())


def _existing(base: str) -> list[tuple[str, str, int, int, int]]:
    """(name, procfs file, gpu, gi, ci) of the GI and CI access caps the driver shows."""
    out = []
    for gpu in _numbered(base, "gpu"):
        mig = os.path.join(base, f"gpu{gpu}", "mig")
        for gi in _numbered(mig, "gi"):
            gi_dir = os.path.join(mig, f"gi{gi}")
            access = os.path.join(gi_dir, "access")
            if not os.path.isfile(access):
                continue
            out.append((f"gpu{gpu}/gi{gi}/access", access, gpu, gi, -1))
            for ci in _numbered(gi_dir, "ci"):
                ci_access = os.path.join(gi_dir, f"ci{ci}", "access")
                if os.path.isfile(ci_access):
                    out.append((f"gpu{gpu}/gi{gi}/ci{ci}/access", ci_access, gpu, gi, ci))
    return out


def read_caps(root: str) -> list[Cap]:
    """``config``, ``monitor`` and the access caps that exist, with the driver's minors
    and modes; none without a mig-minors file (no nvidia-caps in this driver)."""
    text = read_text(os.path.join(root, MIG_MINORS))
    if text is None:
        return []
    minors = parse_mig_minors(text)
    base = os.path.join(root, CAPABILITIES)
    found = [(name, os.path.join(base, "mig", name), -1, -1, -1) for name in DEFAULT_MODES]
    caps = []
    for name, path, gpu, gi, ci in found + _existing(base):
        fields = parse_cap_file(read_text(path) or "")
        # the cap's own file is the driver's word for its minor; mig-minors lists them all
        minor = fields.get("DeviceFileMinor", minors.get(name))
        if minor is None:
            continue
        mode = fields.get("DeviceFileMode", DEFAULT_MODES.get(name, ACCESS_MODE)) & 0o777
        caps.append(Cap(name, minor, mode, gpu, gi, ci))
    return caps


def instances(caps: Sequence[Cap], gpu: int) -> list[tuple[int, list[Cap]]]:
    """(gi, [the GI's access cap, its CIs' access caps]) for each GPU instance of GPU
    minor ``gpu`` that has at least one compute instance (without one, nothing can run)."""
    out = []
    for gi_cap in (c for c in caps if c.gpu == gpu and c.gi >= 0 and c.ci < 0):
        cis = sorted((c for c in caps if c.gpu == gpu and c.gi == gi_cap.gi and c.ci >= 0),
                     key=lambda c: c.ci)
        if cis:
            out.append((gi_cap.gi, [gi_cap, *cis]))
    return sorted(out, key=lambda item: item[0])
