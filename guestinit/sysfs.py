"""Reading the kernel's files: one read-or-nothing for /proc, /sys and the image's
files, and looking devices up in sysfs by the name they carry."""

from __future__ import annotations

import os

MISSING = (FileNotFoundError, NotADirectoryError)  # no such file: not an error to raise


def read_text(path: str, quiet: tuple[type[OSError], ...] = MISSING) -> str | None:
    """The file's text; None when opening it raises one of ``quiet`` (by default: it is
    not there). Other errors are raised, so a caller that must say why still can."""
    try:
        with open(path) as f:
            return f.read()
    except quiet:
        return None



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
