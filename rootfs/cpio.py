"""A reproducible cpio "newc" writer (and reader, for verify and inspect).

Entries are sorted by path, owned by 0:0, numbered from 1 and stamped with one
mtime (SOURCE_DATE_EPOCH), so the same tree always gives the same bytes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    path: str  # relative, no leading "/"
    mode: int  # full st_mode (type + permissions)
    data: bytes = b""  # file contents or symlink target
    rdev: tuple[int, int] = (0, 0)
    source: Path | None = None  # read lazily when set


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, e: Entry, size: int, mtime: int) -> bytes:
    name = e.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(e.mode) else 1
    fields = (ino, e.mode, 0, 0, nlink, mtime, size, 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
    head = MAGIC + b"".join(b"%08X" % f for f in fields) + name
    return head + _pad(len(head))


def entries_from_dir(root: Path) -> list[Entry]:
    """Every directory, file and symlink below ``root`` (permissions kept, no owners)."""
    out: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            host = Path(dirpath, name)
            rel = str(host.relative_to(root))
            st = host.lstat()
            if stat.S_ISLNK(st.st_mode):
                out.append(Entry(rel, stat.S_IFLNK | 0o777, os.readlink(host).encode()))
            elif stat.S_ISDIR(st.st_mode):
                out.append(Entry(rel, stat.S_IFDIR | stat.S_IMODE(st.st_mode)))
            elif stat.S_ISREG(st.st_mode):
                out.append(Entry(rel, stat.S_IFREG | stat.S_IMODE(st.st_mode), source=host))
            else:
                raise ValueError(f"cpio: {host} is not a file, directory or symlink")
    return out


def sort_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))


def write(out: BinaryIO, entries: list[Entry], mtime: int) -> int:
    """Write the archive; returns the number of entries (without the trailer)."""
    seen: set[str] = set()
    ino = 0
    for e in sorted(entries, key=lambda e: sort_key(e.path)):
        if e.path in seen:
            raise ValueError(f"cpio: duplicate entry {e.path}")
        seen.add(e.path)
        data = e.source.read_bytes() if e.source is not None else e.data
        ino += 1
        out.write(_header(ino, e, len(data), mtime))
        out.write(data + _pad(len(data)))
    out.write(_header(0, Entry(TRAILER, 0), 0, 0))
    return ino


def read(data: bytes) -> Iterator[Entry]:
    """Entries of a newc archive (uncompressed); raises ValueError on corruption."""
    pos = 0
    while True:
        if data[pos:pos + 6] != MAGIC:
            raise ValueError(f"cpio: bad magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start: name_start + namesize - 1].decode()
        body = name_start + namesize
        body += -body % 4
        if name == TRAILER:
            return
        payload = data[body: body + size]
        yield Entry(name, mode, payload, (fields[9], fields[10]))
        pos = body + size
        pos += -pos % 4
