"""Reading the kernel's files: one read-or-nothing for /proc, /sys and the image's
files, one whole-file write, and looking devices up in sysfs by the name they carry.

Both go through ``os.read``/``os.write``, not a text-mode ``open()``: a text file object
needs the codec registry, whose first use imports the encodings package; on the init's
core phase nothing before the ready frame needs it (docs/guest.md, "Two start phases")."""

from __future__ import annotations

import os

MISSING = (FileNotFoundError, NotADirectoryError)  # no such file: not an error to raise


def read_text(path: str, quiet: tuple[type[OSError], ...] = MISSING) -> str | None:
    """The file's text; None when opening or reading it raises one of ``quiet`` (by
    default: it is not there). Other errors are raised, so a caller that must say why
    still can. Universal newlines, as a text-mode ``open()`` reads."""
    chunks = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
    except quiet:
        return None
    text = b"".join(chunks).decode()
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def write_text(path: str, text: str, mode: int = 0o644) -> None:
    """``text`` (UTF-8) as the whole of ``path``, created with ``mode`` (less the umask)
    or truncated. OSError as ``open()`` raises it."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


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
        text = read_text(os.path.join(base, entry, name_file), (OSError,))
        if text is not None and text.strip() == name:
            return entry
    return None
