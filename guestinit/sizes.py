"""Sizes and PCI BAR targets as the settings and the bar-map tools spell them.

Pure parsers (values.py's settings and the host's ``guestinit-bench bar-map`` use them);
``barmap.py`` does the measuring.
"""

from __future__ import annotations

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
SUFFIXES = {"": 1, "k": KIB, "m": MIB, "g": GIB, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``4G``, ``512M``, ``64KiB``, ``0``, ``1T`` (binary units) -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in SUFFIXES and t[-1:] else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit():
        raise ValueError(f"size {text!r}: expected a whole number with an optional unit "
                         "K, M, G or T (binary), e.g. 4G or 512M")
    return int(number) * SUFFIXES[unit]


def format_size(n: int) -> str:
    """Bytes in the largest binary unit that divides them: 4 GiB, 256 MiB, 1536 KiB."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def parse_target(text: str) -> tuple[str, int]:
    """``0000:00:02.0:2`` or ``00:02.0/resource2`` -> (full BDF, BAR index)."""
    t = text.strip()
    bdf, sep, bar = t.rpartition("/resource") if "/resource" in t else t.rpartition(":")
    if bdf.count(":") == 1:
        bdf = "0000:" + bdf
    parts = bdf.replace(".", ":").split(":")
    if (not sep or not bar.isdigit() or int(bar) > 5 or len(parts) != 4
            or not all(p and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts)):
        raise ValueError(f"BAR {text!r}: expected <bdf>:<bar>, e.g. 0000:00:02.0:2 "
                         "(the device's sysfs resource2)")
    return bdf.lower(), int(bar)
