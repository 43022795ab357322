"""Looking devices up in sysfs by the name they carry."""

from __future__ import annotations

import os


def find_named(root: str, device_class: str, name: str, name_file: str = "name",
               prefix: str = "") -> str | None:
    """The first entry (sorted) of ``/sys/class/<device_class>`` starting with ``prefix``
    whose ``<entry>/<name_file>`` holds ``name``; None if none (yet)."""
    base = os.path.join(root, "sys/class", device_class)
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return None
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        try:
            with open(os.path.join(base, entry, name_file)) as f:
                if f.read().strip() == name:
                    return entry
        except OSError:
            continue
    return None
